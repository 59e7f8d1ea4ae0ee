"""Bypass mode in ComfyUI: a stack's terms run on layer activations (lora_core.apply.bypass) through forward
hooks that the ModelPatcher injects when it loads the model and ejects when it unloads it.

ModelPatcher's injections (``set_injections`` with ``comfy.patcher_extension.PatcherInjection``)
exist in 0.3.75 and 0.12.1 alike; ComfyUI's own bypass loader (0.12's comfy/weight_adapter/bypass.py)
uses them too, but swaps ``module.forward``, which breaks when two injections on one layer are
ejected in the order they were injected. Torch hook handles are removed in any order, so chained
Load LoRA nodes in bypass mode compose. A clone shares its source's injection objects; only one
clone of a model is loaded at a time (ComfyUI unloads the others first), and inject / eject here
are idempotent, so a clone that inherited ``is_injected`` from a loaded source (ModelPatcher.clone
copies the flag) is still set right: patch_model ejects and re-injects it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import comfy.patcher_extension
import torch

from ..lora_core.apply.bypass import BypassPatch, Layer, Target, refusal
from ..lora_core.apply.patching import Term
from . import comfy_bridge as bridge

INJECTION_KEY = "lora_foundry_bypass"


@dataclass
class BypassOutcome:
    """What bypass mode did with one side's patches: layers hooked, and targets patched instead (key -> reason)."""

    hooked: int = 0
    patched: dict[str, str] = field(default_factory=dict)

    def note(self, side: str) -> str:
        text = f"bypass mode ({side}): {self.hooked} weights applied on activations, base weights untouched"
        if self.patched:
            reasons = sorted(set(self.patched.values()))
            text += f"; {len(self.patched)} patched instead ({'; '.join(reasons)[:300]})"
        return text


def layer_of(module) -> Layer | None:
    """The Linear / convolution geometry of ``module``; None for anything else (norms, embeddings...).
    Read from the module's attributes, not its weight, which may be quantized or offloaded; 0.12's
    mixed-precision Linear is no torch.nn.Linear subclass, but has in_features / out_features."""
    if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
        if module.padding_mode != "zeros":
            return None
        dims = len(module.kernel_size)
        shape = (module.out_channels, module.in_channels // module.groups, *module.kernel_size)
        return Layer(shape, dims, tuple(module.stride), module.padding if isinstance(module.padding, str)
                     else tuple(module.padding), tuple(module.dilation), module.groups)  # fmt: skip
    is_linear = isinstance(module, torch.nn.Linear) or type(module).__name__ == "Linear"
    if is_linear and isinstance(getattr(module, "in_features", None), int):
        return Layer((module.out_features, module.in_features))
    return None


def _split(target) -> tuple[str, tuple | None, object]:
    """(key, offset, function) of a patch target: a key, or ComfyUI's (key, offset[, function]) tuple."""
    if isinstance(target, str):
        return target, None, None
    return target[0], target[1] if len(target) > 1 else None, target[2] if len(target) > 2 else None


def _plan_one(root, target, terms: Sequence[Term]) -> tuple[str, BypassPatch | None, str | None]:
    """(module path, its BypassPatch, None) or (key, None, why it cannot run on activations)."""
    key, offset, function = _split(target)
    path, _, param = key.rpartition(".")
    if param not in ("weight", "bias"):
        return key, None, "not a layer's weight or bias"
    try:
        layer = layer_of(root.get_submodule(path))
    except AttributeError:
        layer = None
    if offset is not None and offset[0] != 0:
        return key, None, "a slice of a fused weight along its inputs"
    rows = None if offset is None else (int(offset[1]), int(offset[2]))
    where = Target(param, rows, function)
    why = refusal(terms, layer, where)
    if why:
        return key, None, why
    return path, BypassPatch(terms, layer, where), None


class _Hooks:
    """The forward hooks of one node's bypass patches: registered on inject, removed on eject."""

    def __init__(self, by_module: Mapping[str, list[BypassPatch]]):
        self.by_module = dict(by_module)
        self.handles: list = []

    def inject(self, patcher) -> None:
        if self.handles:
            return
        root = patcher.model
        for path, patches in self.by_module.items():
            module = root.get_submodule(path)
            scaling = [p for p in patches if p.scales_input]
            if scaling:
                self.handles.append(module.register_forward_pre_hook(_pre_hook(scaling)))
            self.handles.append(module.register_forward_hook(_hook(patches)))

    def eject(self, patcher) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def _pre_hook(patches: list[BypassPatch]):
    def hook(_module, args):
        x = args[0]
        for p in patches:
            x = p.scale_input(x)
        return (x, *args[1:])

    return hook


def _hook(patches: list[BypassPatch]):
    def hook(module, args, output):
        if not args or not isinstance(output, torch.Tensor):
            return output
        bias = getattr(module, "bias", None)
        for p in patches:
            output = p.output(args[0], output, bias)
        return output

    return hook


def apply_bypass(obj, patches: Mapping[object, Sequence[Term]], fallback: bool) -> BypassOutcome:
    """Hooks ``patches`` into ``obj`` (a cloned MODEL ModelPatcher or CLIP) to run on activations.

    Targets that cannot (weight-dependent kinds, non-linear layers) are patched into the weights
    when ``fallback``, else a ValueError names them and why; nothing is changed then.
    """
    patcher = getattr(obj, "patcher", obj)  # a CLIP holds its ModelPatcher
    root = patcher.model
    by_module: dict[str, list[BypassPatch]] = {}
    refused: dict[object, str] = {}
    outcome = BypassOutcome()
    for target, terms in patches.items():
        where, patch, why = _plan_one(root, target, terms)
        if why is not None:
            refused[target] = why
        elif not patch.empty:
            by_module.setdefault(where, []).append(patch)
            outcome.hooked += 1
    if refused and not fallback:
        raise ValueError(refused_message(refused))
    if refused:
        bridge.add_patches(obj, {t: patches[t] for t in refused})
        outcome.patched = {_split(t)[0]: why for t, why in refused.items()}
    if by_module:
        hooks = _Hooks(by_module)
        key = f"{INJECTION_KEY}.{sum(k.startswith(INJECTION_KEY) for k in patcher.injections)}"
        patcher.set_injections(key, [comfy.patcher_extension.PatcherInjection(hooks.inject, hooks.eject)])
    return outcome


def refused_message(refused: Mapping[object, str]) -> str:
    by_reason: dict[str, list[str]] = {}
    for target, why in refused.items():
        by_reason.setdefault(why, []).append(_split(target)[0])
    parts = [
        f"{why}: {len(keys)} weights (e.g. {', '.join(sorted(keys)[:2])})" for why, keys in by_reason.items()
    ]
    return (
        "bypass mode cannot apply these on activations: " + "; ".join(parts) + ". Choose the mode "
        "'bypass (patch what cannot)' to patch those weights and bypass the rest, or 'patch weights'."
    )


def bypass_injection_count(obj) -> int:
    """How many bypass injections of this pack a MODEL / CLIP carries (tests and reports)."""
    patcher = getattr(obj, "patcher", obj)
    return sum(len(v) for k, v in patcher.injections.items() if k.startswith(INJECTION_KEY))
