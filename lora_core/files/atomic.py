"""The pack's one atomic file writer, its temp-name pattern, and the sweep of stale temps it left.

A file appears complete or not at all, and never replaces a file unless the caller asks:
- The data is written inside a private temp folder in the target's folder, named
  ``.<target name>.lora_foundry-<12 hex>.tmp``. A folder, not a file, because some writers
  (safetensors' save_file) make their own temp file beside the path they are given and rename
  it; inside our folder that temp is ours too, so a crash leaves nothing we cannot recognise.
- The file is fsynced, then hard-linked to the target (which refuses an existing target, even
  one created meanwhile) or os.replace'd over it (overwrite=True); the folder is fsynced.
- On any error (interrupts included) the temp folder is removed and the target is untouched.
- The file gets the mode the user's umask gives a new file (0666 & ~umask), whatever mode the
  writer created it with: mkdir applies the umask to the temp folder, and the file takes it.
- A process killed mid-write (kill -9, power loss) leaves its temp behind; every write sweeps
  the pack's own temps older than STALE_AFTER_S from the folder it writes to. Only names of the
  pack's patterns are touched (and only regular files and folders, never symlinks).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
import time
import uuid
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("lora_foundry")

NAME_MAX = 255  # bytes per file name on ext4, XFS, btrfs, APFS, NTFS (UTF-16 units there)
_MARK = ".lora_foundry-"
_TOKEN_HEX = 12
TEMP_OVERHEAD = len(".") + len(_MARK) + _TOKEN_HEX + len(".tmp")  # bytes a temp name adds to its target's
STALE_AFTER_S = 600.0  # a live write touches its temp far more often than this
_DATA = "data"  # the file's name inside the temp folder

_TEMP = re.compile(r"\..+\.lora_foundry-[0-9a-f]{12}\.tmp", re.DOTALL)
# Temps of earlier versions of the pack: a file ".<target>.<8 hex>.tmp" for the files it writes.
_LEGACY = re.compile(r"\..+\.(safetensors|trainstate|trainstate\.json)\.[0-9a-f]{8}\.tmp", re.DOTALL)

Writer = Callable[[Path], None]


def temp_name(target_name: str) -> str:
    """A fresh temp name for a target file name, in the pack's pattern."""
    return f".{target_name}{_MARK}{uuid.uuid4().hex[:_TOKEN_HEX]}.tmp"


def write_bytes(
    path: str | os.PathLike, data: bytes | bytearray | memoryview, *, overwrite: bool = False
) -> Path:
    """Writes ``data`` to ``path`` atomically; see the module docstring. Returns the path."""

    def writer(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            handle.write(data)

    return write_with(path, writer, overwrite=overwrite)


def write_with(path: str | os.PathLike, writer: Writer, *, overwrite: bool = False) -> Path:
    """Calls ``writer(tmp_path)`` to write the whole file at a temp path, then publishes it at
    ``path`` atomically (see the module docstring). Raises FileExistsError if ``path`` exists
    and overwrite is False, FileNotFoundError if its folder does not exist."""
    target = Path(path)
    folder = target.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"folder {folder} does not exist: create it or choose another path")
    if not overwrite and os.path.lexists(target):
        raise exists_error(target)
    sweep_stale(folder)
    tmp_dir = folder / temp_name(target.name)
    os.mkdir(tmp_dir, 0o777)  # the umask applies: its mode tells the file's
    try:
        mode = stat.S_IMODE(os.stat(tmp_dir).st_mode) & 0o666
        data = tmp_dir / _DATA
        writer(data)
        os.chmod(data, mode)
        with open(data, "rb") as handle:
            os.fsync(handle.fileno())
        _publish(data, target, overwrite)
    finally:
        _remove_temp(tmp_dir)
    _fsync_dir(folder)
    return target


def exists_error(path: Path) -> FileExistsError:
    return FileExistsError(
        f"{path} already exists and was left untouched: choose another output name or pass overwrite=True"
    )


def _publish(data: Path, target: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(data, target)
        return
    try:
        os.link(data, target)  # atomic, and refuses a target that appeared since the check above
    except FileExistsError:
        raise exists_error(target) from None
    except OSError:
        # File systems without hard links: the name claimed with O_EXCL (which, like the link,
        # refuses any entry there, a dangling link included), then the data renamed over the claim.
        try:
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            raise exists_error(target) from None
        os.replace(data, target)


def _remove_temp(tmp_dir: Path) -> None:
    """Removes a temp folder of ours and the plain files in it (nothing else is ever in it)."""
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(tmp_dir):
            if not entry.is_dir(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
    with contextlib.suppress(OSError):
        os.rmdir(tmp_dir)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename durable on POSIX; not possible (nor needed) on Windows.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _newest_mtime(entry: os.DirEntry) -> float:
    # A folder's own mtime changes only when entries come and go; the file a live writer is
    # filling inside it has the fresh mtime.
    newest = entry.stat(follow_symlinks=False).st_mtime
    if entry.is_dir(follow_symlinks=False):
        with contextlib.suppress(OSError), os.scandir(entry.path) as inner:
            for item in inner:
                newest = max(newest, item.stat(follow_symlinks=False).st_mtime)
    return newest


def sweep_stale(folder: str | os.PathLike, max_age_s: float = STALE_AFTER_S) -> list[str]:
    """Removes the pack's own temps in ``folder`` (not below it) untouched for ``max_age_s``;
    returns the names removed. Anything else, and any error, is left alone."""
    removed: list[str] = []
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if entry.is_symlink():
            continue
        try:
            # Our temps are folders; earlier versions' were files: each pattern only in its own kind.
            ours = entry.is_dir(follow_symlinks=False) and _TEMP.fullmatch(entry.name)
            legacy = entry.is_file(follow_symlinks=False) and _LEGACY.fullmatch(entry.name)
            if not (ours or legacy) or now - _newest_mtime(entry) < max_age_s:
                continue
            if ours:
                _remove_temp(Path(entry.path))
            else:
                os.unlink(entry.path)
        except OSError:
            continue
        if not os.path.lexists(entry.path):
            removed.append(entry.name)
    if removed:
        log.info(
            "[LoRA Foundry] removed %d stale temp file(s) in %s: %s", len(removed), folder, ", ".join(removed)
        )
    return removed
