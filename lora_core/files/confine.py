"""Which folders and files the dataset nodes may touch: the allowed roots, the check every folder typed
into a graph passes, and the safe ways to read an untrusted file and to create a new one.

A graph comes from anyone who reaches the server's port, so a folder it names is confined: its real path
(symlinks resolved) must lie inside one of the roots the server's owner set up. The roots are ComfyUI's
input and output folders (read and write), every models folder ComfyUI knows (read only), and folders the
owner lists in the environment variable LORA_FOUNDRY_ALLOWED_DIRS or in allowed_folders.txt beside the
pack (read and write). Nothing a graph sends can add a root. The error for a folder outside the roots is
the same whether it exists or not, and names only the text the graph sent, never a resolved path.

This module receives the roots as arguments; it never imports ComfyUI (nodes/comfy_bridge.py builds them).
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .atomic import write_with

ENV_VAR = "LORA_FOUNDRY_ALLOWED_DIRS"
ALLOWED_FILE = "allowed_folders.txt"
CAPTION_LIMIT = 64 * 1024  # bytes of a caption file read; kohya captions are a few hundred

OWNER_HINT = (
    "or ask the server's owner to allow that folder (one folder per line in "
    f"{ALLOWED_FILE} in the LoRA Foundry pack folder, or the {ENV_VAR} environment variable)"
)


class ConfinementError(ValueError):
    """A folder outside every allowed root; the message never says whether it exists."""


class NotRegularFileError(OSError):
    """A FIFO, device, socket or folder where a file was expected: it is never read."""


@dataclass(frozen=True)
class Root:
    path: str  # real path (symlinks resolved), as os.path.realpath gives it
    label: str  # how the user knows it: "ComfyUI's input folder"
    writable: bool


@dataclass(frozen=True)
class Roots:
    """The folders nodes may use. `base` is where a relative folder starts (ComfyUI's input folder)."""

    base: str
    roots: tuple[Root, ...]
    protected: tuple[str, ...] = ()  # real paths never written, even inside a writable root

    @classmethod
    def build(
        cls,
        input_dir: str,
        output_dir: str,
        model_dirs: Iterable[str] = (),
        owner_dirs: Iterable[str] = (),
        protected: Iterable[str] = (),
    ) -> Roots:
        roots = [Root(_real(input_dir), "ComfyUI's input folder", True)]
        roots.append(Root(_real(output_dir), "ComfyUI's output folder", True))
        roots += [Root(_real(d), "a folder the server's owner allowed", True) for d in owner_dirs]
        roots += [Root(_real(d), "a models folder (read only)", False) for d in model_dirs]
        return cls(_real(input_dir), tuple(roots), tuple(_real(p) for p in protected))


def _real(path: str | os.PathLike) -> str:
    return os.path.realpath(os.path.expanduser(os.fspath(path)))


def is_within(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """True when `path` is `folder` or below it; both are compared as given (resolve them first)."""
    path, folder = os.path.normcase(os.fspath(path)), os.path.normcase(os.fspath(folder))
    if path == folder:
        return True
    prefix = folder if folder.endswith(os.sep) else folder + os.sep
    return path.startswith(prefix)


def leaves(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """True when `path`'s real location (symlinks followed, missing or not) is outside `folder`'s."""
    return not is_within(_real(path), _real(folder))


# --- the owner's folders -------------------------------------------------------------------------


def parse_allowed(text: str) -> list[str]:
    """allowed_folders.txt: one folder per line; blank lines and lines starting with # are ignored."""
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


@dataclass(frozen=True)
class OwnerFolders:
    folders: tuple[str, ...]
    ignored: tuple[str, ...]  # entries that are not absolute paths, for the server log


def owner_folders(environ: Mapping[str, str], allowed_file: Path | None) -> OwnerFolders:
    """The owner's extra roots from the environment variable and the pack's allowed_folders.txt.

    Only absolute paths (after ~ expansion) count: a relative one has no unambiguous meaning.
    """
    entries = [e.strip() for e in environ.get(ENV_VAR, "").split(os.pathsep) if e.strip()]
    if allowed_file is not None:
        with contextlib.suppress(FileNotFoundError):  # the owner may never have created it
            entries += parse_allowed(Path(allowed_file).read_text(encoding="utf-8-sig"))
    folders, ignored = [], []
    for entry in entries:
        path = os.path.expanduser(entry)
        if os.path.isabs(path):
            folders.append(path)
        else:
            ignored.append(entry)
    return OwnerFolders(tuple(folders), tuple(ignored))


# --- folders typed into a graph ------------------------------------------------------------------


def _clean(text: str, field: str) -> str:
    cleaned = str(text).strip().strip('"').strip("'").strip()
    if not cleaned:
        raise ValueError(f"`{field}` is empty: type a folder inside ComfyUI's input folder, e.g. my_dataset")
    if "\0" in cleaned:
        raise ValueError(f"`{field}` contains a NUL character: type a plain folder name")
    return cleaned


def _outside(field: str, text: str, write: bool) -> ConfinementError:
    if write:
        where = "write into. Use a folder inside ComfyUI's input or output folder (relative folders start in input)"
    else:
        where = (
            "read. Use a folder inside ComfyUI's input folder (relative folders start there), its output "
            "folder or a models folder"
        )
    return ConfinementError(
        f"`{field}` {text!r} is not inside a folder this server lets nodes {where}, {OWNER_HINT}"
    )


def _root_of(real: str, roots: Roots, write: bool) -> Root | None:
    for root in roots.roots:
        if (root.writable or not write) and is_within(real, root.path):
            if write and any(is_within(real, p) for p in roots.protected):
                return None
            return root
    return None


def resolve_folder(text: str, roots: Roots, field: str, write: bool = False, must_exist: bool = True) -> Path:
    """The real path of a folder a graph names, if it lies inside an allowed root (a writable one when
    `write`). Relative folders start in `roots.base`. Raises ConfinementError outside the roots (one
    message whether the path exists or not), NotADirectoryError for a missing folder inside them."""
    cleaned = _clean(text, field)
    raw = os.path.expanduser(cleaned)
    try:
        real = os.path.realpath(raw if os.path.isabs(raw) else os.path.join(roots.base, raw))
    except (OSError, ValueError):  # a name the OS refuses: treated as outside, without detail
        raise _outside(field, cleaned, write) from None
    root = _root_of(real, roots, write)
    if root is None:
        raise _outside(field, cleaned, write)
    if must_exist and not os.path.isdir(real):
        raise NotADirectoryError(
            f"`{field}` {cleaned!r} is not a folder in {root.label}: check the name (relative folders start "
            "in ComfyUI's input folder)"
        )
    return Path(real)


# --- reading an untrusted file -------------------------------------------------------------------


def open_regular(path: str | os.PathLike):
    """A binary file object for `path`, only if it is a regular file.

    Opened with O_NONBLOCK and checked with fstat on the open descriptor, so a FIFO cannot block the
    open and a file swapped after a check is still refused (no check-then-open race).
    Raises NotRegularFileError, or the OSError of the open.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(errno.EINVAL, "not a regular file (a FIFO, device, socket or folder)")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


@dataclass(frozen=True)
class CappedText:
    text: str
    truncated: bool  # the file was longer than the limit; `text` is its start


def read_text_capped(path: str | os.PathLike, limit: int = CAPTION_LIMIT) -> CappedText:
    """A regular file's UTF-8 text (a BOM dropped), at most `limit` bytes of it.

    A multi-byte character cut by the limit is dropped whole. Raises UnicodeDecodeError for text that
    is not UTF-8, NotRegularFileError / OSError as open_regular does.
    """
    with open_regular(path) as handle:
        data = handle.read(limit + 1)
    truncated = len(data) > limit
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    text = decoder.decode(data[:limit], final=not truncated)
    return CappedText(text, truncated)


# --- creating a new file -------------------------------------------------------------------------


def create_new(dest: str | os.PathLike, write) -> None:
    """Writes a new file at `dest` with the pack's atomic writer (files/atomic.py); never replaces
    anything: raises FileExistsError when any entry (file, link, dangling link) has that name.

    `write(path)` fills the temp file; no one ever sees half a file, and the temp is removed on error.
    """
    write_with(dest, write, overwrite=False)


def make_folder_within(folder: str | os.PathLike, root: str | os.PathLike) -> None:
    """Creates `folder` (and missing parents up from `root`) only if every level resolves inside `root`.

    Checked level by level before each mkdir, so a symlinked subfolder pointing elsewhere is refused
    before anything is created through it. Raises ConfinementError naming the folder relative to root.
    """
    Path(root).mkdir(parents=True, exist_ok=True)  # the root itself was confined by resolve_folder
    folder, real_root = Path(folder), _real(root)
    missing: list[Path] = []
    current = folder
    while not os.path.lexists(current) and current != current.parent:
        missing.append(current)
        current = current.parent
    for level in [current, *reversed(missing)]:
        if level is not current:
            # its parent was checked just before; the level itself is checked once it exists
            with contextlib.suppress(FileExistsError):
                os.mkdir(level)
        if not is_within(_real(level), real_root):
            raise ConfinementError(
                f"folder {_shown(folder, root)} leads outside its folder; nothing written there"
            )


def _shown(path: Path, root: str | os.PathLike) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return Path(path).name
