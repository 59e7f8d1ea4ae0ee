"""Opening a LoRA file for the loader: read it once, rename a trainer's layout, parse it, take the
alphas a PEFT config gives, guess its base family; the parse cache keyed by the file's identity,
so a strength change reads nothing from disk."""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, replace

from ..adapters import LoraAdapter
from ..files.detect import FamilyGuess, detect_family
from ..files.formats import ParsedLora, parse_lora
from ..files.layouts import convert_layout
from ..files.lorafile import LoraFileError, read_lora_file
from ..files.metadata import adapter_config_alphas, diffusers_alphas, trigger_words

log = logging.getLogger("lora_foundry")


@dataclass(frozen=True)
class LoadedLora:
    """A parsed LoRA file with what was read from its header."""

    path: str
    parsed: ParsedLora
    metadata: Mapping[str, str]
    family: FamilyGuess
    triggers: tuple[str, ...]
    nbytes: int = 0  # what it holds in memory: tensor bytes and header text, for the cache budget

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


CACHE_ENV = "LORA_FOUNDRY_PARSE_CACHE_MB"
DEFAULT_CACHE_MB = 1024


def cache_budget_bytes(environ: Mapping[str, str] = os.environ) -> int:
    """The parse cache's budget from ``LORA_FOUNDRY_PARSE_CACHE_MB`` (0 turns caching off)."""
    text = environ.get(CACHE_ENV, "").strip()
    try:
        mb = float(text) if text else DEFAULT_CACHE_MB
    except ValueError:
        mb = -1.0
    if not (0 <= mb < 2**40):  # also NaN
        log.warning("[LoRA Foundry] %s=%r is not a size in MB; using %d", CACHE_ENV, text, DEFAULT_CACHE_MB)
        mb = DEFAULT_CACHE_MB
    return int(mb * 2**20)


class _LoraCache:
    """Parsed files by (path, size, mtime): a strength change reads nothing from disk. Bounded by
    count and by bytes (LoadedLora.nbytes); a file larger than the whole budget is not kept."""

    def __init__(self, max_entries: int = 16, max_bytes: int | None = None):
        self.max_entries = max_entries
        self.max_bytes = cache_budget_bytes() if max_bytes is None else max_bytes
        self._items: OrderedDict[tuple, LoadedLora] = OrderedDict()
        self._lock = threading.Lock()
        self.reads = 0  # files actually read, for tests and benchmarks

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(item.nbytes for item in self._items.values())

    def get(self, path: str) -> LoadedLora:
        key = _identity(path)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        loaded = _load(path)
        with self._lock:
            self.reads += 1
            if loaded.nbytes > self.max_bytes or key in self._items:
                return loaded
            self._items[key] = loaded
            total = sum(item.nbytes for item in self._items.values())
            while len(self._items) > self.max_entries or total > self.max_bytes:
                total -= self._items.popitem(last=False)[1].nbytes
        return loaded


def _identity(path: str) -> tuple:
    """The file as on disk (and the PEFT config beside it, whose alphas are part of what is loaded)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise LoraFileError(
            f"{os.path.basename(path)}: cannot be read ({e.strerror or e}); check that it is still in the "
            "loras folder"
        ) from None
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    config = _peft_config_path(path)
    try:
        cst = os.stat(config) if config is not None else None
    except OSError:  # removed meanwhile: loaded without it
        cst = None
    return key if cst is None else (*key, cst.st_size, cst.st_mtime_ns)


PEFT_CONFIG = "adapter_config.json"
MAX_CONFIG_CHARS = 4 * 2**20  # PEFT's config of a large model, with a pattern per module, is ~100 kB
_REDOWNLOAD = "download the file again (it may be incomplete or damaged)"


def _peft_config_path(path: str) -> str | None:
    """The ``adapter_config.json`` PEFT saves beside an ``adapter_model`` file, if it is there."""
    if not os.path.basename(path).startswith("adapter_model"):
        return None
    config = os.path.join(os.path.dirname(path), PEFT_CONFIG)
    return config if os.path.isfile(config) else None


def _read_config(path: str) -> str | None:
    if (config := _peft_config_path(path)) is None:
        return None
    try:
        with open(config, encoding="utf-8") as fh:
            text = fh.read(MAX_CONFIG_CHARS + 1)
    except (OSError, UnicodeDecodeError) as e:
        log.warning("%s: could not read %s beside it (%s); alphas not taken from it", path, PEFT_CONFIG, e)
        return None
    if len(text) > MAX_CONFIG_CHARS:
        log.warning(
            "%s: %s beside it is over %d characters; alphas not taken from it",
            path,
            PEFT_CONFIG,
            MAX_CONFIG_CHARS,
        )
        return None
    return text


def _load(path: str) -> LoadedLora:
    """The file read and parsed; whatever in it breaks the reading is a LoraFileError naming it."""
    name = os.path.basename(path)
    try:
        return _read_and_parse(path, name)
    except LoraFileError:
        raise
    except (ArithmeticError, LookupError, RuntimeError, ValueError) as e:  # RecursionError, UnicodeError...
        raise LoraFileError(
            f"{name}: could not be read as a LoRA ({type(e).__name__}: {str(e)[:200]}); {_REDOWNLOAD}"
        ) from e


def _read_and_parse(path: str, name: str) -> LoadedLora:
    f = read_lora_file(path)
    tensors, layout = convert_layout(f.tensors)
    parsed = parse_lora(tensors, source=name)
    parsed = _with_config_alphas(parsed, f.metadata, _read_config(path))
    if layout is not None:
        parsed = replace(parsed, format=f"{parsed.format} ({layout} layout, renamed as ComfyUI does)")
    if f.notes:
        parsed = replace(parsed, notes=(*f.notes, *parsed.notes))
    held = sum(t.numel() * t.element_size() for t in f.tensors.values())
    return LoadedLora(
        path=path,
        parsed=parsed,
        metadata=dict(f.metadata),
        family=detect_family(tensors, f.metadata),
        triggers=tuple(trigger_words(f.metadata)),
        nbytes=held + sum(len(v) for v in f.metadata.values()),
    )


def _with_config_alphas(
    parsed: ParsedLora, metadata: Mapping[str, str], config_text: str | None
) -> ParsedLora:
    """LoRA modules without an ``.alpha`` take the one their trainer's PEFT config gives, if the file
    carries it (diffusers' header) or PEFT saved it beside the file (``adapter_config.json``)."""
    ranks = {n: a.rank for n, a in parsed.modules.items() if isinstance(a, LoraAdapter) and a.alpha is None}
    read = diffusers_alphas(metadata, ranks)
    source = "the lora_alpha in the file's diffusers header (lora_adapter_metadata), as diffusers loads it"
    if not read.alphas and config_text is not None:
        read = adapter_config_alphas(config_text, ranks)
        source = f"the lora_alpha in the {PEFT_CONFIG} beside the file, as PEFT loads it"
    alphas = read.alphas
    notes = list(read.notes)
    if alphas:
        notes.insert(0, f"{len(alphas)} modules scaled by {source}; ComfyUI core ignores it")
    modules = {n: replace(a, alpha=alphas[n]) if n in alphas else a for n, a in parsed.modules.items()}
    return replace(parsed, modules=modules, notes=(*parsed.notes, *notes)) if notes else parsed


CACHE = _LoraCache()


def load_lora(path: str) -> LoadedLora:
    return CACHE.get(path)
