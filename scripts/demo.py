"""Runs every workflow in workflows/ through a real ComfyUI server and prints where the outputs are.

Started by `make demo` after set-up. The server keeps running for a browser afterwards unless
--stop is given. A server already answering on the port is reused.

    .venv/bin/python scripts/demo.py [--port 8188] [--stop]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
from pathlib import Path

from comfy_server import REPO, ComfyServer, PromptFailed, output_files, ui_to_api


def run_workflows(server: ComfyServer, workflows: list[Path]) -> int:
    object_info = server.get("/object_info")
    failures = 0
    for wf_path in workflows:
        t = time.time()
        try:
            prompt = ui_to_api(json.loads(wf_path.read_text()), object_info)
            entry = server.run(prompt, timeout=1800)
        except (PromptFailed, KeyError, TimeoutError) as e:
            failures += 1
            print(f"[demo] FAILED {wf_path.name}: {e}", flush=True)
            continue
        files = output_files(entry)
        print(f"[demo] {wf_path.name}: done in {time.time() - t:.1f} s", flush=True)
        for f in files:
            if f.startswith("output"):
                print(f"         {server.base_dir / f}", flush=True)
    return failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=8188)
    ap.add_argument("--stop", action="store_true", help="stop the server after the run")
    ap.add_argument(
        "--comfyui", type=Path, default=REPO / ".comfyui", help="ComfyUI folder (also the base directory)"
    )
    args = ap.parse_args()
    comfy_dir = args.comfyui.resolve()
    server = ComfyServer(comfy_dir=comfy_dir, base_dir=comfy_dir, python=sys.executable, port=args.port)
    reused = False
    try:
        server.get("/system_stats", timeout=2)
        reused = True
        print(f"[demo] using the ComfyUI already running at {server.url}", flush=True)
    except (urllib.error.URLError, OSError):
        print(f"[demo] starting ComfyUI at {server.url} (log: {comfy_dir / 'comfyui.log'})", flush=True)
        server.start(detach=True)  # it keeps running after the demo, for the user's browser
    workflows = sorted((REPO / "workflows").glob("*.json"))
    failures = run_workflows(server, workflows)
    if args.stop and not reused:
        server.stop()
        print("[demo] server stopped", flush=True)
    elif not reused:
        print(
            f"[demo] ComfyUI keeps running at {server.url} (pid {server.proc.pid}); stop it with: kill {server.proc.pid}"
        )
    print(f"[demo] {len(workflows) - failures} of {len(workflows)} workflows succeeded", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
