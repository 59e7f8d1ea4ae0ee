"""Per-block LoRA weights ("LoRA Block Weight"), with the vector layout of the Inspire pack's node.

Three spellings of a spec:
- a numeric vector, 17 numbers for SD1.x/SD2.x (BASE, IN01, IN02, IN04, IN05, IN07, IN08, MID,
  OUT03..OUT11) or 12 for SDXL (BASE, IN04, IN05, IN07, IN08, MID, OUT00..OUT05); the LyCORIS
  layouts with 27 / 21 numbers cover every block. ``NAME:1,0,...`` lines from Inspire preset files
  work too. Inspire's letters (A, B, R, U: random or node-input values) are not supported.
- a preset name: NONE, ALL, INS, IND, INALL, MIDD, MIDD0.2, MIDD0.8, MOUT, OUTD, OUTS, OUTALL, ALL0.5
  (SD) and NONE, ALL, INALL, MIDALL, OUTALL (SDXL), with or without Inspire's ``SD-``/``SDXL-`` prefix.
- a readable list: ``in=0.5, mid=1, out=0.8, base=1, IN04=0.2, default=1``; a single block beats
  its group whatever the order.
BASE covers the text encoders and UNet weights outside the three block groups (as in Inspire).
Blocks a vector does not list (e.g. IN03 in a 17-number vector, only present in LoCon files) keep
the ``default`` weight, 1.0 unless the readable form sets it.
Unlike Inspire, a vector position means a fixed block, not "the k-th block this LoRA happens to have".
Block names are checked against the model's real block count (BlockCounts; the family's when the
caller has no model) and a spec is at most MAX_SPEC_CHARS long, so no input builds anything large.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ..files import families

_SD = ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID") + tuple(
    f"OUT{i:02d}" for i in range(3, 12)
)
_SDXL = ("BASE", "IN04", "IN05", "IN07", "IN08", "MID") + tuple(f"OUT{i:02d}" for i in range(6))
_SD_LYC = (
    ("BASE",)
    + tuple(f"IN{i:02d}" for i in range(1, 12))
    + ("MID00", "MID01", "MID02")
    + tuple(f"OUT{i:02d}" for i in range(12))
)
_SDXL_LYC = (
    ("BASE",)
    + tuple(f"IN{i:02d}" for i in range(1, 9))
    + ("MID00", "MID01", "MID02")
    + tuple(f"OUT{i:02d}" for i in range(9))
)
LAYOUTS = {
    17: ("SD1.x", _SD),
    12: ("SDXL", _SDXL),
    27: ("SD1.x LyCORIS", _SD_LYC),
    21: ("SDXL LyCORIS", _SDXL_LYC),
}

# Inspire-pack preset vectors (resources/lbw-preset.txt), as data.
PRESETS = {
    "SD-NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "SD-ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "SD-INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "SD-IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "SD-INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "SD-MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "SD-MIDD0.2": "1,0,0,0,0,0,0.2,0.4,0.4,0.2,0,0,0,0,0,0,0",
    "SD-MIDD0.8": "1,0,0,0,0,0.5,0.8,0.8,0.4,0,0,0,0,0,0,0,0",
    "SD-MOUT": "1,0,0,0,0,0,1,1,1,1,1,1,1,1,0.5,0,0",
    "SD-OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "SD-OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "SD-OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "SD-ALL0.5": ",".join(["0.5"] * 17),
    "SD-LYC-NONE": ",".join(["0"] * 27),
    "SD-LYC-ALL": ",".join(["1"] * 27),
    "SD-LYC-INALL": ",".join(["1"] * 12 + ["0"] * 15),
    "SD-LYC-MIDALL": ",".join(["1"] + ["0"] * 11 + ["1"] * 3 + ["0"] * 12),
    "SD-LYC-OUTALL": ",".join(["1"] + ["0"] * 14 + ["1"] * 12),
    "SDXL-NONE": "0,0,0,0,0,0,0,0,0,0,0,0",
    "SDXL-ALL": "1,1,1,1,1,1,1,1,1,1,1,1",
    "SDXL-INALL": "1,1,1,1,1,0,0,0,0,0,0,0",
    "SDXL-MIDALL": "1,0,0,0,0,1,0,0,0,0,0,0",
    "SDXL-OUTALL": "1,0,0,0,0,0,1,1,1,1,1,1",
    "SDXL-LYC-NONE": ",".join(["0"] * 21),
    "SDXL-LYC-ALL": ",".join(["1"] * 21),
    "SDXL-LYC-INALL": ",".join(["1"] * 9 + ["0"] * 12),
    "SDXL-LYC-MIDALL": ",".join(["1"] + ["0"] * 8 + ["1"] * 3 + ["0"] * 9),
    "SDXL-LYC-OUTALL": ",".join(["1"] + ["0"] * 11 + ["1"] * 9),
}
_GROUPS = {"in": "IN", "mid": "MID", "out": "OUT"}
# Unambiguous number syntax (no two ways to split a run of digits), so a failed match is linear
# in its length: ``\d+\.?\d*`` backtracked quadratically (8,000 digits: 1 s).
_ITEM = re.compile(r"^(?P<name>[a-z]+)(?P<num>\d*)\s*=\s*(?P<value>[-+]?(\d+(\.\d*)?|\.\d+)(e[-+]?\d+)?)$")
# The longest legitimate spec (a 27-number LyCORIS vector with decimals, or a readable list
# naming every block) is a few hundred characters; a graph can send megabytes.
MAX_SPEC_CHARS = 2048


@dataclass(frozen=True)
class BlockCounts:
    """How many blocks a UNet has in each group: len(input_blocks), len(middle_block) (its
    sub-blocks MID00..), len(output_blocks). Block indices run from 0 to count - 1."""

    input: int
    middle: int
    output: int

    def count(self, group: str) -> int:
        return {"IN": self.input, "MID": self.middle, "OUT": self.output}[group]  # KeyError: a bug

    def span(self, group: str) -> str:
        n = self.count(group)
        return f"{group}00-{group}{n - 1:02d}" if n else f"no {group} blocks"


_GROUP_WORDS = {"IN": "input", "MID": "middle", "OUT": "output"}
SD_COUNTS = BlockCounts(input=12, middle=3, output=12)  # SD1.x and SD2.x UNets
SDXL_COUNTS = BlockCounts(input=9, middle=3, output=9)


@dataclass(frozen=True)
class UNetLayout:
    """A UNet block layout (the family table's ``block_layout``): its vector lengths (Inspire's and
    LyCORIS's), its block counts and the prefix of its presets."""

    vector_lengths: tuple[int, ...]
    counts: BlockCounts
    preset_prefix: str


UNET_LAYOUTS = {
    "SD": UNetLayout((17, 27), SD_COUNTS, "SD-"),
    "SDXL": UNetLayout((12, 21), SDXL_COUNTS, "SDXL-"),
}


def layout_of(family: str | None) -> UNetLayout | None:
    """The block layout of a family label, as the family table gives it; None: no UNet block weights."""
    row = families.by_label(family) if family else None
    return UNET_LAYOUTS.get(row.block_layout) if row is not None and row.block_layout else None


def _with_block_weights() -> str:
    """'SD1.x, SD2.x and SDXL': the families whose rows name a UNet block layout."""
    labels = sorted(f.label for f in families.FAMILIES if f.block_layout in UNET_LAYOUTS)
    return f"{', '.join(labels[:-1])} and {labels[-1]}"


def check_spec_length(spec: str, field_name: str) -> None:
    """Refuses a spec longer than MAX_SPEC_CHARS before anything parses it."""
    if len(spec) > MAX_SPEC_CHARS:
        raise ValueError(
            f"`{field_name}` is {len(spec)} characters long; a block spec is at most {MAX_SPEC_CHARS} "
            "(a full 27-number vector is about 100): check what was pasted into it"
        )


def check_block_index(group: str, digits: str, counts: BlockCounts, field_name: str, entry: str) -> int:
    """The block index ``digits`` names in ``group``; ValueError naming the input, the entry and the
    valid range when the model has no such block. Never converts a huge digit string."""
    index = int(digits) if len(digits) <= 4 else None
    if index is None or index >= counts.count(group):
        raise ValueError(
            f"`{field_name}` entry {_short(entry)}: {group}{_clip(digits, 8)} is not a block of this model; its "
            f"{_GROUP_WORDS[group]} blocks are {counts.span(group)}"
        )
    return index


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _short(text: str, limit: int = 40) -> str:
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


@dataclass(frozen=True)
class BlockWeights:
    """Weights by block id ("BASE", "IN04", "MID", "MID01", "OUT03"...) and by group ("IN", "MID", "OUT")."""

    blocks: dict[str, float]
    groups: dict[str, float] = field(default_factory=dict)
    default: float = 1.0
    layout: str = "readable"

    def weight_for(self, key: str) -> float:
        """The weight for a model key or LoRA module name (any spelling block_of understands)."""
        block = block_of(key)
        if block == "BASE":
            return self.blocks.get("BASE", self.default)
        group, index = block
        for candidate in (f"{group}{index:02d}", group):
            if candidate in self.blocks:
                return self.blocks[candidate]
        return self.groups.get(group, self.default)


_NATIVE = re.compile(r"(input_blocks|middle_block|output_blocks)[._](\d+)(?:[._]|$)")
_DIFFUSERS = re.compile(
    r"(down_blocks|up_blocks)[._](\d+)[._](attentions|resnets|downsamplers|upsamplers)[._](\d+)"
)


def block_of(key: str) -> str | tuple[str, int]:
    """("IN"|"MID"|"OUT", index) of the ComfyUI UNet block a key belongs to, else "BASE"."""
    if m := _NATIVE.search(key):
        return {"input_blocks": "IN", "middle_block": "MID", "output_blocks": "OUT"}[m[1]], int(m[2])
    if m := re.search(r"mid_block[._](attentions|resnets)[._](\d+)", key):
        # diffusers mid block: attentions.0 is middle_block.1, resnets 0/1 are middle_block.0/2
        return "MID", 1 if m[1] == "attentions" else 2 * min(int(m[2]), 1)
    if m := _DIFFUSERS.search(key):
        # Two res blocks per level (SD1.x, SD2.x, SDXL): down i/j -> input 1+3i+j, up i/j -> output 3i+j.
        i, j = int(m[2]), int(m[4])
        if m[1] == "down_blocks":
            return "IN", 1 + 3 * i + (2 if m[3] == "downsamplers" else j)
        return "OUT", 3 * i + (2 if m[3] == "upsamplers" else j)
    return "BASE"


def _parse_vector(text: str, family: str | None) -> BlockWeights:
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [_finite(float(p), p) for p in parts]
    except ValueError:
        bad = next(p for p in parts if not _is_float(p))
        raise ValueError(
            f"block weight vector: {_short(bad)} is not a number; use numbers only (Inspire's A/B/R/U letters "
            f"are not supported), a preset name, or the form 'in=0.5, mid=1, out=0.8'. Got: {_clip(text)}"
        ) from None
    layout = layout_of(family)
    lengths = layout.vector_lengths if layout else tuple(LAYOUTS)
    if len(values) not in lengths:
        want = " or ".join(str(n) for n in lengths)
        raise ValueError(
            f"{family or 'SD1.x/SDXL'} block weights need {want} numbers "
            f"(SD1.x: 17, or 27 LyCORIS; SDXL: 12, or 21 LyCORIS), got {len(values)}: {_clip(text)}"
        )
    layout, names = LAYOUTS[len(values)]
    return BlockWeights(blocks=dict(zip(names, values, strict=True)), layout=layout)


def _is_float(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _parse_readable(text: str, counts: BlockCounts) -> BlockWeights:
    blocks: dict[str, float] = {}
    groups: dict[str, float] = {}
    default = 1.0
    for item in (p.strip() for p in text.lstrip("%").split(",")):
        m = _ITEM.match(item.lower())
        if not m:
            raise ValueError(
                f"`block_weights`: cannot read {_short(item)}; expected items like in=0.5, mid=1, out=0.8, "
                "base=1, IN04=0.2, OUT03=0, default=1"
            )
        name, num, value = m["name"], m["num"], _finite(float(m["value"]), item)
        if name in _GROUPS and num:
            check_block_index(_GROUPS[name], num, counts, "block_weights", item)
        if name in ("base", "default") and not num:
            if name == "base":
                blocks["BASE"] = value
            else:
                default = value
        elif name in _GROUPS and not num:
            groups[_GROUPS[name]] = value
        elif name in _GROUPS and len(num) == 2:
            blocks[f"{_GROUPS[name]}{num}"] = value
        else:
            raise ValueError(
                f"`block_weights`: {_short(item)} is not a block; name blocks with two digits as in IN04=0.2 or "
                "OUT03=0 (input_blocks.4, output_blocks.3), or use in=, mid=, out=, base=, default="
            )
    return BlockWeights(blocks=blocks, groups=groups, default=default)


def _finite(value: float, item: str) -> float:
    if not math.isfinite(value):
        raise ValueError(
            f"`block_weights`: {_short(item)} is not a finite number; use weights such as 0, 0.5 or 1"
        )
    return value


def _preset(name: str, family: str | None) -> str | None:
    key = name.strip().upper()
    layout = layout_of(family)
    prefixes = (layout.preset_prefix,) if layout else tuple(u.preset_prefix for u in UNET_LAYOUTS.values())
    for candidate in (key, *(p + key for p in prefixes)):
        if candidate in PRESETS:
            return PRESETS[candidate]
    return None


def parse_block_weights(
    spec: str, family: str | None = None, counts: BlockCounts | None = None
) -> BlockWeights:
    """Parse a vector, preset or readable spec; ``family`` ("SD1.x", "SDXL"...) checks the vector length,
    ``counts`` (the model's, else the family's, else SD's) the blocks a readable spec names."""
    check_spec_length(spec, "block_weights")
    layout = layout_of(family)
    counts = counts or (layout.counts if layout else SD_COUNTS)
    text = spec.strip()
    if family not in (None, families.UNKNOWN) and layout is None:
        raise ValueError(
            f"block weights work on {_with_block_weights()} UNets; this model is {family}: clear the block weights"
        )
    if not text:
        raise ValueError(
            "block weights: empty spec; give a vector (17 numbers for SD1.x, 12 for SDXL) or a preset"
        )
    if "=" in text:
        return _parse_readable(text, counts)
    if (preset := _preset(text, family)) is not None:
        return _parse_vector(preset, family)
    if ":" in text:  # an Inspire preset line "NAME:1,0,..."
        return _parse_vector(text.partition(":")[2], family)
    if "," not in text and not _is_float(text):
        prefix = (layout or UNET_LAYOUTS["SD"]).preset_prefix  # an unknown model: SD's presets
        names = sorted(n for n in PRESETS if family is None or n.startswith(prefix))
        raise ValueError(f"`block_weights`: unknown preset {_short(text)}; known presets: {', '.join(names)}")
    return _parse_vector(text, family)


def block_weight_for(key: str, spec: str | BlockWeights, family: str | None = None) -> float:
    """The weight a spec gives the block of ``key`` (a ComfyUI model key or a LoRA module name)."""
    weights = spec if isinstance(spec, BlockWeights) else parse_block_weights(spec, family)
    return weights.weight_for(key)
