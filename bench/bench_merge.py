"""Benchmark: our factored svd_merge against kohya's svd_merge_lora method, same run, same inputs.

Synthetic inputs, no ComfyUI: 3 rank-32 LoRAs over the 264 modules a kohya SD1.5 LoRA
trains (UNet: 16 transformer blocks x (attn1 q/k/v/out, attn2 q/k/v/out, ff.net.0.proj,
ff.net.2, proj_in, proj_out) = 192; CLIP-L: 12 layers x (q/k/v/out_proj, fc1, fc2) = 72),
merged to rank 64. Each method runs in its own subprocess; peak memory is the growth of the
process's resident set (VmHWM after resetting it via /proc/self/clear_refs, minus VmRSS at
the reset), so it counts torch's allocations, not just Python objects.

    .venv/bin/python bench/bench_merge.py            # all 264 modules
    .venv/bin/python bench/bench_merge.py --quick    # without the 72 modules of the dim-1280 blocks
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = (1.0, 0.7, 0.5)
CLAMP_QUANTILE = 0.99  # kohya-ss/sd-scripts networks/svd_merge_lora.py


def unet_modules(skip_1280: bool) -> list[tuple[str, int, int]]:
    """(kohya name, out, in) for the SD1.5 UNet transformer blocks; context dim 768."""
    blocks = [("down_blocks", 0, 320, 2), ("down_blocks", 1, 640, 2), ("down_blocks", 2, 1280, 2)]
    blocks += [("mid_block", None, 1280, 1)]
    blocks += [("up_blocks", 1, 1280, 3), ("up_blocks", 2, 640, 3), ("up_blocks", 3, 320, 3)]
    modules = []
    for kind, index, dim, count in blocks:
        if skip_1280 and dim == 1280:
            continue
        for a in range(count):
            base = (
                f"lora_unet_{kind}_{index}_attentions_{a}"
                if index is not None
                else f"lora_unet_{kind}_attentions_0"
            )
            tb = f"{base}_transformer_blocks_0"
            shapes = [(f"{base}_proj_in", dim, dim), (f"{base}_proj_out", dim, dim)]
            for attn in ("attn1", "attn2"):
                context = dim if attn == "attn1" else 768
                shapes += [(f"{tb}_{attn}_to_q", dim, dim), (f"{tb}_{attn}_to_k", dim, context)]
                shapes += [(f"{tb}_{attn}_to_v", dim, context), (f"{tb}_{attn}_to_out_0", dim, dim)]
            shapes += [(f"{tb}_ff_net_0_proj", 8 * dim, dim), (f"{tb}_ff_net_2", dim, 4 * dim)]
            modules += shapes
    return modules


def clip_modules() -> list[tuple[str, int, int]]:
    modules = []
    for layer in range(12):
        base = f"lora_te_text_model_encoder_layers_{layer}"
        modules += [(f"{base}_self_attn_{p}_proj", 768, 768) for p in ("q", "k", "v", "out")]
        modules += [(f"{base}_mlp_fc1", 3072, 768), (f"{base}_mlp_fc2", 768, 3072)]
    return modules


def module_list(quick: bool) -> list[tuple[str, int, int]]:
    return unet_modules(skip_1280=quick) + clip_modules()


def make_loras(modules, rank: int) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per module, 3 LoRAs (up (out, r), down (r, in)) with a decaying spectrum, scale folded in."""
    loras = {}
    decay = torch.exp(-torch.arange(rank, dtype=torch.float32) / 8.0)  # trained LoRAs are far from flat
    for index, (name, out, inp) in enumerate(modules):
        g = torch.Generator().manual_seed(1000 + index)
        loras[name] = [
            (
                torch.randn(out, rank, generator=g) * decay * 0.05,
                torch.randn(rank, inp, generator=g) / math.sqrt(inp),
            )
            for _ in WEIGHTS
        ]
    return loras


def merge_ours(loras, new_rank: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from lora_foundry.lora_core.merge.lowrank import Factors
    from lora_foundry.lora_core.merge.merge import svd_merge

    out = {}
    for name, pairs in loras.items():
        merged = svd_merge([Factors(up, down) for up, down in pairs], WEIGHTS, new_rank)
        out[name] = (merged.up, merged.down)
    return out


def merge_kohya(
    loras, new_rank: int, full_matrices: bool = True
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """kohya's method: every dense delta summed first, then per module a full torch.linalg.svd,
    S folded into U, truncation, and a clamp of U and Vh at the 0.99 quantile of their values."""
    merged_sd = {}
    for name, pairs in loras.items():
        weight = torch.zeros(pairs[0][0].shape[0], pairs[0][1].shape[1])
        for (up, down), ratio in zip(pairs, WEIGHTS, strict=True):
            weight = weight + ratio * (up @ down) * 1.0  # scale alpha / dim is already in up
        merged_sd[name] = weight
    out = {}
    for name, mat in merged_sd.items():
        rank = min(new_rank, mat.shape[0], mat.shape[1])
        u, s, vh = torch.linalg.svd(mat, full_matrices=full_matrices)
        u = u[:, :rank] @ torch.diag(s[:rank])
        vh = vh[:rank, :]
        hi_val = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), CLAMP_QUANTILE)
        out[name] = (u.clamp(-hi_val, hi_val).contiguous(), vh.clamp(-hi_val, hi_val).contiguous())
    return out


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(method: str, quick: bool, rank: int, new_rank: int, out_path: str) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    import conftest  # noqa: F401  registers the repository as the package lora_foundry

    loras = make_loras(module_list(quick), rank)
    thin = lambda loras_, rank_: merge_kohya(loras_, rank_, full_matrices=False)  # noqa: E731
    merge = {"ours": merge_ours, "kohya": merge_kohya, "kohya_thin": thin}[method]
    merge(dict(list(loras.items())[:2]), new_rank)  # warm-up: first-call costs of LAPACK and the allocator
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    base_kb = _status_kb("VmRSS")
    start = time.perf_counter()
    result = merge(loras, new_rank)
    seconds = time.perf_counter() - start
    peak_kb = _status_kb("VmHWM") - base_kb
    tensors = {
        f"{n}.{side}": t.contiguous() for n, (u, d) in result.items() for side, t in (("up", u), ("down", d))
    }
    save_file(tensors, out_path)
    print(json.dumps({"method": method, "seconds": seconds, "peak_mb": peak_kb / 1024}))


def run_worker(method: str, args, folder: str) -> dict:
    out_path = str(Path(folder) / f"{method}.safetensors")
    command = [
        sys.executable,
        __file__,
        "--worker",
        method,
        "--rank",
        str(args.rank),
        "--new-rank",
        str(args.new_rank),
    ]
    command += ["--out", out_path] + (["--quick"] if args.quick else [])
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    record = json.loads(done.stdout.strip().splitlines()[-1])
    record["factors"] = load_file(out_path)
    return record


def _fro2(up: torch.Tensor, down: torch.Tensor) -> float:
    return float(((up.T @ up) * (down @ down.T)).sum())  # ||up @ down||_F^2 from r x r Grams


def _stacked(pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact weighted sum as float64 factors: [w1*B1 | ...] (out, 96) and [A1; ...] (96, in)."""
    ups = torch.cat([up.double() * w for (up, _), w in zip(pairs, WEIGHTS, strict=True)], dim=1)
    return ups, torch.cat([down.double() for _, down in pairs], dim=0)


def optimum_errors(loras, new_rank: int) -> list[float]:
    """Per module, the Eckart-Young error of the best rank-k approximation, from the exact
    spectrum of the sum (float64 QR of both stacked factors, singular values of the core)."""
    found = []
    for pairs in loras.values():
        ups, downs = _stacked(pairs)
        s = torch.linalg.svdvals(torch.linalg.qr(ups)[1] @ torch.linalg.qr(downs.T)[1].T)
        found.append(math.sqrt(float((s[new_rank:] ** 2).sum()) / float((s**2).sum())))
    return found


def errors(loras, factors) -> list[float]:
    """Per module, the relative Frobenius error of the merged factors against the exact sum."""
    found = []
    for name, pairs in loras.items():
        ups, downs = _stacked(pairs)
        up, down = factors[f"{name}.up"].double(), factors[f"{name}.down"].double()
        diff = _fro2(torch.cat([up, -ups], dim=1), torch.cat([down, downs], dim=0))
        found.append(math.sqrt(max(diff, 0.0) / _fro2(ups, downs)))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the 72 modules of the dim-1280 blocks")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--new-rank", type=int, default=64)
    parser.add_argument("--thin", action="store_true", help="also run kohya's method with a thin SVD")
    parser.add_argument("--worker", choices=["ours", "kohya", "kohya_thin"])
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.worker:
        worker(args.worker, args.quick, args.rank, args.new_rank, args.out)
        return
    modules = module_list(args.quick)
    print(
        f"{len(modules)} modules, 3 LoRAs of rank {args.rank} -> rank {args.new_rank}, torch {torch.__version__}"
    )
    loras = make_loras(modules, args.rank)
    methods = ["ours", "kohya"] + (["kohya_thin"] if args.thin else [])
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as folder:
        records = {m: run_worker(m, args, folder) for m in methods}
    # Wall-clock ratios are only meaningful on an otherwise idle machine: say how busy it was.
    print(
        f"1-min load average: {load_before:.2f} before, {os.getloadavg()[0]:.2f} after ({os.cpu_count()} CPUs)"
    )
    ours = records["ours"]
    optimum = optimum_errors(loras, args.new_rank)
    print(f"optimum (Eckart-Young) mean relative error: {sum(optimum) / len(optimum):.6f}")
    for method, record in records.items():
        found = errors(loras, record["factors"])
        excess = sum(f / o - 1 for f, o in zip(found, optimum, strict=True) if o > 0) / len(found)
        print(
            f"{method:>10}: {record['seconds']:7.2f} s, peak RSS growth {record['peak_mb']:8.1f} MB, "
            f"mean rel. error {sum(found) / len(found):.6f} (mean excess over optimum {100 * excess:.3f}%)"
        )
    for method in methods[1:]:
        speed = records[method]["seconds"] / ours["seconds"]
        memory = records[method]["peak_mb"] / max(ours["peak_mb"], 1e-9)
        print(f"ours vs {method}: {speed:.1f}x faster, {memory:.1f}x less peak memory")


if __name__ == "__main__":
    main()
