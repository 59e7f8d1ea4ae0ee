"""Benchmark: Train LoRA against ComfyUI core's TrainLoraNode, same run, same inputs.

The demo SD1.5 checkpoint (full size, random weights), the same generated images and captions,
rank, batch size, precision, resolution and gradient checkpointing. Each side runs in its own
subprocess (checkpoint loaded the way CheckpointLoaderSimple does, nodes run inside
torch.inference_mode as ComfyUI's executor runs them), so peak RSS (ru_maxrss) is the side's own.
Seconds per step: the median interval between optimizer steps after the first (warm-up) step,
best of interleaved rounds (the machine may be shared). Peak RSS: the highest resident set after
the checkpoint is loaded (VmHWM reset via /proc/self/clear_refs), i.e. data encoding + training.
Core gets its latents as a list of single-image LATENTs: one LATENT batch crashes it
(UnboundLocalError 'multi_res'). Ours runs with its default targets (attention) and with every
Linear and convolution (all_linear_conv), the layers core trains (core also trains norms and biases).

    .venv/bin/python bench/bench_train.py                    # 64x64, fp32
    .venv/bin/python bench/bench_train.py --full             # also 256x256
    .venv/bin/python bench/bench_train.py --precision bf16

Flux mode (--model flux): a Flux.1-dev-shaped diffusion model at the real width (hidden 3072, 24
heads, MLP ratio 4, 16 latent channels, patch 2, guidance embedding) with --double / --single
blocks and random weights, written once as a bf16 safetensors file and loaded by each side the way
ComfyUI's loaders do (comfy.sd.load_diffusion_model with dtype bfloat16; UNETLoader with
weight_dtype fp8_e4m3fn for the fp8 row). Its text input is 768 wide (txt_in / vector_in read 768,
as CLIP-L gives; not T5's 4096) to keep it small. Both sides get the same random latents
(16 x res/8 x res/8) and the same random conditioning (--tokens x 768 context, 768 pooled).
Rows: core TrainLoraNode (bf16 base), ours (bf16 base), ours (fp8_e4m3fn base). With --precision bf16
only ours runs (core's bf16 training crashes on the CPU): the fp8 base against the bf16 base.
--tensors adds one untimed run of ours per base, counting with torch's profiler the tensors it holds
at its peak, weights included (on a GPU: what torch.cuda.max_memory_allocated counts; peak RSS
also counts the process's libraries and the C library's kept heap). --heap adds one more untimed run
of ours per base that splits the resident set at its peak: glibc's heap (in use, kept free, mmapped
chunks) and the process's other anonymous and file-backed pages.

    .venv/bin/python bench/bench_train.py --model flux --res 256 --rank 16 --double 2 --single 4
    .venv/bin/python bench/bench_train.py --model flux --res 256 --rank 16 --double 2 --single 4 --precision bf16
    .venv/bin/python bench/bench_train.py --model flux --single 1 --res 64 --tokens 16 --steps 1 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMFY = Path(os.environ.get("COMFYUI_PATH") or REPO / ".comfyui").resolve()
CHECKPOINT = "lora_foundry_demo_sd15.safetensors"


def make_images(folder: Path, count: int, size: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"zkw, sample {i}, noise")


def _setup_comfy(base: Path):
    sys.path.insert(0, str(COMFY))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import folder_paths

    folder_paths.set_output_directory(str(base / "output"))
    folder_paths.set_input_directory(str(base / "input"))
    folder_paths.folder_names_and_paths["loras"] = (
        [str(base / "loras")],
        folder_paths.supported_pt_extensions,
    )
    (base / "loras").mkdir(exist_ok=True)
    import nodes

    with _inference():
        loaded = nodes.CheckpointLoaderSimple().load_checkpoint(CHECKPOINT)
    _reset_peak()
    return loaded


def _inference():
    import torch

    return torch.inference_mode()


def _intervals(times: list[float]) -> float:
    """Median interval between step ends (robust to a step slowed by other processes)."""
    gaps = sorted(b - a for a, b in zip(times, times[1:], strict=False))
    return gaps[len(gaps) // 2] if gaps else float("nan")


def _reset_peak() -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux), so the peak measured
    # afterwards is the training's, not the checkpoint load's (identical for both sides).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _status_gb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024**2
    return float("nan")


def _run_core(model, latents, positive, args) -> None:
    import inspect

    from comfy_extras.nodes_train import TrainLoraNode

    inputs = dict(
        model=[model], latents=latents, positive=positive, batch_size=[args.batch], steps=[args.steps + 1],
        grad_accumulation_steps=[1], learning_rate=[1e-4], rank=[args.rank], optimizer=["AdamW"],
        loss_function=["MSE"], seed=[0], training_dtype=[args.precision], lora_dtype=["fp32"], algorithm=["LoRA"],
        gradient_checkpointing=[args.checkpointing], existing_lora=["[None]"],
    )  # fmt: skip
    wanted = inspect.signature(TrainLoraNode.execute).parameters
    if "bucket_mode" in wanted:  # 0.8+: off = core's one-resolution path, as on 0.3.x
        inputs["bucket_mode"] = [False]
    if "bypass_mode" in wanted:
        inputs["bypass_mode"] = [False]
    with _inference():
        TrainLoraNode.execute(**inputs)


def _pack():
    import types

    # The pack as the package lora_foundry without running its __init__ (as the tests load it).
    package = types.ModuleType("lora_foundry")
    package.__path__ = [str(REPO)]
    sys.modules["lora_foundry"] = package


def train_ours(pack, model, clip, dataset, args, save_dtype: str, **hidden) -> None:
    """Train LoRA (nodes/train.py, given as ``pack``) with the bench's settings; ComfyUI's hidden
    inputs (unique_id) as keywords."""
    pack.TrainLora().execute(
        model, clip, dataset, output_name="bench", steps=args.steps + 1, epochs=0, batch_size=args.batch,
        grad_accum=1, rank=args.rank, alpha=float(args.rank), targets=args.targets, blocks="", lr=1e-4,
        te_lr=0.0, optimizer="AdamW", scheduler="constant", warmup_steps=0, warmup_ratio=0.0,
        min_snr_gamma=0.0, noise_offset=0.0, loss="MSE", precision=args.precision,
        gradient_checkpointing=args.checkpointing, seed=0, loraplus_ratio=1.0, dora=False, save_every=0,
        keep_last=1, save_dtype=save_dtype, existing="overwrite", **hidden,
    )  # fmt: skip


def worker_ours(args, base: Path) -> dict:
    model, clip, vae = _setup_comfy(base)
    _pack()
    from lora_foundry.nodes import comfy_bridge_train as train_bridge
    from lora_foundry.nodes import train as pack

    times: list[float] = []
    train_bridge.send_event = lambda data: times.append(time.perf_counter())
    with _inference():
        dataset, _ = pack.LoraTrainingDataset().execute(
            str(base / "input" / "images"),
            vae,
            clip,
            args.res,
            "",
            False,
            "center",
            False,
            False,
            0,
            0.0,
            1,
            "memory",
        )
        train_ours(pack, model, clip, dataset, args, save_dtype="fp16")
    return {"s_per_step": _intervals(times), "steps_timed": len(times) - 1}


def worker_core(args, base: Path) -> dict:
    model, clip, vae = _setup_comfy(base)
    import comfy.utils
    import numpy as np
    import torch
    from PIL import Image

    import nodes

    latents, positive = [], []
    with _inference():
        for png in sorted((base / "input" / "images").glob("*.png")):
            pixels = torch.from_numpy(np.asarray(Image.open(png), dtype=np.float32) / 255.0)[None]
            latents.append(nodes.VAEEncode().encode(vae, pixels)[0])
            positive.append(nodes.CLIPTextEncode().encode(clip, png.with_suffix(".txt").read_text())[0])
    times: list[float] = []
    comfy.utils.set_progress_bar_global_hook(lambda *a, **k: times.append(time.perf_counter()))
    _run_core(model, latents, positive, args)
    return {"s_per_step": _intervals(times), "steps_timed": len(times) - 1}


def run_side(
    side: str,
    args,
    base: Path,
    targets: str = "attention",
    weight_dtype: str = "bf16",
    keep_casts: bool = False,
    tensors: bool = False,
    heap: bool = False,
) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--res", str(args.res), "--steps", str(args.steps),
           "--rank", str(args.rank), "--batch", str(args.batch), "--precision", args.precision,
           "--targets", targets, "--base", str(base), "--model", args.model, "--images", str(args.images),
           "--double", str(args.double), "--single", str(args.single), "--tokens", str(args.tokens),
           "--weight-dtype", weight_dtype]  # fmt: skip
    if not args.checkpointing:
        cmd.append("--no-checkpointing")
    if keep_casts:
        cmd.append("--keep-casts")
    if tensors:
        cmd.append("--tensors")
    if heap:
        cmd.append("--heap")
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"{side} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def _best(results: list[dict]) -> dict:
    """Fastest round's time (other processes only ever slow a step down), highest memory."""
    return {
        "s_per_step": min(r["s_per_step"] for r in results),
        "peak_rss_gb": max(r["peak_rss_gb"] for r in results),
        "max_rss_gb": max(r["max_rss_gb"] for r in results),
        "released_gb": min(r.get("released_gb", 0.0) for r in results),
    }


def compare(args, res: int) -> None:
    args.res = res
    runs: dict[str, list[dict]] = {"core": [], "ours": [], "ours_all": []}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        make_images(base / "input" / "images", args.images, res)
        for _ in range(args.rounds):  # interleaved, so load from other processes hits every side
            runs["core"].append(run_side("core", args, base))
            runs["ours"].append(run_side("ours", args, base, "attention"))
            runs["ours_all"].append(run_side("ours", args, base, "all_linear_conv"))
    core, ours, ours_all = (_best(runs[k]) for k in ("core", "ours", "ours_all"))
    print(f"\n{res}x{res}, {args.precision}, rank {args.rank}, batch {args.batch}, "
          f"checkpointing {args.checkpointing}, {args.steps} timed steps")  # fmt: skip
    print(f"{'':28}{'s/step':>10}{'speed-up':>10}{'peak RSS GB':>13}{'ratio':>7}{'incl. load':>12}")
    rows = (
        ("core TrainLoraNode", core),
        ("ours, attention (default)", ours),
        ("ours, all Linear+Conv", ours_all),
    )
    for label, r in rows:
        speed = core["s_per_step"] / r["s_per_step"]
        mem = r["peak_rss_gb"] / core["peak_rss_gb"]
        print(
            f"{label:28}{r['s_per_step']:10.2f}{speed:9.2f}x{r['peak_rss_gb']:13.2f}{mem:7.2f}{r['max_rss_gb']:12.2f}"
        )
    print("peak RSS: highest resident set after the checkpoint was loaded (data encoding + training);")
    print("incl. load: the process's ru_maxrss, which the checkpoint load dominates on both sides")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="also 256x256")
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the fastest counts")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    p.add_argument("--worker", choices=["ours", "core"])
    p.add_argument("--targets", default="attention")
    p.add_argument("--res", type=int, default=64)
    p.add_argument("--base")
    p.add_argument("--model", choices=["sd15", "flux"], default="sd15")
    p.add_argument("--double", type=int, default=1, help="flux: double blocks")
    p.add_argument("--single", type=int, default=2, help="flux: single blocks")
    p.add_argument("--tokens", type=int, default=256, help="flux: text tokens per caption")
    p.add_argument("--ablate", action="store_true", help="flux: also ours without recast_frozen_linears")
    p.add_argument("--tensors", action="store_true",
                   help="flux: also the tensors ours holds at its peak (weights included), bf16 and fp8 base, "
                        "counted by torch's profiler in one more untimed run each")  # fmt: skip
    p.add_argument("--heap", action="store_true",
                   help="flux: also where ours' resident set is at its peak (the C library's heap: in use, kept "
                        "free, mmapped; other anonymous and file-backed pages), bf16 and fp8 base, one more "
                        "untimed run each; glibc only")  # fmt: skip
    p.add_argument("--keep-casts", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--weight-dtype", default="bf16", choices=["bf16", "fp8_e4m3fn"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        base = Path(args.base)
        workers = {("ours", "sd15"): worker_ours, ("core", "sd15"): worker_core}
        if args.model == "flux":
            import train_flux_case

            workers = {
                ("ours", "flux"): train_flux_case.worker_ours,
                ("core", "flux"): train_flux_case.worker_core,
            }
        result = workers[args.worker, args.model](args, base)
        result["peak_rss_gb"] = _status_gb("VmHWM")  # since the checkpoint was loaded
        result["max_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
        print("RESULT " + json.dumps(result), flush=True)
        return
    started = time.time()
    if args.model == "flux":
        import train_flux_case

        train_flux_case.compare(args)
    else:
        for res in (64, 256) if args.full else (64,):
            compare(args, res)
    print(f"\n(total {time.time() - started:.0f} s; command: {' '.join(sys.argv)})")


if __name__ == "__main__":
    main()
