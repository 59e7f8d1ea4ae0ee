"""Caption text: from tag probabilities (thresholds, ordering, exclusions, formatting), merging, and
reading and writing caption files."""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..files.atomic import write_bytes
from ..files.confine import CAPTION_LIMIT, NotRegularFileError, leaves, make_folder_within, read_text_capped
from .tagger import CHARACTER, GENERAL, TagList

# Tags whose underscores are the face itself; the reference taggers leave them alone.
KAOMOJIS = frozenset(
    {"0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o", "@_@",
     "^_^", "o_o", "u_u", "x_x", "|_|", "||_||"}
)  # fmt: skip


@dataclass(frozen=True)
class CaptionOptions:
    """How model scores become a caption. Tag names may be typed with spaces or underscores."""

    general_threshold: float = 0.35
    character_threshold: float = 0.85
    trigger_word: str = ""
    always_first: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    replacements: tuple[tuple[str, str], ...] = ()
    replace_underscores: bool = True
    escape_brackets: bool = True
    max_tags: int = 0  # 0: no limit; counts model tags, not the trigger word

    def __post_init__(self) -> None:
        for field in ("general_threshold", "character_threshold"):
            value = getattr(self, field)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"`{field}` should be between 0 and 1, got {value}")
        if self.max_tags < 0:
            raise ValueError(f"`max_tags` should be 0 (no limit) or positive, got {self.max_tags}")
        for field in ("always_first", "exclude", "replacements"):
            if not isinstance(getattr(self, field), tuple):
                raise ValueError(f"`{field}` should be a tuple, got {type(getattr(self, field)).__name__}")
        if "," in self.trigger_word:
            raise ValueError(f"`trigger_word` should be one tag without commas, got {self.trigger_word!r}")


def _unescape(tag: str) -> str:
    return tag.replace("\\(", "(").replace("\\)", ")")


@functools.lru_cache(maxsize=1 << 16)
def tag_key(tag: str) -> str:
    """The form tags are compared in: unescaped, lower case, underscores as spaces (except kaomoji)."""
    tag = _unescape(tag.strip()).lower()
    if tag not in KAOMOJIS:
        tag = tag.replace("_", " ")
    return re.sub(r"\s+", " ", tag).strip()


def format_tag(tag: str, options: CaptionOptions) -> str:
    """A tag as written to the caption file; idempotent on already formatted tags."""
    tag = _unescape(tag.strip())
    if options.replace_underscores and tag not in KAOMOJIS:
        tag = tag.replace("_", " ")
    if options.escape_brackets:
        tag = tag.replace("(", "\\(").replace(")", "\\)")
    return tag


def _above(probs: np.ndarray, indices: np.ndarray, threshold: float) -> list[int]:
    """Indices whose score is strictly above threshold, highest score first (ties in index order)."""
    chosen = indices[probs[indices] > threshold]
    return chosen[np.argsort(-probs[chosen], kind="stable")].tolist()


def select_tags(probs: np.ndarray, tags: TagList, options: CaptionOptions) -> list[str]:
    """Model tags for one image, formatted and ordered: always-first, characters, general (by score)."""
    picked = _above(probs, tags.indices(CHARACTER), options.character_threshold)
    picked += _above(probs, tags.indices(GENERAL), options.general_threshold)
    excluded = {tag_key(t) for t in options.exclude}
    replace = {tag_key(old): new for old, new in options.replacements}
    result: list[str] = []
    seen: set[str] = set()
    for index in picked:
        name = tags.names[index]
        key = tag_key(name)
        if key in excluded:
            continue
        if key in replace:
            name = replace[key]
            key = tag_key(name)
            if not key or key in excluded:
                continue
        if key not in seen:
            seen.add(key)
            result.append(format_tag(name, options))
    if options.always_first:
        rank: dict[str, int] = {}
        for position, tag in enumerate(options.always_first):
            rank.setdefault(tag_key(tag), position)
        result.sort(key=lambda t: rank.get(tag_key(t), len(options.always_first)))
    return result[: options.max_tags] if options.max_tags else result


def dedupe(tags: list[str]) -> list[str]:
    """Drop empty tags and repeats (compared by tag_key), keeping the first occurrence."""
    seen: set[str] = set()
    out: list[str] = []
    for tag in tags:
        key = tag_key(tag)
        if key and key not in seen:
            seen.add(key)
            out.append(tag.strip())
    return out


def build_caption(probs: np.ndarray, tags: TagList, options: CaptionOptions) -> list[str]:
    """The full new caption: trigger word first, then the model tags."""
    head = [options.trigger_word.strip()] if options.trigger_word.strip() else []
    return dedupe(head + select_tags(probs, tags, options))


def split_caption(text: str) -> list[str]:
    return [t.strip() for t in text.replace("\n", ",").split(",") if t.strip()]


def merge_caption(existing: str, new: list[str], trigger_word: str = "") -> list[str]:
    """Append mode: trigger word, the existing tags in their order, then new tags not already there."""
    head = [trigger_word.strip()] if trigger_word.strip() else []
    return dedupe(head + split_caption(existing) + new)


def parse_tag_list(text: str) -> tuple[str, ...]:
    """'a, b_c\\nd' -> ('a', 'b_c', 'd'): commas or new lines separate tags."""
    return tuple(split_caption(text))


def parse_replacements(text: str) -> tuple[tuple[str, str], ...]:
    """'old -> new, other -> ' -> (('old', 'new'), ('other', '')); an empty right side removes the tag."""
    pairs = []
    for entry in split_caption(text):
        if "->" not in entry:
            raise ValueError(f"tag replacement {entry!r} has no '->': write it as 'old tag -> new tag'")
        old, new = entry.split("->", 1)
        if not old.strip():
            raise ValueError(f"tag replacement {entry!r} has nothing before '->'")
        pairs.append((old.strip(), new.strip()))
    return tuple(pairs)


def caption_text(tags: list[str]) -> str:
    return ", ".join(tags) + "\n"


@dataclass(frozen=True)
class CaptionRead:
    """An existing caption file as read: its text (None when there is none to use) and, when it was
    cut or left unread, why, for the node's summary."""

    text: str | None
    note: str = ""
    truncated: bool = False


def read_caption(path: Path, folder: Path | None = None, limit: int = CAPTION_LIMIT) -> CaptionRead:
    """An existing caption's text, read as an untrusted file.

    Only a regular file is read (a FIFO or device is never opened for blocking reads), at most `limit`
    bytes of it; with `folder`, a caption whose real path leaves that folder (a symlink out of the
    data set) is not read at all. Text that is not UTF-8 raises ValueError (the caller decides).
    """
    path = Path(path)
    if folder is not None and os.path.lexists(path) and leaves(path, folder):
        return CaptionRead(None, f"caption {path.name} is a link leading outside the folder; not read")
    try:
        read = read_text_capped(path, limit)
    except FileNotFoundError:
        return CaptionRead(None)
    except NotRegularFileError:
        return CaptionRead(
            None, f"caption {path.name} is not a regular file (FIFO, device or socket); not read"
        )
    except OSError as error:
        return CaptionRead(None, f"caption {path.name} cannot be read ({error.strerror or error}); not used")
    except UnicodeDecodeError as error:
        raise ValueError(f"existing caption {path.name} is not UTF-8 text; it was left as it is") from error
    if read.truncated:
        note = f"caption {path.name} is longer than {limit // 1024} KB; only its first {limit // 1024} KB are used"
        return CaptionRead(read.text, note, truncated=True)
    return CaptionRead(read.text)


def caption_to_extend(target: Path, root: str) -> str | None:
    """The existing caption that append mode adds to (None: there is none). One longer than the
    limit, or one that could not be read, is refused, so it is left as it is."""
    existing = read_caption(target, root)
    if existing.truncated:
        raise ValueError(
            f"existing caption {target.name} is longer than {CAPTION_LIMIT // 1024} KB; left as it is"
        )
    if existing.note:
        raise ValueError(existing.note)
    return existing.text


def write_caption(target: Path, text: str, root: str) -> None:
    """Writes one caption file inside `root` (its folder made there, never outside), atomically."""
    make_folder_within(target.parent, root)
    write_text_atomic(target, text)


def write_text_atomic(path: Path, text: str) -> None:
    """Write with the pack's atomic writer (files/atomic.py), so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, text.encode("utf-8"), overwrite=True)
