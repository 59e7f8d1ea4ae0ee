"""Training job files: one JSON document holding everything a Train LoRA run needs, and its checks.

The schema is not written out here: each section is a dataclass of the trainer (TrainConfig,
DatasetOptions) or of this module (ModelRef, DatasetSource, NetworkOptions, OutputOptions), read
with dataclasses.fields and typing.get_type_hints, so a field added to TrainConfig is in every job
file at once. A job file is untrusted: it is parsed with json (no eval, no pickle), capped in size,
and every value is checked against its field's type, Literal choices and the dataclass's own
checks, with errors naming ``section.field`` and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

from .dataset import DatasetOptions
from .existing import Existing
from .key_names import KeyNames
from .network import TargetPreset
from .trainer import TrainConfig

SCHEMA = "lora_foundry.train_job"
VERSION = 1
MAX_BYTES = 1 << 20  # a real job is a few KB; anything near this is not one
SaveDtype = Literal["fp16", "bf16", "fp32"]
CacheMode = Literal["memory", "disk"]


class JobError(ValueError):
    """A job file or value that cannot run; the message names the field and the fix."""


@dataclass(frozen=True)
class ModelRef:
    checkpoint: str = ""  # a file name as ComfyUI lists it in the folder below
    folder: Literal["checkpoints"] = "checkpoints"  # folder_paths kind; resolved by the bridge

    def __post_init__(self) -> None:
        if not self.checkpoint.strip():
            raise ValueError("`checkpoint` is empty: set the checkpoint file name (as ComfyUI lists it)")


@dataclass(frozen=True)
class DatasetSource:
    folder: str = "lora_dataset"  # as the dataset node takes it (relative names start in input/)
    cache: CacheMode = "memory"


@dataclass(frozen=True)
class NetworkOptions:
    rank: int = 16
    alpha: float = 16.0
    targets: TargetPreset = "attention"
    blocks: str = ""
    dora: bool = False
    gradient_checkpointing: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.rank <= 1024:
            raise ValueError(f"`rank` should be 1 to 1024, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"`alpha` should be positive, got {self.alpha}")


@dataclass(frozen=True)
class OutputOptions:
    name: str = "my_lora"  # models/loras/<name>/<name>.safetensors
    save_every: int = 0
    keep_last: int = 3
    save_dtype: SaveDtype = "fp16"
    existing: Existing = "error"
    key_names: KeyNames = "kohya"  # the saved file's key names: kohya's, or diffusers / PEFT (key_names.py)

    def __post_init__(self) -> None:
        if self.save_every < 0 or self.keep_last < 0:
            raise ValueError(
                f"`save_every` and `keep_last` should be 0 or more, got {self.save_every}, {self.keep_last}"
            )


# section name -> the dataclass that is its schema
SECTIONS: dict[str, type] = {
    "model": ModelRef,
    "dataset_source": DatasetSource,
    "dataset": DatasetOptions,
    "network": NetworkOptions,
    "output": OutputOptions,
    "train": TrainConfig,
}


@dataclass(frozen=True)
class TrainJob:
    model: ModelRef
    dataset_source: DatasetSource
    dataset: DatasetOptions
    network: NetworkOptions
    output: OutputOptions
    train: TrainConfig

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "version": VERSION, **{s: asdict(getattr(self, s)) for s in SECTIONS}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"


def field_specs(cls: type) -> dict[str, tuple[object, object]]:
    """{field: (type, default)} of a section's dataclass, its annotations resolved."""
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], _default(f)) for f in fields(cls)}


def _default(f: dataclasses.Field) -> object:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _describe(kind: object) -> str:
    if typing.get_origin(kind) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(kind))
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}.get(
        kind, str(kind)
    )


def check_value(where: str, kind: object, value: object) -> object:
    """``value`` as the field's type (an int given for a float becomes a float); JobError otherwise."""
    ok = False
    if typing.get_origin(kind) is Literal:
        ok = isinstance(value, str | int) and not isinstance(value, bool) and value in typing.get_args(kind)
    elif kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind is str:
        ok = isinstance(value, str)
    else:
        raise JobError(f"`{where}` has a type job files cannot hold ({kind}); this is a bug in the pack")
    if not ok:
        raise JobError(
            f"`{where}` should be {_describe(kind)}, got {json.dumps(value)[:80]}: fix it in the job file"
        )
    return value


def build_section(name: str, values: object) -> object:
    """The section's dataclass from a JSON object: unknown keys, wrong types, bad choices and the
    dataclass's own range checks are errors naming ``name.field``; absent fields take defaults."""
    cls = SECTIONS[name]
    if not isinstance(values, dict):
        raise JobError(f"`{name}` should be an object of settings, got {type(values).__name__}")
    specs = field_specs(cls)
    unknown = sorted(set(values) - set(specs))
    if unknown:
        raise JobError(
            f"`{name}.{unknown[0]}` is not a setting of this pack version; remove it (known: {', '.join(specs)})"
        )
    kwargs = {}
    for key, (kind, default) in specs.items():
        if key in values:
            kwargs[key] = check_value(f"{name}.{key}", kind, values[key])
        elif default is dataclasses.MISSING:
            raise JobError(f"`{name}.{key}` is missing: add it to the job file")
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise JobError(f"in `{name}`: {e}") from e


def job_from_dict(doc: object) -> TrainJob:
    """A TrainJob from a parsed JSON document, checked (JobError naming the field otherwise)."""
    if not isinstance(doc, dict):
        raise JobError("a job file should hold one JSON object")
    if doc.get("schema") != SCHEMA:
        raise JobError(f"`schema` should be {SCHEMA!r}: this is not a LoRA Foundry training job")
    if doc.get("version") != VERSION:
        raise JobError(
            f"`version` {doc.get('version')!r} is not one this pack reads (it reads {VERSION}): "
            "export the job again from this version's node"
        )
    unknown = sorted(set(doc) - {"schema", "version", *SECTIONS})
    if unknown:
        raise JobError(
            f"`{unknown[0]}` is not a section of a job file; remove it (sections: {', '.join(SECTIONS)})"
        )
    missing = [s for s in ("model", "dataset_source") if s not in doc]
    if missing:
        raise JobError(
            f"`{missing[0]}` is missing: a job needs at least the model and dataset_source sections"
        )
    return TrainJob(**{s: build_section(s, doc.get(s, {})) for s in SECTIONS})


def _no_constant(name: str) -> None:
    raise JobError(f"the job file holds {name}, which is not a number a setting can take")


def parse_job(text: str | bytes) -> TrainJob:
    """A TrainJob from JSON text (at most MAX_BYTES; NaN / Infinity refused)."""
    if len(text) > MAX_BYTES:
        raise JobError(
            f"the job file is {len(text)} bytes, over the {MAX_BYTES} a job can be: is it a job file?"
        )
    try:
        doc = json.loads(text, parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise JobError(f"the job file is not valid JSON ({e}); export it again or fix the syntax") from e
    return job_from_dict(doc)


def read_job(path: str | Path) -> TrainJob:
    """Reads and checks a job file; errors name the file."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_BYTES + 1)
        return parse_job(data)
    except JobError as e:
        raise JobError(f"{path.name}: {e}") from e
    except OSError as e:
        raise JobError(f"cannot read the job file {path}: {e.strerror or e}") from e
