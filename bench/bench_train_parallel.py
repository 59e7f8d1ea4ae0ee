"""Benchmark: data-parallel scaling of a training job, 2 gloo ranks against 1 process, on the CPU.

The demo SD1.5 checkpoint (full size, random weights) at 64x64, the same job and the same global
batch: 1 process with `batch_size` B and 1 thread, against 2 ranks of scripts/train_job.py under
torch.distributed.run with `batch_size` B/2 and 1 thread each. Each run is launched as the Launch
Train Job node launches it (lora_core/train/launch.py) and timed from its progress events: seconds
per step are the median interval between step events after the first two (warm-up); images/s is
the global batch over that. The all-reduce share is the median of the seconds rank 0 spent in its
all-reduces in a step (measured inside lora_core/train/parallel.py and sent in each step event),
over the median step; it includes waiting for the slower rank. Runs alternate (1, 2, 1, 2, ...);
the best round of each counts, as the machine may be shared.

    .venv/bin/python bench/bench_train_parallel.py                  # 16 steps, 2 rounds, global batch 2
    .venv/bin/python bench/bench_train_parallel.py --batch 4 --steps 24 --rounds 3
    .venv/bin/python bench/bench_train_parallel.py --quick          # 4 steps, 1 round (a smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

from bench_train import make_images  # the same generated images and captions as the Train LoRA bench

REPO = Path(__file__).resolve().parents[1]
COMFY = Path(os.environ.get("COMFYUI_PATH") or REPO / ".comfyui").resolve()
CHECKPOINT = "lora_foundry_demo_sd15.safetensors"


def pack():
    """The pack importable as ``lora_foundry`` (lora_core only: no ComfyUI in this process)."""
    if "lora_foundry" not in sys.modules:
        package = types.ModuleType("lora_foundry")
        package.__path__ = [str(REPO)]
        sys.modules["lora_foundry"] = package
    from lora_foundry.lora_core.train import job, launch

    return job, launch


def write_job(base: Path, name: str, batch_size: int, steps: int) -> Path:
    job, _ = pack()
    doc = {
        "schema": job.SCHEMA, "version": job.VERSION,
        "model": {"checkpoint": CHECKPOINT},
        "dataset_source": {"folder": "bench_set", "cache": "memory"},
        "dataset": {"resolution": 64, "buckets": False},
        "network": {"rank": 16, "alpha": 16.0},
        "train": {"steps": steps, "batch_size": batch_size, "lr": 1e-4, "precision": "fp32", "seed": 1},
        "output": {"name": name, "existing": "overwrite", "save_dtype": "fp16"},
    }  # fmt: skip
    path = base / "output" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(job.job_from_dict(doc).to_json())
    return path


def run(base: Path, job_path: Path, ranks: int, timeout: float) -> dict:
    """One launch; the step events' arrival times and all-reduce seconds."""
    _, launch = pack()
    devices = launch.parse_devices("cpu", ranks)
    argv = launch.job_command(sys.executable, REPO / "scripts" / "train_job.py", job_path, devices,
                              ["--comfyui", str(COMFY), "--base-directory", str(base)])  # fmt: skip
    process = launch.JobProcess(argv, launch.job_environment(dict(os.environ), devices, cpu_threads=1))
    times, comm = [], []
    end = time.monotonic() + timeout
    while process.running() or not process.events.empty():
        for event in process.next_events(0.05):
            if event["event"] == "step":
                times.append(time.monotonic())
                comm.append(event["allreduce_s"])
        if time.monotonic() > end:
            process.stop(30)
            raise SystemExit(f"the {ranks}-rank run did not finish in {timeout:.0f}s")
    code = process.wait(30)
    if code != 0:
        raise SystemExit(str(process.failure(code)))
    steps = [b - a for a, b in zip(times[2:], times[3:], strict=False)] or [
        b - a for a, b in zip(times, times[1:], strict=False)
    ]
    return {"step_s": statistics.median(steps), "allreduce_s": statistics.median(comm[2:] or comm)}


def main() -> int:
    parser = argparse.ArgumentParser(description="Data-parallel scaling: 2 gloo ranks vs 1 process (CPU).")
    parser.add_argument("--batch", type=int, default=2, help="global batch (even; each rank gets half)")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="4 steps, 1 round")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.rounds = 4, 1
    if args.batch % 2:
        parser.error("--batch should be even (2 ranks share it)")
    if not (COMFY / "models" / "checkpoints" / CHECKPOINT).exists():
        raise SystemExit(f"the demo checkpoint is missing: run scripts/make_demo_models.py --comfyui {COMFY}")
    with tempfile.TemporaryDirectory(prefix="bench_parallel_") as tmp:
        base = Path(tmp)
        make_images(base / "input" / "bench_set", args.images, 64)
        jobs = {1: write_job(base, "one_rank", args.batch, args.steps),
                2: write_job(base, "two_ranks", args.batch // 2, args.steps)}  # fmt: skip
        results: dict[int, list[dict]] = {1: [], 2: []}
        for round_ in range(args.rounds):
            for ranks in (1, 2):
                results[ranks].append(run(base, jobs[ranks], ranks, args.timeout))
                r = results[ranks][-1]
                print(f"round {round_ + 1}, {ranks} rank(s): {r['step_s']:.3f} s/step, "
                      f"all-reduce {r['allreduce_s'] * 1000:.1f} ms/step", flush=True)  # fmt: skip
    best = {ranks: min(rs, key=lambda r: r["step_s"]) for ranks, rs in results.items()}
    ips = {ranks: args.batch / best[ranks]["step_s"] for ranks in (1, 2)}
    speedup = ips[2] / ips[1]
    share = best[2]["allreduce_s"] / best[2]["step_s"]
    spread = {
        ranks: max(r["step_s"] for r in rs) / min(r["step_s"] for r in rs) for ranks, rs in results.items()
    }
    print(f"demo SD1.5, 64x64, fp32, rank 16 attention, global batch {args.batch}, {args.steps} steps, "
          f"best of {args.rounds} round(s), 1 thread per rank")  # fmt: skip
    print(f"1 rank : {ips[1]:.2f} images/s ({best[1]['step_s']:.3f} s/step)")
    print(f"2 ranks: {ips[2]:.2f} images/s ({best[2]['step_s']:.3f} s/step)")
    print(f"speed-up 2 ranks / 1 rank: {speedup:.2f}x, scaling efficiency {speedup / 2:.0%} (goal >= 80%)")
    print(f"all-reduce share of the 2-rank step: {share:.1%} ({best[2]['allreduce_s'] * 1000:.1f} ms)")
    print("spread between rounds (slowest / fastest step): "
          + ", ".join(f"{r} rank(s) {s:.2f}x" for r, s in spread.items()))  # fmt: skip
    print(json.dumps({"ips_1": ips[1], "ips_2": ips[2], "efficiency": speedup / 2, "allreduce_share": share}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
