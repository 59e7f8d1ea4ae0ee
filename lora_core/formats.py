"""Parsing: a flat LoRA tensor dict into one adapter record per module, with every key accounted for."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace

from torch import Tensor

from .adapters import (
    Adapter,
    BoftAdapter,
    DiffAdapter,
    GloraAdapter,
    Ia3Adapter,
    LohaAdapter,
    LokrAdapter,
    LoraAdapter,
    OftAdapter,
    OftV2Adapter,
    SetAdapter,
    rank_of,
)
from .lorafile import LoraFileError

# suffix -> (family, role). Families: "lora" (up/down pairs in several spellings), "loha", "lokr",
# "extra" (alpha, dora_scale, PEFT's DoRA magnitude), "oft", "oftv2", "glora", "ia3", "diff", "set", "bias". The module name is the key
# without the suffix, so "x.to_q_lora.up.weight" gives module "x.to_q".
_SUFFIXES: dict[str, tuple[str, str]] = {
    ".lora_up.weight": ("lora", "up:kohya"),
    ".lora_down.weight": ("lora", "down:kohya"),
    ".lora_mid.weight": ("lora", "mid"),
    ".lora_B.weight": ("lora", "up:AB"),
    ".lora_A.weight": ("lora", "down:AB"),
    ".lora_B.default.weight": ("lora", "up:ABdefault"),
    ".lora_A.default.weight": ("lora", "down:ABdefault"),
    ".lora_B": ("lora", "up:ABbare"),
    ".lora_A": ("lora", "down:ABbare"),
    ".lora.up.weight": ("lora", "up:dotted"),
    ".lora.down.weight": ("lora", "down:dotted"),
    "_lora.up.weight": ("lora", "up:processor"),
    "_lora.down.weight": ("lora", "down:processor"),
    ".lora_linear_layer.up.weight": ("lora", "up:linear_layer"),
    ".lora_linear_layer.down.weight": ("lora", "down:linear_layer"),
    ".alpha": ("extra", "alpha"),
    ".dora_scale": ("extra", "dora_scale"),
    ".reshape_weight": ("extra", "reshape"),
    ".hada_w1_a": ("loha", "hada_w1_a"),
    ".hada_w1_b": ("loha", "hada_w1_b"),
    ".hada_w2_a": ("loha", "hada_w2_a"),
    ".hada_w2_b": ("loha", "hada_w2_b"),
    ".hada_t1": ("loha", "hada_t1"),
    ".hada_t2": ("loha", "hada_t2"),
    ".lokr_w1": ("lokr", "lokr_w1"),
    ".lokr_w1_a": ("lokr", "lokr_w1_a"),
    ".lokr_w1_b": ("lokr", "lokr_w1_b"),
    ".lokr_w2": ("lokr", "lokr_w2"),
    ".lokr_w2_a": ("lokr", "lokr_w2_a"),
    ".lokr_w2_b": ("lokr", "lokr_w2_b"),
    ".lokr_t2": ("lokr", "lokr_t2"),
    ".oft_blocks": ("oft", "oft_blocks"),
    ".a1.weight": ("glora", "a1"),
    ".a2.weight": ("glora", "a2"),
    ".b1.weight": ("glora", "b1"),
    ".b2.weight": ("glora", "b2"),
    ".rescale": ("oft", "rescale"),
    ".oft_R.weight": ("oftv2", "oft_R"),  # PEFT's OFT (v2)
    ".oft_R.default.weight": ("oftv2", "oft_R"),
    ".oft_R.scaled_oft": ("oftv2", "scaled_oft"),
    ".on_input": ("ia3", "on_input"),  # its vector is the module's bare ".weight" (see parse_lora)
    ".diff": ("diff", "diff"),
    ".w_norm": ("diff", "w_norm"),
    ".set_weight": ("set", "set_weight"),
    ".diff_b": ("bias", "diff_b"),
    ".b_norm": ("bias", "b_norm"),
    ".lora_magnitude_vector": ("extra", "magnitude"),  # PEFT's DoRA
    ".lora_magnitude_vector.weight": ("extra", "magnitude"),
    ".lora_magnitude_vector.default.weight": ("extra", "magnitude"),
}
_BY_LENGTH = sorted(_SUFFIXES, key=len, reverse=True)
# Roles whose tensor is a number or flag, not a factor: any numeric dtype (tools write integer alphas).
_NOT_FACTORS = frozenset({"alpha", "reshape", "on_input", "scaled_oft"})
# Families whose factors are matrices (or conv kernels): a 0-D or 1-D one is no such layout.
_MATRIX_FAMILIES = frozenset({"lora", "loha", "lokr", "glora", "oft", "oftv2"})
_FIX = "download the file again (it may be damaged) or pick another LoRA"
_LORA_SPELLINGS = ("kohya", "AB", "ABdefault", "ABbare", "dotted", "processor", "linear_layer")
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


def _build_lora(m: _Module, t: dict[str, Tensor]) -> tuple[Adapter, list[str]] | None:
    for spelling in _LORA_SPELLINGS:
        up, down = m.keys.get(f"up:{spelling}"), m.keys.get(f"down:{spelling}")
        if up and down:
            mid = m.keys.get("mid") if spelling == "kohya" else None
            used = [up, down] + ([mid] if mid else [])
            reshape = None
            if "reshape" in m.keys:  # the weight is first zero-padded to this shape (Flux control LoRAs)
                reshape = _reshape_weight(t[m.keys["reshape"]], m.keys["reshape"])
                used.append(m.keys["reshape"])
            m.label = "kohya LoRA" if spelling == "kohya" else "diffusers"
            return LoraAdapter(up=t[up], down=t[down], mid=t[mid] if mid else None, reshape=reshape), used
    return None


def _reshape_weight(t: Tensor, key: str) -> tuple[int, ...]:
    """The shape a ``reshape_weight`` grows the weight to: 1 to 8 whole, positive sizes."""
    values = t.flatten().tolist() if t.numel() <= 8 and not t.is_complex() else None
    if not values or any(not float(v).is_integer() or not 1 <= v < 2**31 for v in values):
        raise LoraFileError(f"'{key}' should list the sizes of the weight it grows, got {t.numel()} values "
                            f"{str(values)[:60] if values else ''}; {_FIX}")  # fmt: skip
    return tuple(int(v) for v in values)


def _build_loha(m: _Module, t: dict[str, Tensor]) -> tuple[Adapter, list[str]] | None:
    names = ("w1_a", "w1_b", "w2_a", "w2_b") + (
        ("t1", "t2") if "hada_t1" in m.keys and "hada_t2" in m.keys else ()
    )
    if not all(f"hada_{n}" in m.keys for n in names[:4]):
        return None
    used = [m.keys[f"hada_{n}"] for n in names]
    kwargs = {n: t[m.keys[f"hada_{n}"]] for n in names}
    m.label = "LyCORIS LoHa"
    return LohaAdapter(**kwargs), used


def _build_lokr(m: _Module, t: dict[str, Tensor]) -> tuple[Adapter, list[str]] | None:
    k = {role[len("lokr_") :]: key for role, key in m.keys.items() if role.startswith("lokr_")}
    w1_ok = "w1" in k or ("w1_a" in k and "w1_b" in k)
    w2_ok = "w2" in k or ("w2_a" in k and "w2_b" in k)
    if not (w1_ok and w2_ok):
        return None
    # A full factor wins over its a/b pair, as in ComfyUI; the pair is then left unused.
    roles = ["w1"] if "w1" in k else ["w1_a", "w1_b"]
    roles += ["w2"] if "w2" in k else ["w2_a", "w2_b"] + (["t2"] if "t2" in k else [])
    m.label = "LyCORIS LoKr"
    return LokrAdapter(**{r: t[k[r]] for r in roles}), [k[r] for r in roles]


def _build_glora(m: _Module, t: dict[str, Tensor]) -> tuple[Adapter, list[str]] | None:
    keys = [m.keys.get(r) for r in ("a1", "a2", "b1", "b2")]
    if not all(keys):
        return None
    m.label = "LyCORIS GLoRA"
    return GloraAdapter(*(t[k] for k in keys)), keys


def _build_oft(m: _Module, t: dict[str, Tensor]) -> tuple[Adapter, list[str]] | None:
    blocks = m.keys.get("oft_blocks")
    if blocks is None or t[blocks].dim() not in (3, 4):
        return None
    rescale = m.keys.get("rescale")
    used = [blocks] + ([rescale] if rescale else [])
    if t[blocks].dim() == 4:  # (levels, blocks, size, size): butterfly OFT
        m.label = "LyCORIS BOFT"
        return BoftAdapter(t[blocks], t[rescale] if rescale else None), used
    # ComfyUI reads a diag-OFT's ``rescale`` but does not use it; it is taken here too, with the same effect.
    m.label = "LyCORIS OFT"
    return OftAdapter(t[blocks]), used


def _build_oftv2(m: _Module, t: dict[str, Tensor]) -> tuple[Adapter, list[str]] | None:
    vectors = m.keys.get("oft_R")
    if vectors is None:
        return None
    scaled = m.keys.get("scaled_oft")
    m.label = "PEFT OFT"
    return OftV2Adapter(t[vectors], scaled=scaled is not None), [vectors] + ([scaled] if scaled else [])


def _build_ia3(m: _Module, t: dict[str, Tensor]) -> tuple[Adapter, list[str]] | None:
    if "ia3_weight" not in m.keys or "on_input" not in m.keys:
        return None
    m.label = "LyCORIS (IA)3"
    used = [m.keys["ia3_weight"], m.keys["on_input"]]
    flag = t[m.keys["on_input"]].flatten()
    if flag.numel() != 1 or flag.is_complex():
        raise LoraFileError(f"'{m.keys['on_input']}' should be one flag, got {flag.numel()} values; {_FIX}")
    return Ia3Adapter(t[m.keys["ia3_weight"]], bool(flag[0].item())), used


def _build(m: _Module, t: dict[str, Tensor], notes: list[str]) -> tuple[Adapter, list[str]] | None:
    """The module's weight patch and the keys it used; precedence mirrors ComfyUI's override order."""
    if "set_weight" in m.keys:
        m.label = "set_weight"
        return SetAdapter(t[m.keys["set_weight"]]), [m.keys["set_weight"]]
    for role in ("diff", "w_norm"):
        if role in m.keys:
            m.label = "full diff"
            return DiffAdapter(t[m.keys[role]]), [m.keys[role]]
    for builder in (
        _build_lora,
        _build_loha,
        _build_lokr,
        _build_glora,
        _build_oft,
        _build_oftv2,
        _build_ia3,
    ):
        built = builder(m, t)
        if built is None:
            continue
        adapter, used = built
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


_ROLE_FAMILY = {role: family for family, role in _SUFFIXES.values()} | {"ia3_weight": "ia3"}


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
            groups[key[: -len(".weight")]].keys["ia3_weight"] = key
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
        except LoraFileError as e:
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
