"""WD14-style ONNX taggers: the tag list, one cached onnxruntime session per model, batched inference."""

from __future__ import annotations

import csv
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

RATING, GENERAL, CHARACTER = 9, 0, 4
CACHE_SIZE = 2  # sessions kept alive across runs; a WD14 ViT session holds ~400 MB
# onnxruntime's GPU providers, best first; the first one installed is used, with the CPU as fallback.
GPU_PROVIDERS = ("CUDAExecutionProvider", "ROCMExecutionProvider", "DmlExecutionProvider")
log = logging.getLogger("lora_foundry")


class TaggerError(Exception):
    """A tagger model or tag list that cannot be used; the message says which file and how to fix it."""


@dataclass(frozen=True)
class TagList:
    """The rows of a selected_tags.csv: tag names and their categories, in model-output order."""

    names: tuple[str, ...]
    categories: tuple[int, ...]

    @cached_property
    def _category_array(self) -> np.ndarray:
        return np.asarray(self.categories)

    def indices(self, category: int) -> np.ndarray:
        return np.flatnonzero(self._category_array == category)


def load_tag_list(path: Path) -> TagList:
    """Parse selected_tags.csv (columns tag_id,name,category,count; only name and category are used)."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError) as error:
        raise TaggerError(f"cannot read tag list {path}: {error}") from error
    if not rows or "name" not in rows[0] or "category" not in rows[0]:
        raise TaggerError(
            f"{path} has no header with 'name' and 'category' columns: is it a selected_tags.csv?"
        )
    name_col, cat_col = rows[0].index("name"), rows[0].index("category")
    names: list[str] = []
    categories: list[int] = []
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        try:
            names.append(row[name_col])
            categories.append(int(row[cat_col]))
        except (IndexError, ValueError) as error:
            raise TaggerError(
                f"{path} line {line}: expected tag_id,name,category,count, got {row!r}"
            ) from error
    if not names:
        raise TaggerError(f"{path} lists no tags")
    return TagList(tuple(names), tuple(categories))


def tags_csv_for(model_path: Path) -> Path:
    """`<name>.csv` beside `<name>.onnx`, else `selected_tags.csv` in the model's folder."""
    model_path = Path(model_path)
    for candidate in (model_path.with_suffix(".csv"), model_path.parent / "selected_tags.csv"):
        if candidate.is_file():
            return candidate
    raise TaggerError(
        f"no tag list for {model_path}: put selected_tags.csv beside it "
        f"(as {model_path.with_suffix('.csv').name} or {model_path.parent / 'selected_tags.csv'})"
    )


def _available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _make_session(model_path: Path) -> Any:
    try:
        import onnxruntime as ort
    except ImportError as error:
        raise TaggerError(
            "onnxruntime is not installed: pip install onnxruntime (or onnxruntime-gpu)"
        ) from error
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = _available_cpus()
    options.inter_op_num_threads = 1
    # Spinning workers would burn the cores the decode thread needs while a batch is prepared.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = choose_providers(ort.get_available_providers())
    if len(providers) > 1:
        try:
            return ort.InferenceSession(str(model_path), sess_options=options, providers=providers)
        except Exception as error:  # installed but cannot start (drivers, libraries): use the CPU
            log.warning(
                "%s could not start %s (%s); tagging on the CPU", providers[0], model_path.name, error
            )
    try:
        return ort.InferenceSession(str(model_path), sess_options=options, providers=providers[-1:])
    except Exception as error:  # onnxruntime raises its own exception types
        raise TaggerError(f"onnxruntime cannot load {model_path}: {error}") from error


def choose_providers(available: list[str]) -> list[str]:
    """The first installed GPU provider (if any), then the CPU."""
    gpu = [name for name in GPU_PROVIDERS if name in available]
    return gpu[:1] + ["CPUExecutionProvider"]


class Tagger:
    """One model and its tag list. Build through get_tagger() so the session is shared."""

    def __init__(self, model_path: Path, tags: TagList, session: Any):
        self.model_path = Path(model_path)
        self.tags = tags
        self.session = session
        inputs, outputs = session.get_inputs(), session.get_outputs()
        shape = list(inputs[0].shape)
        if len(shape) != 4 or shape[3] != 3 or not isinstance(shape[1], int) or shape[1] != shape[2]:
            raise TaggerError(
                f"{self.model_path.name} takes input {shape}: a WD14 tagger takes [batch, S, S, 3] (NHWC)"
            )
        self.input_name: str = inputs[0].name
        self.output_name: str = outputs[0].name
        self.image_size: int = shape[1]
        # A model exported with a fixed batch dimension can only be run at that batch size.
        self.fixed_batch: int | None = shape[0] if isinstance(shape[0], int) else None
        n_out = outputs[0].shape[-1]
        if isinstance(n_out, int) and n_out != len(tags.names):
            raise TaggerError(
                f"{self.model_path.name} outputs {n_out} scores but its tag list has {len(tags.names)} tags: "
                "the csv belongs to another model"
            )

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) float32 BGR -> (N, n_tags) float32 probabilities."""
        step = self.fixed_batch or len(batch)
        parts = [
            self.session.run([self.output_name], {self.input_name: batch[i : i + step]})[0]
            for i in range(0, len(batch), step)
        ]
        probs = np.concatenate(parts, axis=0).astype(np.float32, copy=False)
        if probs.shape != (len(batch), len(self.tags.names)):
            raise TaggerError(f"{self.model_path.name} returned shape {probs.shape}, expected (N, n_tags)")
        return probs


_cache: OrderedDict[tuple, Tagger] = OrderedDict()
_cache_lock = threading.Lock()


def _file_key(path: Path) -> tuple:
    stat = path.stat()
    return (str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def get_tagger(model_path: Path, tags_path: Path | None = None) -> Tagger:
    """The Tagger for a model, reusing its session while the files are unchanged (LRU of CACHE_SIZE)."""
    model_path = Path(model_path)
    if not model_path.is_file():
        raise TaggerError(f"tagger model {model_path} does not exist")
    tags_path = Path(tags_path) if tags_path is not None else tags_csv_for(model_path)
    key = (_file_key(model_path), _file_key(tags_path))
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
        tagger = Tagger(model_path, load_tag_list(tags_path), _make_session(model_path))
        _cache[key] = tagger
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
        return tagger


def clear_tagger_cache() -> None:
    with _cache_lock:
        _cache.clear()


@dataclass(frozen=True)
class TaggerFiles:
    """An installed tagger: the name shown in a list, its model and its tag list."""

    name: str
    model: Path
    tags: Path


def find_taggers(folders: list[Path]) -> tuple[list[TaggerFiles], list[str]]:
    """Taggers in `folders` as `<name>.onnx` + `<name>.csv`, or `<name>/model.onnx` + selected_tags.csv.

    Returns (found, problems): problems name .onnx files that lack a tag list.
    """
    found: list[TaggerFiles] = []
    problems: list[str] = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for onnx in sorted([*folder.glob("*.onnx"), *folder.glob("*/*.onnx")]):
            name = onnx.relative_to(folder).as_posix()
            try:
                found.append(TaggerFiles(name, onnx, tags_csv_for(onnx)))
            except TaggerError as error:
                problems.append(str(error))
    return found, problems
