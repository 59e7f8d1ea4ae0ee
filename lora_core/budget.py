"""Memory budgets: what a node's settings will allocate, estimated before anything is built and
compared with the memory available, so settings that cannot fit are refused with a clear error.

The estimates are floors, not forecasts: each counts only memory the work cannot do without
(the LoRA's own weights, gradients and optimizer state; the skip connections a UNet keeps for
its decoder; the output factors of a merge). A refusal therefore means the settings clearly
cannot fit; settings that pass may still need more than the estimate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# Optimizer state per trained value, in bytes (AdamW: exp_avg + exp_avg_sq in float32; AdamW8bit:
# two 8-bit states; Prodigy: exp_avg, exp_avg_sq, s and p0; SGD: momentum; Lion: exp_avg).
OPTIMIZER_STATE_BYTES = {"AdamW": 8, "Adam": 8, "Lion": 4, "SGD": 4, "AdamW8bit": 2, "Prodigy": 16}
TRAINED_VALUE_BYTES = 4 + 4  # the float32 LoRA weight and its gradient
ACTIVATION_BYTES = 2  # half precision: the least any compute dtype takes
DTYPE_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}


class MemoryBudgetError(ValueError):
    """Settings whose estimated memory exceeds what is available; names the inputs and the fix."""


@dataclass(frozen=True)
class MemoryNeed:
    """An estimate of what settings will allocate, with the words the error needs."""

    parts: tuple[tuple[str, int], ...]  # (what, bytes)
    inputs: str  # the inputs that set it, as the node names them
    fix: str  # what to lower

    @property
    def total(self) -> int:
        return sum(n for _, n in self.parts)


def format_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def check_fits(need: MemoryNeed, available: int | None, where: str) -> None:
    """Raises MemoryBudgetError when the estimate exceeds ``available`` bytes (None: not known)."""
    if available is None or need.total <= available:
        return
    parts = ", ".join(f"{what} {format_bytes(n)}" for what, n in need.parts if n)
    raise MemoryBudgetError(
        f"{need.inputs} need at least {format_bytes(need.total)} ({parts}), but only "
        f"{format_bytes(available)} is available on {where}: {need.fix}"
    )


# --- training -----------------------------------------------------------------------------


def lora_value_count(weight_shapes: Iterable[tuple[int, ...]], rank: int, dora: bool = False) -> int:
    """Trained values of LoRA branches on weights of these shapes: rank x (in x kernel + out) each,
    plus DoRA's magnitude (in) per layer."""
    total = 0
    for shape in weight_shapes:
        d_out, d_in, kernel = int(shape[0]), int(shape[1]), math.prod(int(k) for k in shape[2:])
        total += rank * (d_in * kernel + d_out) + (d_in if dora else 0)
    return total


def unet_skip_values(unet_config: Mapping, latent_h: int, latent_w: int) -> int:
    """Values per sample of the outputs a UNet's input blocks keep for its output blocks (the skip
    connections), from ComfyUI's unet_config; 0 when the config is not a UNet's."""
    try:
        ch = int(unet_config["model_channels"])
        mults = [int(m) for m in unet_config["channel_mult"]]
        res = unet_config["num_res_blocks"]
        res_blocks = [int(res)] * len(mults) if isinstance(res, int) else [int(r) for r in res]
    except (KeyError, TypeError, ValueError):
        return 0
    h, w = latent_h, latent_w
    total = ch * h * w  # input_blocks.0: the first convolution
    for level, (mult, n) in enumerate(zip(mults, res_blocks, strict=False)):
        total += n * mult * ch * h * w
        if level < len(mults) - 1:  # the downsampling block (stride 2, padding 1)
            h, w = (h + 1) // 2, (w + 1) // 2
            total += mult * ch * h * w
    return total


@dataclass(frozen=True)
class TrainSettings:
    """The Train LoRA inputs the estimate depends on."""

    rank: int
    dora: bool
    optimizer: str
    batch_size: int
    resolution: int
    targets: str
    blocks: str = ""


def train_need(
    weight_shapes: list[tuple[int, ...]], settings: TrainSettings, unet_config: Mapping | None
) -> MemoryNeed:
    """Floor of a training run's memory beyond the model itself."""
    values = lora_value_count(weight_shapes, settings.rank, settings.dora)
    per_value = TRAINED_VALUE_BYTES + OPTIMIZER_STATE_BYTES.get(settings.optimizer, 0)
    latent = max(1, settings.resolution // 8)
    skips = unet_skip_values(unet_config or {}, latent, latent)
    # DoRA forms W + dW of every adapted layer each step and keeps it for the backward pass.
    dora = (
        sum(int(s[0]) * math.prod(int(k) for k in s[1:]) * 4 for s in weight_shapes) if settings.dora else 0
    )
    where = f"`targets` {settings.targets}" + (
        f", `blocks` {settings.blocks.strip()[:40]}" if settings.blocks.strip() else ""
    )
    return MemoryNeed(
        parts=(
            (f"LoRA weights, gradients and {settings.optimizer} state", values * per_value),
            ("DoRA's W + dW per layer", dora),
            ("activations the UNet keeps for its decoder", settings.batch_size * skips * ACTIVATION_BYTES),
        ),
        inputs=(
            f"`rank` {settings.rank} on {len(weight_shapes)} layers ({where}) with `batch_size` "
            f"{settings.batch_size} at resolution {settings.resolution}"
        ),
        fix=(
            "lower `rank`, train fewer layers (`targets`, `blocks`), or lower `batch_size` or the data set's "
            "resolution (`grad_accum` gives a larger effective batch without the memory)"
        ),
    )


# --- merge and resize ---------------------------------------------------------------------


def factors_need(
    modules: Iterable[tuple[int, int, int]], dtype: str, dense_peak: int, inputs: str, fix: str
) -> MemoryNeed:
    """A LoRA file being built: per module (out, in, rank) its float32 factors, plus their copy in
    the save dtype (none for fp32), plus ``dense_peak`` bytes of the largest per-module work."""
    values = sum(rank * (d_out + d_in) for d_out, d_in, rank in modules)
    copy = DTYPE_BYTES.get(dtype, 4) if dtype not in ("fp32", "float32") else 0
    return MemoryNeed(
        parts=(("output factors", values * (4 + copy)), ("the largest module's dense work", dense_peak)),
        inputs=inputs,
        fix=fix,
    )


# --- images -------------------------------------------------------------------------------


def image_need(width: int, height: int, channels: int = 3) -> MemoryNeed:
    """One image of the target size and its source cut to that size, 8 bits a channel (Prepare
    Images holds both while resizing)."""
    return MemoryNeed(
        parts=(("the image and its resized copy", 2 * width * height * channels),),
        inputs=f"`width` x `height` {width} x {height}",
        fix="lower `width` and `height` (or `resolution` for buckets)",
    )
