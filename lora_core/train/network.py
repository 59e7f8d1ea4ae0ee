"""The trainable LoRA network: which layers to adapt, and branches computed on activations.

A branch adds ``s * up(down(x))`` (s = alpha / rank) to a frozen Linear / Conv2d output through
forward hooks, so the base weight is never rebuilt or copied and removing the hooks leaves the
model exactly as it was. ``down`` starts Kaiming-uniform and ``up`` at zero: at step 0 the
adapted model equals the base model. DoRA (column-wise, as the paper and ComfyUI's loader read
a ``dora_scale`` of shape (1, in)) rescales the layer's input by m / ||W + dW||_col.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from ..apply.block_weights import SD_COUNTS, BlockCounts, block_of, check_block_index, check_spec_length

# Module paths (ComfyUI / LDM spelling for the UNet, transformers spelling for CLIP) per preset.
_ATTN = r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$|\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$"
_FF = r"\.ff\.net\.(0\.proj|2)$|\.mlp\.(fc1|fc2)$"
# DiT blocks in ComfyUI's spelling: Flux / Chroma (img_attn / txt_attn qkv and proj; a single
# block's linear1 / linear2 fuse attention with the MLP, and count as attention, as sd-scripts and
# ai-toolkit train them), SD3 (attn.qkv / proj), Qwen-Image (attn.to_q ... to_add_out),
# Lumina2 / Z-Image (attention.qkv / out), Wan (self_attn / cross_attn q, k, v, o).
_DIT_ATTN = (
    r"_attn\.(qkv|proj)$|\.attn\.(qkv|proj|to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$"
    r"|single_blocks\.\d+\.(linear1|linear2)$|\.attention\.(qkv|out)$|\.(self_attn|cross_attn)\.(q|k|v|o)$"
)
_DIT_FF = r"_mlp\.(0|2)$|_mlp\.net\.(0\.proj|2)$|\.feed_forward\.(w1|w2|w3)$|\.ffn\.(0|2)$"
_ATTN = f"{_ATTN}|{_DIT_ATTN}"
_FF = f"{_FF}|{_DIT_FF}"
TargetPreset = Literal["attention", "attention_ff", "all_linear", "all_linear_conv"]
TARGETS: tuple[str, ...] = get_args(TargetPreset)
TARGET_HELP = {
    "attention": "to_q, to_k, to_v, to_out of self- and cross-attention (CLIP: q/k/v/out_proj; DiTs: their "
    "attention projections, Flux single blocks' linear1/linear2)",
    "attention_ff": "attention plus the feed-forward layers (CLIP: mlp.fc1/fc2; DiTs: their MLPs)",
    "all_linear": "every Linear layer and 1x1 convolution",
    "all_linear_conv": "every Linear layer and every convolution (LoCon)",
}


@dataclass(frozen=True, eq=False)
class Target:
    """One layer that may be adapted: its kohya module name, its path in the model, the module."""

    name: str  # e.g. lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q
    path: str  # e.g. diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q
    module: nn.Module


def is_linear(module: nn.Module) -> bool:
    """A Linear: torch's (ComfyUI's ops subclass it), or a layer named Linear with a Linear's
    geometry (ComfyUI 0.12's mixed-precision Linear, whose weight may be a QuantizedTensor, is a
    plain Module with in_features / out_features)."""
    if isinstance(module, nn.Linear):
        return True
    return (
        type(module).__name__ == "Linear"
        and isinstance(getattr(module, "in_features", None), int)
        and isinstance(getattr(module, "out_features", None), int)
        and isinstance(getattr(module, "weight", None), Tensor)
        and tuple(module.weight.shape) == (module.out_features, module.in_features)
    )


def is_adaptable(module: nn.Module) -> bool:
    """A Linear (see is_linear), or an ungrouped zero-padded Conv2d (ComfyUI's ops subclass these)."""
    if is_linear(module):
        return True
    return isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"


def _matches_preset(target: Target, preset: str) -> bool:
    module = target.module
    if preset == "attention":
        return re.search(_ATTN, target.path) is not None
    if preset == "attention_ff":
        return re.search(_ATTN, target.path) is not None or re.search(_FF, target.path) is not None
    is_1x1 = isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1)
    if preset == "all_linear":
        return is_linear(module) or is_1x1
    if preset == "all_linear_conv":
        return True
    raise ValueError(f"`targets` should be one of {', '.join(TARGETS)}, got {preset!r}")


def parse_blocks(spec: str, counts: BlockCounts | None = None) -> set[str] | None:
    """'in4-8, mid, out0-5' -> {'IN04', ..., 'MID', 'OUT00', ...}; empty -> None (every block).

    Every index is checked against ``counts`` (the model's blocks; SD1.x's when not given) before
    any set is built, so a range like in0-99999999999 is an error, not 100 billion names.
    """
    check_spec_length(spec, "blocks")
    counts = counts or SD_COUNTS
    text = spec.strip()
    if not text:
        return None
    blocks: set[str] = set()
    for part in re.split(r"[,\s]+", text.upper()):
        if not part:
            continue
        if part in ("MID", "BASE", "IN", "OUT"):
            blocks |= (
                {part} if part in ("MID", "BASE") else {f"{part}{i:02d}" for i in range(counts.count(part))}
            )
            continue
        m = re.fullmatch(r"(IN|OUT)(\d+)(?:-(\d+))?", part)
        if m is None:
            raise ValueError(
                f"`blocks` entry {part[:40]!r} is not understood: use e.g. 'in4-8, mid, out0-5' "
                "(in/out with indices or ranges, mid, base), or leave it empty for every block"
            )
        lo = check_block_index(m[1], m[2], counts, "blocks", part)
        hi = lo if m[3] is None else check_block_index(m[1], m[3], counts, "blocks", part)
        blocks |= {f"{m[1]}{i:02d}" for i in range(min(lo, hi), max(lo, hi) + 1)}
    return blocks


def _block_name(path: str) -> str:
    block = block_of(path)
    return block if block == "BASE" else f"{block[0]}{block[1]:02d}" if block[0] != "MID" else "MID"


def select_targets(
    candidates: Iterable[Target], preset: str, blocks: str = "", counts: BlockCounts | None = None
) -> list[Target]:
    """The candidates a preset and an optional block selection (checked against ``counts``, the
    model's blocks) keep, sorted by name."""
    if preset not in TARGETS:
        raise ValueError(f"`targets` should be one of {', '.join(TARGETS)}, got {preset!r}")
    wanted = parse_blocks(blocks, counts)
    chosen = [
        t
        for t in candidates
        if is_adaptable(t.module)
        and _matches_preset(t, preset)
        and (wanted is None or _block_name(t.path) in wanted)
    ]
    return sorted(chosen, key=lambda t: t.name)


def _kaiming_uniform(shape: Sequence[int], fan_in: int, generator: torch.Generator) -> Tensor:
    # nn.Linear's default (kaiming_uniform_ with a = sqrt(5)): bound 1 / sqrt(fan_in).
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(tuple(shape), generator=generator) * 2 - 1) * bound


def column_norm(weight: Tensor) -> Tensor:
    """||W||_c per input column (over out and kernel dims): (in,)."""
    return weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)


class LoraBranch(nn.Module):
    """down (r, in[, kh, kw]), up (out, r[, 1, 1]), optional DoRA magnitude (1, in[, 1, 1])."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dora: bool, generator: torch.Generator):
        super().__init__()
        weight = base.weight
        self.conv = isinstance(base, nn.Conv2d)
        self.rank, self.alpha, self.scale = rank, float(alpha), float(alpha) / rank
        d_out, d_in = int(weight.shape[0]), int(weight.shape[1])
        kernel = tuple(weight.shape[2:])
        fan_in = d_in * math.prod(kernel)
        self.down = nn.Parameter(_kaiming_uniform((rank, d_in, *kernel), fan_in, generator))
        self.up = nn.Parameter(torch.zeros((d_out, rank, *([1] * len(kernel)))))
        if self.conv:
            self.stride, self.padding, self.dilation = base.stride, base.padding, base.dilation
        self.magnitude = None
        if dora:
            # m = ||W||_c + eps makes the scale exactly 1 at step 0 (ComfyUI adds the same eps).
            norm = column_norm(weight.detach().float()) + torch.finfo(torch.float32).eps
            self.magnitude = nn.Parameter(norm.reshape(1, d_in, *([1] * len(kernel))))

    def delta_out(self, x: Tensor) -> Tensor:
        """s * up(down(x)) for the layer's input x."""
        x = x.to(self.down.dtype) if not torch.is_autocast_enabled(x.device.type) else x
        if self.conv:
            h = F.conv2d(x, self.down, None, self.stride, self.padding, self.dilation)
            return F.conv2d(h, self.up).mul_(self.scale)
        # in place: the product is saved by nothing, and a DiT layer's output is tens of MB
        return F.linear(F.linear(x, self.down), self.up).mul_(self.scale)

    def input_gain(self, weight: Tensor) -> Tensor:
        """DoRA's per-input-channel factor m / (||W + dW||_c + eps), shaped to multiply the input."""
        delta = (self.up.flatten(1) @ self.down.flatten(1)).reshape(
            weight.shape
        ) * self.scale  # (out, r) @ (r, in)
        norm = column_norm(weight.detach().float() + delta) + torch.finfo(torch.float32).eps
        gain = self.magnitude.flatten() / norm
        return gain.reshape(1, -1, 1, 1) if self.conv else gain

    def weights(self) -> dict[str, Tensor]:
        out = {"down": self.down, "up": self.up}
        if self.magnitude is not None:
            out["magnitude"] = self.magnitude
        return out


class LoraNetwork(nn.Module):
    """Branches for a set of targets; ``attach`` hooks them in, ``detach`` removes every hook."""

    def __init__(self, targets: Sequence[Target], rank: int, alpha: float, dora: bool = False, seed: int = 0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"`rank` should be at least 1, got {rank}")
        if not targets:
            raise ValueError("no layers to train: the target preset and block selection matched nothing")
        generator = torch.Generator().manual_seed(seed)
        self.targets = {t.name: t for t in targets}
        self.branches = nn.ModuleDict(
            {t.name: LoraBranch(t.module, rank, alpha, dora, generator) for t in targets}
        )
        self.rank, self.alpha, self.dora = rank, float(alpha), dora
        self._handles: list = []

    def attach(self) -> None:
        if self._handles:
            return
        for name, branch in self.branches.items():
            module = self.targets[name].module
            if branch.magnitude is not None:
                self._handles.append(module.register_forward_pre_hook(_dora_pre_hook(branch, module)))
            self._handles.append(module.register_forward_hook(_add_hook(branch)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def param_groups(self, lr: float, up_ratio: float = 1.0) -> list[dict]:
        """down (and DoRA magnitude) at lr, up at lr * up_ratio (LoRA+)."""
        downs = [p for b in self.branches.values() for p in (b.down, b.magnitude) if p is not None]
        ups = [b.up for b in self.branches.values()]
        return [{"params": downs, "lr": lr}, {"params": ups, "lr": lr * up_ratio}]

    def named_weights(self) -> dict[str, Tensor]:
        """'<kohya name>.<down|up|magnitude>' -> parameter (for training state files)."""
        return {f"{n}.{k}": v for n, b in self.branches.items() for k, v in b.weights().items()}

    def export(self) -> dict[str, dict[str, Tensor]]:
        """kohya name -> {'up', 'down', 'alpha'[, 'dora_scale']} as detached float32 CPU tensors."""
        out = {}
        for name, branch in self.branches.items():
            entry = {
                "up": branch.up.detach().float().cpu(),
                "down": branch.down.detach().float().cpu(),
                "alpha": torch.tensor(branch.alpha),
            }
            if branch.magnitude is not None:
                entry["dora_scale"] = branch.magnitude.detach().float().cpu()
            out[name] = entry
        return out


def _add_hook(branch: LoraBranch) -> Callable:
    def hook(module, args, output):
        delta = branch.delta_out(args[0]).to(output.dtype)
        if output.shape != delta.shape or output.is_inference() or output._base is not None:
            return output + delta
        # in place (same values): no third copy of the layer's output; the layer saved its input
        # and weight for backward, not its output (autograd's version check would refuse otherwise)
        return output.add_(delta)

    return hook


def _dora_pre_hook(branch: LoraBranch, module: nn.Module) -> Callable:
    def hook(mod, args):
        x = args[0]
        gain = branch.input_gain(module.weight)
        return (x * gain.to(x.dtype), *args[1:])

    return hook


def check_before_forward(modules: Iterable[nn.Module], check: Callable[[], None]) -> Callable[[], None]:
    """Calls ``check`` before each module's forward, so a cancel stops a long forward pass within
    one block instead of after the whole micro-step; returns the undo function."""
    handles = [m.register_forward_pre_hook(lambda _m, _args: check()) for m in modules]

    def undo() -> None:
        for handle in handles:
            handle.remove()

    return undo


def _on_copies(function: Callable, *args, **kwargs):
    # A block that adds residuals in place (ComfyUI's DiTs: x += ...) would overwrite the input the
    # checkpoint keeps to recompute it from: the block runs on copies, made anew at each recompute.
    def copy(v):
        return v.clone() if isinstance(v, Tensor) and v.is_floating_point() else v

    return function(*(copy(a) for a in args), **{k: copy(v) for k, v in kwargs.items()})


def checkpoint_forward(modules: Iterable[nn.Module]) -> Callable[[], None]:
    """Gradient checkpointing on each module (recomputed in backward); returns the undo function."""
    patched = []
    for module in modules:
        original = module.forward

        def forward(*args, _original=original, **kwargs):
            if not torch.is_grad_enabled():
                return _original(*args, **kwargs)
            return torch.utils.checkpoint.checkpoint(
                _on_copies, _original, *args, use_reentrant=False, **kwargs
            )

        module.forward = forward
        patched.append(module)

    def undo() -> None:
        for module in patched:
            if "forward" in module.__dict__:
                del module.forward

    return undo
