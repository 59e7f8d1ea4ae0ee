"""Drives a real ComfyUI server: start it on a loopback port, queue prompts, wait for results.

Shared by the demo runner and the end-to-end tests. Standard library only, so it runs under
any Python; the server itself runs under the venv's Python.
"""

from __future__ import annotations

import ast
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACK_LINK_NAME = "lora-foundry"
# Nodes that exist only in the frontend and are dropped when a UI graph becomes an API prompt.
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}


def default_comfy_dir() -> Path:
    """The ComfyUI the project runs in: COMFYUI_PATH if set, else the one set-up installed."""
    return Path(os.environ.get("COMFYUI_PATH") or REPO / ".comfyui").resolve()


def comfy_version(comfy_dir: Path) -> str:
    """The version a ComfyUI tree declares in its comfyui_version.py ("unknown" without one). Read
    as a literal, never run: the tree may be anyone's checkout."""
    path = comfy_dir / "comfyui_version.py"
    if path.exists():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and any(
                getattr(t, "id", None) == "__version__" for t in node.targets
            ):
                return str(ast.literal_eval(node.value))
    return "unknown"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_base_dir(base: Path, pack: Path = REPO) -> Path:
    """A ComfyUI base directory with this pack linked into custom_nodes."""
    for sub in ("custom_nodes", "models/checkpoints", "models/loras", "input", "output", "user/default"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_LINK_NAME
    if not link.exists():
        link.symlink_to(pack, target_is_directory=True)
    settings = base / "user" / "default" / "comfy.settings.json"
    if not settings.exists():
        settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    return base


def _die_with_parent() -> None:
    """In the child before exec: ask Linux to SIGKILL it when the process that started it dies."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class ComfyServer:
    comfy_dir: Path
    base_dir: Path
    python: str = sys.executable
    port: int = 0
    log_path: Path | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180.0, detach: bool = False) -> ComfyServer:
        """Starts the server in its own session. Unless `detach` (the demo leaves it running), the server
        is killed when this process dies, even by SIGKILL (a test's timeout), so no 6 GB server is left
        behind."""
        self.port = self.port or free_port()
        self.log_path = self.log_path or self.base_dir / "comfyui.log"
        cmd = [
            self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--base-directory", str(self.base_dir), "--disable-auto-launch",
            "--database-url", f"sqlite:///{self.base_dir / 'user' / 'comfyui.db'}",
        ]  # fmt: skip
        if os.environ.get("LORA_FOUNDRY_FRONTEND_ROOT"):  # another frontend build, e.g. a newer release
            cmd += ["--front-end-root", os.environ["LORA_FOUNDRY_FRONTEND_ROOT"]]
        log = open(self.log_path, "ab")  # noqa: SIM115 - the server writes to it after we return
        self.proc = subprocess.Popen(
            cmd, cwd=self.comfy_dir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=None if detach else _die_with_parent,
        )  # fmt: skip
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}; log:\n{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=2)
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI not ready after {timeout:.0f} s; log:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    # --- HTTP ---------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path: str, payload: dict, timeout: float = 30):
        req = urllib.request.Request(
            self.url + path, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            raise RuntimeError(
                f"POST {path} failed with {e.code}: {e.read().decode(errors='replace')}"
            ) from e

    def queue(self, prompt: dict) -> str:
        return self.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        """The history entry of a finished prompt; raises if it failed, with the node's error."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist:
                entry = hist[prompt_id]
                status = entry.get("status", {})
                if status.get("status_str") == "error":
                    raise PromptFailed(_error_message(status), entry)
                if status.get("completed", True):
                    return entry
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}; log:\n{self.log_tail()}")
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout:.0f} s")

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        return self.wait(self.queue(prompt), timeout)


class PromptFailed(RuntimeError):
    def __init__(self, message: str, entry: dict):
        super().__init__(message)
        self.entry = entry


def _error_message(status: dict) -> str:
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            return f"{data.get('node_type')} (node {data.get('node_id')}): {data.get('exception_message')}"
    return "prompt failed"


def output_files(entry: dict) -> list[str]:
    """Paths relative to the base directory (output/... or temp/...) of the files a prompt wrote."""
    files = []
    for node_out in entry.get("outputs", {}).values():
        for items in node_out.values():
            if isinstance(items, list):
                for it in items:
                    if isinstance(it, dict) and "filename" in it:
                        files.append(
                            os.path.join(it.get("type", "output"), it.get("subfolder", ""), it["filename"])
                        )
    return files


# --- UI graph -> API prompt ---------------------------------------------------------------

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _is_widget(spec: list) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _has_control_widget(name: str, spec: list) -> bool:
    # The frontend adds a "control after generate" value after seed-like INT widgets.
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return spec[0] == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed"))


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Converts a UI-format graph (as saved by the frontend) into an API prompt."""
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt: dict[str, dict] = {}
    for node in workflow["nodes"]:
        ntype = node["type"]
        if ntype in FRONTEND_ONLY or node.get("mode", 0) in (2, 4):  # 2 muted, 4 bypassed
            continue
        if ntype not in object_info:
            raise KeyError(f"workflow node {node['id']} has type {ntype!r}, which the server does not know")
        info = object_info[ntype]["input"]
        specs = {**info.get("required", {}), **info.get("optional", {})}
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values", []))
        inputs: dict = {}
        for name, spec in specs.items():
            if _is_widget(spec) and values:
                inputs[name] = values.pop(0)
                if _has_control_widget(name, spec) and values:
                    values.pop(0)
            if name in linked:
                link = linked[name]
                inputs[name] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": ntype, "inputs": inputs}
    return prompt
