"""Benchmark: the per-forward patch (LowVramPatch) on the full-size demo SD1.5 in bf16, against core.

When ComfyUI leaves weights on the fly (a partial low-VRAM load; on 0.12 with dynamic VRAM, every
patched weight), each layer casts its weight to the compute dtype at every forward of every
sampling step and calls ``LowVramPatch``, which runs the patch in that dtype. This script makes
the calls of one UNet forward, for every weight a 5-LoRA rank-32 stack patches: a fresh bf16 copy
of the weight (untimed, as the layer makes it), then ``LowVramPatch(key, patches)(copy)`` (timed),
for Apply LoRA Stack's patches and for 5 chained core LoraLoader nodes' on the same weights and
files. Rounds alternate the sides (order reversed every other round, one warm-up round); the
per-round ratio core / ours is printed with its range.

Then, untimed, per weight and side:
  peak extra memory : the most bytes PyTorch's CPU allocator had handed out during the call
                      (torch.profiler's memory events, scripts/alloc_peak.py; allocations outside
                      PyTorch's allocator, such as BLAS scratch, are not seen), as a multiple of
                      the weight's own size in bf16;
  accuracy          : the result against float64 (core's own adapters run in float64 on the same
                      bf16 input), mean and worst absolute error over all weights.

    .venv/bin/python bench/bench_lowvram_patch.py [--rounds 5] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_lora_apply as base  # noqa: E402  (sets up ComfyUI and the pack, as that benchmark does)
import comfy.lora  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sd  # noqa: E402
import folder_paths  # noqa: E402
from alloc_peak import peak_bytes  # noqa: E402  (scripts/, on the path set by bench_lora_apply)
from safetensors.torch import save_file  # noqa: E402


def one_forward(patcher, weights: dict[str, torch.Tensor], dtype: torch.dtype) -> float:
    """Seconds in LowVramPatch over every patched weight: one UNet forward's worth of calls."""
    total = 0.0
    for key in patcher.patches:
        work = weights[key].to(dtype, copy=True)  # the layer's cast copy, not timed
        patch = comfy.model_patcher.LowVramPatch(key, patcher.patches)
        t = time.perf_counter()
        patch(work)
        total += time.perf_counter() - t
    return total


def memory_and_accuracy(ours, core, weights, dtype) -> dict[str, dict[str, float]]:
    """Per side: worst peak / weight size, peak summed over weights / sizes summed, errors vs float64."""
    out = {side: {"worst": 0.0, "peak": 0, "err": 0.0, "max_err": 0.0} for side in ("core", "ours")}
    size_total = count = 0
    for key in ours.patches:
        w = weights[key].to(dtype)
        size = w.numel() * w.element_size()
        exact = comfy.lora.calculate_weight(
            core.patches[key], w.double(), key, intermediate_dtype=torch.float64
        )
        for side, patcher in (("core", core), ("ours", ours)):
            work = w.clone()
            peak, result = peak_bytes(
                lambda p=patcher, x=work, k=key: comfy.model_patcher.LowVramPatch(k, p.patches)(x)
            )
            err = (result.double() - exact).abs()
            stats = out[side]
            stats["worst"] = max(stats["worst"], peak / size)
            stats["peak"] += peak
            stats["err"] += err.sum().item()
            stats["max_err"] = max(stats["max_err"], err.max().item())
        size_total += size
        count += w.numel()
    for stats in out.values():
        stats["peak"] /= size_total
        stats["err"] /= count
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds per side (default 5)")
    ap.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16", help="compute dtype")
    ap.add_argument(
        "--checkpoint", type=Path, default=None, help="default: the demo SD1.5 (ComfyUI's, else .comfyui's)"
    )
    args = ap.parse_args()
    ckpt = args.checkpoint or next(
        (
            p
            for p in (base.CKPT, base.REPO / ".comfyui" / "models" / "checkpoints" / base.CKPT.name)
            if p.exists()
        ),
        base.CKPT,
    )
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"checkpoint: {ckpt}; torch {torch.__version__}; threads {torch.get_num_threads()}; {dtype}")
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(
        str(ckpt), output_vae=False, output_clip=True, model_options={"dtype": dtype}
    )
    tmp = Path(tempfile.mkdtemp(prefix="lf_bench_"))
    folder_paths.folder_names_and_paths["loras"] = ([str(tmp)], folder_paths.supported_pt_extensions)
    names = []
    for i in range(5):
        names.append(f"bench_{i}.safetensors")
        save_file(base.make_lora(model, clip, 32, seed=i), str(tmp / names[-1]))
    entries = list(zip(names, base.STRENGTHS, strict=True))
    ours = base.stack_ours(model, clip, entries)[0]
    core = base.chain_core(model, clip, entries)[0]
    assert set(ours.patches) == set(core.patches)
    weights = model.model.state_dict()
    n_elems = sum(weights[k].numel() for k in ours.patches)
    print(f"5 LoRAs of rank 32 (fp16 files), strengths {base.STRENGTHS}; {len(ours.patches)} patched UNet weights, "
          f"{n_elems / 1e6:.0f} M values ({n_elems * 2 / 2**20:.0f} MiB in {args.dtype})\n")  # fmt: skip

    times = base.interleaved(
        {
            "core": lambda: one_forward(core, weights, dtype),
            "ours": lambda: one_forward(ours, weights, dtype),
        },
        args.rounds,
    )
    ratios = sorted(c / o for c, o in zip(times["core"], times["ours"], strict=True))
    t_core, t_ours = statistics.median(times["core"]), statistics.median(times["ours"])
    print(f"LowVramPatch calls of one UNet forward ({args.rounds} rounds, medians): core {t_core:.3f} s, "
          f"ours {t_ours:.3f} s, core / ours {t_core / t_ours:.2f}x "
          f"(per round {ratios[0]:.2f}x to {ratios[-1]:.2f}x, median {statistics.median(ratios):.2f}x)")  # fmt: skip

    stats = memory_and_accuracy(ours, core, weights, dtype)
    for side in ("core", "ours"):
        s = stats[side]
        print(f"{side}: peak extra memory per call, worst weight {s['worst']:.4f}x its {args.dtype} size, "
              f"over all weights {s['peak']:.4f}x; error vs float64 mean {s['err']:.3e}, worst {s['max_err']:.3e}")  # fmt: skip
    print(f"mean error core / ours: {stats['core']['err'] / stats['ours']['err']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
