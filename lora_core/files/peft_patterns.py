"""PEFT ``alpha_pattern`` keys matched to module paths as PEFT means them, without running a regex.

PEFT (``peft.utils.other.get_pattern_key``) takes the first key, in the config's order, for which
``re.match(rf"(.*\\.)?({key})$", path)`` succeeds: the key ends the module path on a ``.``
boundary. diffusers and PEFT write module-path suffixes there (``to_v``,
``down_blocks.0.attentions.0.proj_in``). A key comes from a file, so it is never compiled: this
module reads a small subset of regex syntax and matches it in time linear in the path:

- letters, digits, ``_`` and ``-`` stand for themselves;
- ``.`` and ``\\.`` are the dot between module names (a regex ``.`` is any character, but module
  paths only ever have a dot there);
- ``.*`` is any run of characters; a leading ``^`` ties the key to the path's start and a
  trailing ``$`` is allowed (PEFT adds one anyway).

Any other syntax (``+``, ``(``, ``[``, ``|``, ``\\w``...) is not run: the key is listed in
``skipped`` and the modules it would match keep ``lora_alpha``.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass

_PLAIN = frozenset(string.ascii_letters + string.digits + "_-")
MAX_WILDCARD_KEYS = 64  # each costs a scan per module; literal keys cost a dict lookup
MAX_PATH = 512  # real module paths are under 200 characters; longer ones are not matched


@dataclass(frozen=True)
class PatternKey:
    """One key read in the subset: literal pieces between ``.*`` wildcards."""

    pieces: tuple[str, ...]  # one piece: no wildcard
    anchored: bool  # a leading ``^``: the key starts the path, not only a dotted suffix of it


def read_key(key: str) -> PatternKey | None:
    """The key in the subset above, or None when it uses any other regex syntax."""
    anchored = key.startswith("^")
    body = key[1:] if anchored else key
    body = body[:-1] if body.endswith("$") and not body.endswith("\\$") else body
    pieces, piece, i = [], [], 0
    while i < len(body):
        c = body[i]
        if c == "." and body[i + 1 : i + 2] == "*":
            pieces.append("".join(piece))
            piece, i = [], i + 2
            continue
        if c == "\\" and body[i + 1 : i + 2] == ".":
            piece.append(".")
            i += 2
            continue
        if c != "." and c not in _PLAIN:
            return None
        piece.append(c)
        i += 1
    pieces.append("".join(piece))
    return PatternKey(tuple(pieces), anchored)


def _starts(path: str, anchored: bool):
    """Where a key may begin in ``path``: its start, or (unanchored) just after any dot."""
    yield 0
    if not anchored:
        at = path.find(".")
        while at != -1:
            yield at + 1
            at = path.find(".", at + 1)


def matches(key: PatternKey, path: str) -> bool:
    """Whether ``key`` ends ``path`` from one of the places it may begin (PEFT's rule)."""
    first, last = key.pieces[0], key.pieces[-1]
    if len(key.pieces) == 1:
        return path == first if key.anchored else path == first or path.endswith("." + first)
    if not path.endswith(last):
        return False
    end = len(path) - len(last)
    # The leftmost start whose first piece fits leaves the most room for the rest, so one is enough.
    for start in _starts(path, key.anchored):
        if start + len(first) <= end and path.startswith(first, start):
            at = start + len(first)
            for middle in key.pieces[1:-1]:
                at = path.find(middle, at, end)
                if at == -1:
                    return False
                at += len(middle)
            return True
    return False


@dataclass(frozen=True)
class AlphaPatterns:
    """An ``alpha_pattern`` read once: each key's place in the config's order and its alpha."""

    suffixes: Mapping[str, tuple[int, float]]  # a plain key: the path is it or ends with "." + it
    whole: Mapping[str, tuple[int, float]]  # a plain key after ``^``: the path is it
    wildcards: tuple[tuple[int, PatternKey, float], ...]
    skipped: tuple[str, ...]  # keys with syntax outside the subset, or wildcards over the cap

    def alpha_for(self, path: str) -> float | None:
        """The alpha of the first key (in the config's order) that matches ``path``, or None."""
        if len(path) > MAX_PATH:
            return None
        found: list[tuple[int, float]] = []
        if path in self.whole:
            found.append(self.whole[path])
        for start in _starts(path, anchored=False):
            if path[start:] in self.suffixes:
                found.append(self.suffixes[path[start:]])
        found += [(order, alpha) for order, key, alpha in self.wildcards if matches(key, path)]
        return min(found)[1] if found else None


def read_alpha_pattern(pattern: Mapping[object, object], number) -> AlphaPatterns:
    """``pattern`` (key -> alpha) read into the subset; ``number`` turns a value into a float or None
    (keys whose value is not a number are passed over, as before: they name no alpha)."""
    suffixes: dict[str, tuple[int, float]] = {}
    whole: dict[str, tuple[int, float]] = {}
    wildcards: list[tuple[int, PatternKey, float]] = []
    skipped: list[str] = []
    for order, (key, value) in enumerate(pattern.items()):
        alpha = number(value)
        if not isinstance(key, str) or alpha is None:
            continue
        read = read_key(key)
        if read is None or (len(read.pieces) > 1 and len(wildcards) >= MAX_WILDCARD_KEYS):
            skipped.append(key)
        elif len(read.pieces) > 1:
            wildcards.append((order, read, alpha))
        else:
            table = whole if read.anchored else suffixes
            table.setdefault(read.pieces[0], (order, alpha))
    return AlphaPatterns(suffixes, whole, tuple(wildcards), tuple(skipped))
