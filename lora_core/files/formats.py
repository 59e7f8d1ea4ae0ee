"""Parsing: a flat LoRA tensor dict into one adapter record per module, with every key accounted for."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace

from torch import Tensor

from ..adapters import Adapter, BadLayout, DiffAdapter, LoraAdapter, rank_of
from ..adapters.dora import MAGNITUDE_SUFFIXES
from ..adapters.ia3 import VECTOR_ROLE
from ..adapters.registry import KINDS, PARSE_ORDER, suffix_roles
from .lorafile import LoraFileError

# suffix -> (family, role): what each adapter kind owns (lora_core.adapters), plus the extras every
# kind may carry ("extra": alpha, dora_scale, a LoRA's reshape_weight, PEFT's DoRA magnitude) and bias
# diffs. The module name is the key without the suffix, so "x.to_q_lora.up.weight" gives module "x.to_q".
_EXTRAS = {".alpha": "alpha", ".dora_scale": "dora_scale", ".reshape_weight": "reshape"}
_SUFFIXES: dict[str, tuple[str, str]] = {
    **suffix_roles(),
    **{suffix: ("extra", role) for suffix, role in _EXTRAS.items()},
    **{suffix: ("extra", "magnitude") for suffix in MAGNITUDE_SUFFIXES},
    ".diff_b": ("bias", "diff_b"),
    ".b_norm": ("bias", "b_norm"),
}
_BY_LENGTH = sorted(_SUFFIXES, key=len, reverse=True)
# Roles whose tensor is a number or flag, not a factor: any numeric dtype (tools write integer alphas).
_NOT_FACTORS = frozenset({"alpha", "reshape"}).union(*(kind.flag_roles for kind in KINDS))
# Families whose factors are matrices (or conv kernels): a 0-D or 1-D one is no such layout.
_MATRIX_FAMILIES = frozenset(kind.family for kind in KINDS if kind.matrix_factors)
_FIX = "download the file again (it may be damaged) or pick another LoRA"
PEFT_PREFIXES = ("base_model.model.", "unet.base_model.model.")


@dataclass(frozen=True)
class ParsedLora:
    """Adapters by module name (file spelling), bias diffs, keys nothing used, and a format label."""

    modules: dict[str, Adapter]
    unused_keys: tuple[str, ...]
    format: str
    bias_diffs: dict[str, DiffAdapter] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


def split_key(key: str) -> tuple[str, str, str] | None:
    """(module, family, role) for a key with a known suffix, else None."""
    for suffix in _BY_LENGTH:
        if key.endswith(suffix) and len(key) > len(suffix):
            family, role = _SUFFIXES[suffix]
            return key[: -len(suffix)], family, role
    return None


@dataclass
class _Module:
    keys: dict[str, str] = field(default_factory=dict)  # role -> key
    label: str = ""


def _alpha(tensors: dict[str, Tensor], key: str | None, notes: list[str]) -> tuple[float | None, bool]:
    if key is None:
        return None, False
    t = tensors[key]
    if t.numel() != 1:
        notes.append(f"{key}: alpha should be one number, got shape {tuple(t.shape)}; ignored")
        return None, False
    value = t.flatten()[0]
    if value.is_complex():
        notes.append(f"{key}: alpha is a complex number; ignored")
        return None, False
    return float(value.item()), True


def _build(m: _Module, t: dict[str, Tensor], notes: list[str]) -> tuple[Adapter, list[str]] | None:
    """The module's weight patch and the keys it used; kinds are tried in ComfyUI's override order."""
    for kind in PARSE_ORDER:
        built = kind.build(m.keys, t)
        if built is None:
            continue
        m.label = built.label
        adapter, used = built.adapter, built.used
        if not kind.takes_extras:
            return adapter, used
        alpha, alpha_used = _alpha(t, m.keys.get("alpha"), notes)
        dora_key = m.keys.get("dora_scale")
        adapter = _with(adapter, alpha, t[dora_key] if dora_key else None)
        magnitude = m.keys.get("magnitude")
        if magnitude and isinstance(adapter, LoraAdapter) and not dora_key:
            adapter = replace(adapter, dora_scale=t[magnitude], dora_peft=True)
            dora_key = magnitude
        return adapter, used + ([m.keys["alpha"]] if alpha_used else []) + ([dora_key] if dora_key else [])
    return None


def _with(adapter: Adapter, alpha: float | None, dora_scale: Tensor | None) -> Adapter:
    fields = {k: getattr(adapter, k) for k in adapter.__dataclass_fields__}
    fields.update(alpha=alpha, dora_scale=dora_scale)
    return type(adapter)(**fields)


def _label(name: str, label: str) -> str:
    if label == "diffusers" and name.startswith(PEFT_PREFIXES):
        return "PEFT"
    if name.startswith("diffusion_model.") and label in (
        "kohya LoRA",
        "LyCORIS LoHa",
        "LyCORIS LoKr",
        "full diff",
    ):
        return "ComfyUI trainer"
    return label


def _format_label(labels: Counter) -> str:
    if not labels:
        return "unrecognised"
    names = [name for name, _ in labels.most_common()]
    return names[0] if len(names) == 1 else "mixed: " + " + ".join(names)


_ROLE_FAMILY = {role: family for family, role in _SUFFIXES.values()} | {VECTOR_ROLE: "ia3"}


def _check_tensors(m: _Module, tensors: dict[str, Tensor]) -> None:
    """Factors are floating point (an int or bool one would be read as numbers it never meant), and
    matrices where their layout has matrices (a 0-D or 1-D one breaks the math, not just the fit)."""
    for role, key in m.keys.items():
        t = tensors[key]
        if role in _NOT_FACTORS:
            continue
        if not t.is_floating_point():
            raise LoraFileError(
                f"tensor '{key}' is {str(t.dtype).removeprefix('torch.')}, but a LoRA's weights are floating "
                f"point (float32, float16, bfloat16 or float8): the file was written wrongly; {_FIX}"
            )
        family = _ROLE_FAMILY.get(role)
        needs = 2 if family in _MATRIX_FAMILIES and role != "rescale" else 1 if family == "extra" else 0
        if t.dim() < needs:
            raise LoraFileError(
                f"tensor '{key}' has shape {tuple(t.shape)}, but in a {family} layout it has at least "
                f"{needs} dimensions; {_FIX}"
            )


def _check_built(name: str, adapter: Adapter, used: list[str], tensors: dict[str, Tensor]) -> None:
    """A module whose factors hold no values: its alpha / rank scale divides by zero."""
    empty = [k for k in used if tensors[k].numel() == 0 and _ROLE_FAMILY.get(split_key(k)[2]) != "extra"]
    if rank_of(adapter) == 0 or empty:
        where = (
            f"'{empty[0]}' has shape {tuple(tensors[empty[0]].shape)}"
            if empty
            else "its factors have no rows"
        )
        raise LoraFileError(
            f"module '{name}' has rank 0 ({where}): it changes nothing and its alpha / rank scale is "
            f"undefined; {_FIX}"
        )


def parse_lora(tensors: dict[str, Tensor], source: str = "") -> ParsedLora:
    """Group keys by module and build one adapter per module; keys nothing uses go to unused_keys.

    A module no layout can mean (non-float factors, rank 0, factors that do not fit together) is a
    LoraFileError naming its key, prefixed with ``source`` (the file's name) when given."""
    groups: dict[str, _Module] = defaultdict(_Module)
    unused: list[str] = []
    notes: list[str] = []
    incomplete: list[str] = []
    # (IA)^3 stores its vector as the module's bare ".weight", told apart by an ".on_input" beside it
    ia3_vectors = {k[: -len(".on_input")] + ".weight" for k in tensors if k.endswith(".on_input")}
    for key in tensors:
        if key in ia3_vectors:
            groups[key[: -len(".weight")]].keys[VECTOR_ROLE] = key
            continue
        split = split_key(key)
        if split is None:
            unused.append(key)
            continue
        module, family, role = split
        groups[module].keys[role] = key
    modules: dict[str, Adapter] = {}
    bias: dict[str, DiffAdapter] = {}
    labels: Counter = Counter()
    for name, m in groups.items():
        used: list[str] = []
        try:
            _check_tensors(m, tensors)
            built = _build(m, tensors, notes)
            if built is not None:
                _check_built(name, *built, tensors)
        except (LoraFileError, BadLayout) as e:
            raise LoraFileError(f"{source}: {e}" if source else str(e)) from None
        except ValueError as e:  # an adapter record refusing its factors (rank mismatch, ...)
            where = f"{source}: module '{name}'" if source else f"module '{name}'"
            raise LoraFileError(f"{where}: {e}; {_FIX}") from None
        if built is not None:
            modules[name], used = built
            dora = getattr(modules[name], "dora_scale", None) is not None
            labels[_label(name, m.label) + (" (DoRA)" if dora else "")] += 1
        bias_key = m.keys.get("diff_b") or m.keys.get("b_norm")
        if bias_key:
            bias[name] = DiffAdapter(tensors[bias_key])
            used.append(bias_key)
            if built is None:
                labels[_label(name, "full diff")] += 1
        left = [k for k in m.keys.values() if k not in used]
        extras = (
            ".alpha",
            ".dora_scale",
            ".reshape_weight",
            ".lora_magnitude_vector",
            ".lora_magnitude_vector.weight",
        )
        if built is None and any(not k.endswith(extras) for k in left):
            incomplete.append(name)
        unused.extend(left)
    if incomplete:
        notes.append(
            f"{len(incomplete)} modules have an incomplete set of weights (e.g. {incomplete[0]}: "
            f"{', '.join(sorted(groups[incomplete[0]].keys.values()))}) and were skipped; the file may be damaged"
        )
    used_set = set(unused)
    return ParsedLora(
        modules=modules,
        unused_keys=tuple(k for k in tensors if k in used_set),
        format=_format_label(labels),
        bias_diffs=bias,
        notes=tuple(notes),
    )
