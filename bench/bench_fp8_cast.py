"""Benchmark: casting a frozen fp8 (e4m3fn) base for training on the CPU, against a bf16 base.

Train LoRA computes a bf16 or fp8 base in float32 (or autocast's bf16) a piece of at most 4M
weights at a time, three times per step and layer (a checkpointed block's first forward, its
recompute, its backward): lora_core/train/hooks.py. This times, on Flux-width layers (a single
block's linear1 and linear2, a double block's qkv and MLP), each weight cast a piece at a time
from memory (the pieces are not in the CPU's cache, as in a run):

  bf16 -> float32              the baseline: one vectorised pass
  PyTorch's fp8 cast           weight.to(float32): one value at a time on the CPU
  fp8, checked bit cast        _cast: the piece read for NaN codes, then placed into float16 by
                               its bits and multiplied by 256 (what a piece holding a NaN code, or
                               a float16 product, takes)
  fp8, three-pass cast         _e4m3fn_over_256: what a run takes once the weight was read for NaN
                               codes (FiniteCodes): the 256 is folded into the product

then the layers' forward and input-gradient products at --tokens tokens (cast_linear and
cast_linear_input_grad) with bf16 and with fp8 weights. Ratios are against bf16 in the same run;
the best of --repeat rounds counts.

    .venv/bin/python bench/bench_fp8_cast.py [--tokens 512] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time

from bench_train import _pack

# (name, rows, columns): Flux's single block linear1 / linear2, a double block's qkv and MLP in
LAYERS = (("single linear1", 21504, 3072), ("single linear2", 3072, 15360),
          ("double qkv", 9216, 3072), ("double mlp.0", 12288, 3072))  # fmt: skip


def _hooks():
    _pack()
    from lora_foundry.lora_core.train import hooks

    return hooks


def _best(fn, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=512, help="rows of the products (Flux at 256x256: 512)")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    import torch

    hooks = _hooks()
    g = torch.Generator().manual_seed(0)
    layers = []
    for name, rows, cols in LAYERS:
        weight = torch.randn(rows, cols, generator=g) * 0.03
        layers.append((name, weight.bfloat16(), weight.to(torch.float8_e4m3fn)))
    pieces = 0
    for _, bf16, _ in layers:
        pieces += -(-bf16.shape[0] // hooks._piece_rows(bf16))

    def cast_all(which: int, cast) -> None:
        for layer in layers:
            weight = layer[which]
            rows = hooks._piece_rows(weight)
            for start in range(0, weight.shape[0], rows):
                cast(weight[start : start + rows], torch.float32)

    casts = [
        ("bf16 -> float32 (baseline)", 1, lambda w, d: w.to(d)),
        ("PyTorch's fp8 cast", 2, lambda w, d: w.to(d)),
        ("fp8, checked bit cast", 2, hooks._cast),
        ("fp8, three-pass cast", 2, hooks._e4m3fn_over_256),
    ]
    print(f"{len(LAYERS)} Flux-width layers, {pieces} pieces of at most {hooks.PIECE_ELEMENTS} weights, "
          f"{torch.get_num_threads()} threads, best of {args.repeat}")  # fmt: skip
    print(f"\n{'cast, per piece':34}{'ms':>8}{'vs bf16':>9}")
    base = None
    for label, which, cast in casts:
        ms = _best(lambda c=cast, i=which: cast_all(i, c), args.repeat) / pieces * 1e3
        base = base or ms
        print(f"{label:34}{ms:8.3f}{ms / base:8.2f}x")

    x = {cols: torch.randn(args.tokens, cols, generator=g) for _, _, cols in LAYERS}
    grad = {rows: torch.randn(args.tokens, rows, generator=g) for _, rows, _ in LAYERS}

    def products(which: int, finite: bool) -> None:
        for layer in layers:
            weight = layer[which]
            rows, cols = weight.shape
            hooks.cast_linear(x[cols], weight, None, finite)
            hooks.cast_linear_input_grad(grad[rows], weight, finite)

    print(f"\n{'forward + input gradient, ' + str(args.tokens) + ' tokens':44}{'s':>8}{'bf16 / this':>13}")
    base = None
    for label, which, finite in (("bf16 base (baseline)", 1, False), ("fp8 base, checked bit cast", 2, False),
                                 ("fp8 base, three-pass cast", 2, True)):  # fmt: skip
        s = _best(lambda i=which, f=finite: products(i, f), args.repeat)
        base = base or s
        print(f"{label:44}{s:8.3f}{base / s:12.2f}x")
    print("(bf16 / this: the fp8 base's speed as a fraction of the bf16 base's; 1.00x is the same speed)")


if __name__ == "__main__":
    main()
