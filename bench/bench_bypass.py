"""Benchmark: bypass mode against patch mode for a 5-LoRA stack on an fp8-stored Flux-shaped model.

The model is ComfyUI's Flux at full width (hidden 3072, MLP 12288; few blocks, so it fits a small
machine), its weights stored in float8_e4m3fn and computed in float32 on the CPU, as a downloaded
fp8 Flux runs. Five rank-16 LoRAs (diffusers names, every Linear of the key map, q / k / v as slices
of the fused qkv) are applied by Apply LoRA Stack in each mode, then the model is sampled (euler,
CFG 1). Each mode runs in a fresh process, one after the other from this one run, so each starts
from the same state; with ``--rounds N`` the three modes run N times, interleaved (round r starts at
mode r of the list, so no mode always runs first or last), and each figure is the best of its
mode's rounds (times: the lowest; the spread of the rounds is printed beside it):

  none   : the model sampled without LoRA (the baseline both modes are measured against)
  patch  : apply_mode "patch weights": ComfyUI patches a float32 copy of each weight at load and
           rounds it back to fp8, keeping the original for unpatching
  bypass : apply_mode "bypass": the weights are not touched; each layer adds the LoRA on its output

Per mode: the peak RSS during apply + first sample above the RSS just before (a thread reads
/proc/self/statm every 2 ms), the first sample's wall time (apply + load + sampling: what a user
waits for after changing the stack) and a second sample's (the model already loaded). Ratios
patch / bypass are printed. Timings vary with the machine's load; compare within one run.

    .venv/bin/python bench/bench_bypass.py [--hidden 3072] [--double 1] [--single 2] [--rank 16] [--steps 4]
                                           [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = ("none", "patch", "bypass")
STRENGTHS = (0.3, 0.4, 0.5, 0.6, 0.7)


def _setup(loras: Path):
    """ComfyUI on the CPU and the pack importable as lora_foundry; models/loras pointed at ``loras``."""
    comfy_dir = Path(os.environ.get("COMFYUI_PATH") or REPO / ".comfyui").resolve()
    sys.path[:0] = [str(comfy_dir), str(REPO / "scripts")]
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import folder_paths

    folder_paths.folder_names_and_paths["loras"] = ([str(loras)], folder_paths.supported_pt_extensions)
    pkg = types.ModuleType("lora_foundry")
    pkg.__path__ = [str(REPO)]
    sys.modules["lora_foundry"] = pkg


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """The highest RSS seen while the block runs, read every 2 ms by a thread."""

    def __enter__(self):
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def write_loras(model, folder: Path, rank: int) -> list[str]:
    import comfy.lora
    import torch
    from safetensors.torch import save_file

    sd = model.model.state_dict()
    names = []
    for i in range(len(STRENGTHS)):
        g = torch.Generator().manual_seed(100 + i)
        tensors = {}
        for name, target in comfy.lora.model_lora_keys_unet(model.model, {}).items():
            key, offset = (target, None) if isinstance(target, str) else target[:2]
            if not name.startswith("transformer.") or key not in sd or sd[key].ndim != 2:
                continue
            rows = offset[2] if offset is not None else sd[key].shape[0]
            tensors[f"{name}.lora_A.weight"] = (
                torch.randn(rank, sd[key].shape[1], generator=g) * 0.01
            ).half()
            tensors[f"{name}.lora_B.weight"] = (torch.randn(rows, rank, generator=g) * 0.01).half()
        names.append(f"bench_bypass_{i}.safetensors")
        save_file(tensors, str(folder / names[-1]))
    return names


def _sample(model, steps: int):
    import comfy.sample
    import torch

    g = torch.Generator().manual_seed(0)
    cond = [
        [
            torch.randn(1, 8, 32, generator=g),
            {"pooled_output": torch.randn(1, 32, generator=g), "guidance": 3.5},
        ]
    ]
    latent = torch.zeros(1, 16, 16, 16)
    noise = comfy.sample.prepare_noise(latent, 1)
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", cond, cond, latent,
                                   seed=1, disable_pbar=True)  # fmt: skip


def child(mode: str, args) -> dict:
    _setup(Path(args.loras))
    import gc

    import comfy.model_management
    import model_factory
    import torch

    from lora_foundry.nodes.stack import ApplyLoraStack

    torch.set_num_threads(max(1, args.threads))
    model = model_factory.flux_model(seed=0, hidden=args.hidden, depth=args.double, single=args.single,
                                     dtype=torch.float8_e4m3fn)  # fmt: skip
    if mode == "prepare":
        return {"files": write_loras(model, Path(args.loras), args.rank)}
    entries = [(f"bench_bypass_{i}.safetensors", s, 1.0) for i, s in enumerate(STRENGTHS)]
    weights = sum(p.numel() * p.element_size() for p in model.model.diffusion_model.parameters())
    gc.collect()
    with PeakRss() as rss:
        t0 = time.perf_counter()
        target = model
        if mode != "none":
            target = ApplyLoraStack().execute(model, entries, apply_mode=args.mode_names[mode])["result"][0]
        first = _sample(target, args.steps)
        t1 = time.perf_counter()
    t2 = time.perf_counter()
    second = _sample(target, args.steps)
    t3 = time.perf_counter()
    comfy.model_management.unload_all_models()
    return {"mode": mode, "extra_rss": rss.peak - rss.start, "first_s": t1 - t0, "second_s": t3 - t2,
            "weights_bytes": weights, "finite": bool(torch.isfinite(first).all() and torch.isfinite(second).all())}  # fmt: skip


def _run_child(mode: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--loras", args.loras, "--hidden", str(args.hidden),
           "--double", str(args.double), "--single", str(args.single), "--rank", str(args.rank),
           "--steps", str(args.steps), "--threads", str(args.threads)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _best(rounds: list[dict]) -> dict:
    """Each figure's best over a mode's rounds (least memory, least time), and the times' spread."""
    first = [r["first_s"] for r in rounds]
    second = [r["second_s"] for r in rounds]
    return {**rounds[0], "extra_rss": min(r["extra_rss"] for r in rounds), "first_s": min(first),
            "second_s": min(second), "first_spread": max(first) / min(first),
            "second_spread": max(second) / min(second), "finite": all(r["finite"] for r in rounds)}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=3072, help="Flux hidden size (3072: full width)")
    p.add_argument("--double", type=int, default=1, help="double-stream blocks (Flux.1 has 19)")
    p.add_argument("--single", type=int, default=2, help="single-stream blocks (Flux.1 has 38)")
    p.add_argument("--rank", type=int, default=16, help="rank of each of the 5 LoRAs")
    p.add_argument("--steps", type=int, default=4, help="sampling steps per sample")
    p.add_argument("--threads", type=int, default=2, help="torch threads in each run")
    p.add_argument(
        "--rounds", type=int, default=1, help="interleaved rounds of the three modes; best of each"
    )
    p.add_argument("--child", choices=(*MODES, "prepare"), help=argparse.SUPPRESS)
    p.add_argument("--loras", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _setup(Path(args.loras))
        from lora_foundry.nodes.lora_apply import BYPASS, PATCH

        args.mode_names = {"patch": PATCH, "bypass": BYPASS}
        print(json.dumps(child(args.child, args)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        args.loras = tmp
        _run_child("prepare", args)
        runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for r in range(max(1, args.rounds)):
            for mode in MODES[r % len(MODES) :] + MODES[: r % len(MODES)]:
                runs[mode].append(_run_child(mode, args))
                print(f"round {r + 1} {mode}: " + ", ".join(f"{k} {runs[mode][-1][k]:.2f}" for k in
                      ("first_s", "second_s")) + f", extra_rss {runs[mode][-1]['extra_rss'] / 2**20:.0f} MiB",
                      flush=True)  # fmt: skip
    results = {mode: _best(rs) for mode, rs in runs.items()}
    mb = 2**20
    print(f"Flux-shaped model: hidden {args.hidden}, {args.double} double + {args.single} single blocks, "
          f"weights {results['none']['weights_bytes'] / mb:.0f} MiB in fp8; 5 LoRAs of rank {args.rank}, "
          f"{args.steps} euler steps per sample")  # fmt: skip
    print(f"best of {max(1, args.rounds)} round(s) per mode (spread: slowest / fastest round)")
    print(
        f"{'mode':8} {'extra peak RSS':>15} {'first sample':>13} {'spread':>7} {'second sample':>14} {'spread':>7}"
    )
    for mode, r in results.items():
        print(f"{mode:8} {r['extra_rss'] / mb:12.0f} MiB {r['first_s']:11.2f} s {r['first_spread']:6.2f}x "
              f"{r['second_s']:12.2f} s {r['second_spread']:6.2f}x"
              + ("" if r["finite"] else "  (non-finite output!)"))  # fmt: skip
    patch, bypass, none = results["patch"], results["bypass"], results["none"]
    print(f"ratio patch / bypass: extra peak RSS {patch['extra_rss'] / max(bypass['extra_rss'], 1):.2f}x, "
          f"first sample {patch['first_s'] / bypass['first_s']:.2f}x, second sample "
          f"{patch['second_s'] / bypass['second_s']:.2f}x")  # fmt: skip
    print(f"over no LoRA: extra peak RSS patch +{(patch['extra_rss'] - none['extra_rss']) / mb:.0f} MiB, "
          f"bypass +{(bypass['extra_rss'] - none['extra_rss']) / mb:.0f} MiB")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
