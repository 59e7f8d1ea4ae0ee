"""Prepare Images: crop or resize a folder to aspect-ratio buckets or a fixed size, into a new folder,
without ever replacing a file there."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..files.confine import create_new, make_folder_within
from .captions import read_caption
from .image_files import DEFAULT_MAX_PIXELS, ImageLoadError, Problem, load_image, scan_folder

TARGETS = ("buckets", "fixed")
FITS = ("crop", "resize")
FORMATS = {
    "png": ("PNG", {"optimize": False}),
    "jpg": ("JPEG", {"quality": 95}),
    "webp": ("WEBP", {"quality": 95}),
}


@dataclass(frozen=True)
class PrepareOptions:
    """`crop`: cover the target and cut the overflow centred (exact size).
    `resize`: fit inside the target keeping the aspect ratio (nothing cut, size <= target)."""

    target: str = "buckets"  # buckets | fixed
    resolution: int = 1024  # buckets: area resolution**2, sides multiples of bucket_step
    width: int = 1024  # fixed
    height: int = 1024  # fixed
    fit: str = "crop"
    bucket_step: int = 64
    allow_upscale: bool = True
    output_format: str = "png"
    recursive: bool = False
    copy_captions: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        for name, allowed in (("target", TARGETS), ("fit", FITS), ("output_format", tuple(FORMATS))):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"`{name}` should be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
                )
        for name in ("resolution", "width", "height", "bucket_step"):
            if getattr(self, name) < 8:
                raise ValueError(f"`{name}` should be at least 8, got {getattr(self, name)}")
        if self.target == "buckets" and self.resolution < 2 * self.bucket_step:
            raise ValueError(f"`resolution` should be at least twice `bucket_step`, got {self.resolution}")


@dataclass(frozen=True)
class Prepared:
    source: Path
    output: Path
    size: tuple[int, int]


@dataclass(frozen=True)
class PrepareReport:
    source: Path
    output: Path
    written: tuple[Prepared, ...]
    skipped: tuple[Problem, ...]
    notes: tuple[Problem, ...] = ()  # images written whose caption was cut, kept or not copied

    def summary(self) -> str:
        lines = [f"{self.source} -> {self.output}: {len(self.written)} written, {len(self.skipped)} skipped"]
        lines += [f"  skipped {p.path.name}: {p.reason}" for p in self.skipped]
        lines += [f"  note {p.path.name}: {p.reason}" for p in self.notes]
        return "\n".join(lines)


def prepare_buckets(resolution: int, step: int = 64) -> list[tuple[int, int]]:
    """Prepare Images' buckets: (width, height) of area <= resolution**2, sides multiples of ``step``
    (the node's bucket_step), from 1:4 to 4:1, sides from about resolution / 2 to 2 * resolution.

    Not the training dataset's rule (lora_core.train.buckets.make_buckets: step 64, sides at least
    resolution / 2, the square always present): the two differ for resolutions that are not a
    multiple of the step and for small ones, so each keeps its own, clearly named."""
    area = resolution * resolution
    buckets = set()
    width = max(step, (resolution // 2) // step * step)
    while width <= 2 * resolution:
        height = min(2 * resolution, area // width // step * step)
        if height >= step and max(width, height) <= 4 * min(width, height):
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    return sorted(buckets)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def fit_image(image: Image.Image, target: tuple[int, int], fit: str) -> Image.Image:
    """Crop: scale to cover `target`, cut centred. Resize: scale to fit inside, keep aspect ratio."""
    w, h = image.size
    tw, th = target
    if fit == "resize":
        scale = min(tw / w, th / h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        return image if size == image.size else image.resize(size, Image.Resampling.LANCZOS)
    scale = max(tw / w, th / h)
    cover = (max(tw, round(w * scale)), max(th, round(h * scale)))
    left, top = (cover[0] - tw) // 2, (cover[1] - th) // 2
    # resize(box=...) resamples only the kept region: one pass, no full-size intermediate.
    box = (left / scale, top / scale, (left + tw) / scale, (top + th) / scale)
    return image.resize((tw, th), Image.Resampling.LANCZOS, box=box)


def _target_for(
    size: tuple[int, int], options: PrepareOptions, buckets: list[tuple[int, int]]
) -> tuple[int, int]:
    return nearest_bucket(size, buckets) if options.target == "buckets" else (options.width, options.height)


def _check_folders(source: Path, output: Path, recursive: bool) -> None:
    src, out = source.resolve(), output.resolve()
    if src == out:
        raise ValueError(
            f"output folder {output} is the source folder: pick a new folder, originals stay unchanged"
        )
    if recursive and src in out.parents:
        raise ValueError(f"output folder {output} is inside the source folder and subfolders are included")
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {output} exists and is not a folder")


def _save_new(image: Image.Image, path: Path, fmt: str) -> None:
    """Saved as a new file (never over an existing one); no EXIF is written (orientation is applied)."""
    kind, params = FORMATS[fmt]
    create_new(path, lambda tmp: image.save(tmp, kind, **params))


def _write_caption_new(path: Path, text: str) -> None:
    create_new(path, lambda tmp: tmp.write_text(text, encoding="utf-8", newline="\n"))


@dataclass(frozen=True)
class _Where:
    source_real: str  # real paths: captions are read only from inside the source,
    output_real: str  # and every file is written only inside the output


def prepare_images(
    source: Path,
    output: Path,
    options: PrepareOptions | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> PrepareReport:
    """Write a prepared copy of every image in `source` into `output`.

    No existing file is ever replaced: an image or caption whose name is taken in `output` is kept
    and reported, so the folder can be re-run and a user's files there are safe.
    """
    source, output = Path(source), Path(output)
    options = options or PrepareOptions()
    _check_folders(source, output, options.recursive)
    scan = scan_folder(source, options.recursive)
    output.mkdir(parents=True, exist_ok=True)  # confined by the caller; levels below are checked
    where = _Where(os.path.realpath(source), os.path.realpath(output))
    buckets = prepare_buckets(options.resolution, options.bucket_step) if options.target == "buckets" else []
    written: list[Prepared] = []
    skipped, notes = list(scan.problems), []
    claimed: set[Path] = set()
    for done, path in enumerate(scan.images):
        if should_stop is not None and should_stop():
            break
        folder = output / path.parent.relative_to(source)
        dest = folder / f"{path.stem}.{options.output_format}"
        if dest in claimed:  # a.jpg and a.png in one folder
            dest = folder / f"{path.stem}_{path.suffix.lstrip('.').lower()}.{options.output_format}"
        problem = _prepare_one(path, dest, options, buckets, where)
        if problem:
            skipped.append(problem)
        else:
            claimed.add(dest)
            with Image.open(dest) as saved:
                written.append(Prepared(path, dest, saved.size))
            note = _copy_caption(path, dest, options, where) if options.copy_captions else None
            if note:
                notes.append(Problem(path, note))
        if on_progress:
            on_progress(done + 1, len(scan.images))
    return PrepareReport(source, output, tuple(written), tuple(skipped), tuple(notes))


def _prepare_one(
    path: Path, dest: Path, options: PrepareOptions, buckets: list, where: _Where
) -> Problem | None:
    if os.path.lexists(dest):
        return Problem(
            path, f"{dest.name} already exists in the output folder; it was kept (delete it to redo)"
        )
    try:
        image = load_image(path, max_pixels=options.max_pixels)
    except ImageLoadError as error:
        return Problem(path, str(error))
    target = _target_for(image.size, options, buckets)
    if not options.allow_upscale and (image.width < target[0] or image.height < target[1]):
        return Problem(
            path, f"{image.width}x{image.height} is smaller than {target[0]}x{target[1]}; upscaling is off"
        )
    try:
        make_folder_within(dest.parent, where.output_real)
        _save_new(fit_image(image, target, options.fit), dest, options.output_format)
    except FileExistsError:
        return Problem(
            path, f"{dest.name} already exists in the output folder; it was kept (delete it to redo)"
        )
    except (OSError, ValueError) as error:
        return Problem(path, f"cannot write {dest.name}: {error}")
    return None


def _copy_caption(path: Path, dest: Path, options: PrepareOptions, where: _Where) -> str | None:
    """Copies the image's caption beside its prepared copy, as a new file; returns a note, or None."""
    try:
        caption = read_caption(path.with_suffix(".txt"), where.source_real)
    except ValueError as error:  # not UTF-8
        return str(error)
    if caption.text is None:
        return caption.note or None
    target = dest.with_suffix(".txt")
    try:
        _write_caption_new(target, caption.text)
    except FileExistsError:
        return f"{target.name} already exists in the output folder; it was kept, not replaced by the copy"
    except OSError as error:
        return f"caption not copied to {target.name}: {error.strerror or error}"
    return caption.note or None
