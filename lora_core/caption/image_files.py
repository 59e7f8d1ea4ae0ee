"""Finding image files in an untrusted folder and decoding them safely: each failure is a reason, never a
crash, and nothing outside the folder or other than a regular file is read."""

from __future__ import annotations

import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError

from ..files.confine import NotRegularFileError, is_within, open_regular
from .preprocess import to_rgb

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

# Pillow's own decompression-bomb limit (it warns above this and refuses above twice this).
# We refuse above it, per call, without changing Pillow's process-wide setting that the
# rest of ComfyUI shares: 89.5 megapixels is about 11000 x 8000.
DEFAULT_MAX_PIXELS = 89_478_485


class ImageLoadError(Exception):
    """An image that cannot be used; the message is the reason shown to the user."""


@dataclass(frozen=True)
class Problem:
    """A file or folder that was skipped or failed, with the reason."""

    path: Path
    reason: str


@dataclass(frozen=True)
class FolderScan:
    images: tuple[Path, ...]
    problems: tuple[Problem, ...]


LINK_OUT = "a link leading outside the folder; skipped"
NOT_REGULAR = "not a regular file (FIFO, device or socket); skipped"


def scan_folder(
    folder: Path, recursive: bool = False, exclude: Path | None = None, keep_suffix: str = ".txt"
) -> FolderScan:
    """Image files under `folder` (sorted; hidden entries ignored). Unreadable subfolders are reported.

    The folder is untrusted: an entry whose real path leaves it (a symlinked image or folder pointing
    elsewhere) and an image name that is not a regular file (a FIFO, device or socket) are reported by
    name and skipped. Linked subfolders are never followed. Links named `*<keep_suffix>` are left to
    the caption reader, which reports them where a caption is wanted.
    Raises NotADirectoryError / PermissionError when `folder` itself cannot be listed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"folder {folder} does not exist or is not a folder")
    real = os.path.realpath(folder)
    images: list[Path] = []
    problems: list[Problem] = []
    pending = [folder]
    excluded = exclude.resolve() if exclude is not None else None
    while pending:
        current = pending.pop()
        try:
            entries = sorted(os.scandir(current), key=lambda e: e.name)
        except OSError as error:
            if current == folder:
                raise PermissionError(f"cannot list folder {folder}: {error.strerror or error}") from error
            problems.append(Problem(Path(current), f"cannot list this folder: {error.strerror or error}"))
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            if entry.is_symlink() and not is_within(os.path.realpath(path), real):
                if path.suffix.lower() != keep_suffix:
                    problems.append(Problem(path, LINK_OUT))
            elif recursive and entry.is_dir(follow_symlinks=False):
                if excluded is None or path.resolve() != excluded:
                    pending.append(path)
            elif path.suffix.lower() in IMAGE_EXTENSIONS:
                kind = _kind(entry)
                if kind == "file":
                    images.append(path)
                elif kind != "dir":
                    problems.append(
                        Problem(path, NOT_REGULAR if kind == "other" else "a broken link; skipped")
                    )
    return FolderScan(tuple(sorted(images)), tuple(problems))


def _kind(entry: os.DirEntry) -> str:
    """'file', 'dir', 'other' (FIFO, device, socket) or 'missing' (a broken link) for a scanned entry."""
    try:
        mode = entry.stat().st_mode
    except FileNotFoundError:
        return "missing"
    except OSError:
        return "other"
    return "file" if stat.S_ISREG(mode) else "dir" if stat.S_ISDIR(mode) else "other"


def _draft_request(size: tuple[int, int], target: int) -> tuple[int, int]:
    """A draft size keeping the longest side >= target, so JPEG DCT scaling never undershoots."""
    longest = max(size)
    return (max(1, math.ceil(target * size[0] / longest)), max(1, math.ceil(target * size[1] / longest)))


def _describe(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _open_checked(handle: BinaryIO, max_pixels: int) -> Image.Image:
    if os.fstat(handle.fileno()).st_size == 0:
        raise ImageLoadError("empty file (0 bytes)")
    try:
        image = Image.open(handle)
    except UnidentifiedImageError as error:
        raise ImageLoadError("not an image Pillow can read (unknown or damaged format)") from error
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageLoadError(f"refused as a decompression bomb: {error}") from error
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageLoadError(
            f"too large: {width}x{height} = {width * height:,} pixels exceeds the limit of {max_pixels:,} "
            "(possible decompression bomb); downscale it first"
        )
    return image


def _open_file(path: Path) -> BinaryIO:
    try:
        return open_regular(path)
    except NotRegularFileError as error:
        raise ImageLoadError("not a regular file (FIFO, device or socket)") from error
    except OSError as error:
        raise ImageLoadError(f"cannot read file: {error.strerror or error}") from error


def load_image(
    path: Path, draft_size: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Decode an image to RGB: first frame, EXIF orientation applied, transparency on white.

    With `draft_size`, JPEGs are decoded at a reduced DCT scale whose longest side is still
    >= draft_size (much faster for large photos). Raises ImageLoadError with the reason.
    """
    with _open_file(Path(path)) as handle:
        return _decode(_open_checked(handle, max_pixels), draft_size)


def _decode(image: Image.Image, draft_size: int | None) -> Image.Image:
    try:
        with image:
            if getattr(image, "is_animated", False):
                image.seek(0)
            if draft_size and image.format in ("JPEG", "MPO"):
                image.draft("RGB", _draft_request(image.size, draft_size))
            image.load()
            try:
                oriented = ImageOps.exif_transpose(image)
            except Exception:  # damaged EXIF must not cost the picture itself
                oriented = image
            rgb = to_rgb(oriented)
            rgb.load()
            return rgb if rgb is not image else image.copy()
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageLoadError(f"refused as a decompression bomb: {error}") from error
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError, IndexError) as error:
        raise ImageLoadError(f"cannot decode: {_describe(error)}") from error
