"""Captioning a folder: plan, decode the next batch in a thread while the model runs, write, report."""

from __future__ import annotations

import os
import queue
import stat
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..files.confine import leaves
from .captions import (
    CaptionOptions,
    build_caption,
    caption_text,
    caption_to_extend,
    merge_caption,
    write_caption,
)
from .image_files import DEFAULT_MAX_PIXELS, ImageLoadError, Problem, load_image, scan_folder
from .preprocess import tagger_input, thumbnail
from .tagger import Tagger, get_tagger

MODES = ("overwrite", "append", "skip")
DECODE_NICE = 10  # how much lower than the caller the decode thread runs (Linux; 0 to keep it equal)


def _lower_thread_priority(step: int) -> None:
    """Make the calling thread yield to inference (Linux: nice applies per thread).

    onnxruntime's worker threads meet at the end of every op, so a decode thread that preempts
    one of them stalls them all; at a lower priority it takes the gaps instead. A no-op where
    the platform does not allow it.
    """
    if step <= 0 or not sys.platform.startswith("linux"):
        return  # elsewhere PRIO_PROCESS with a thread id would name a process, not this thread
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + step))
    except OSError:
        pass


@dataclass(frozen=True)
class RunOptions:
    """What to caption and where captions go."""

    mode: str = "skip"  # overwrite | append | skip (images that already have a caption)
    output_dir: Path | None = None  # None: beside the images
    recursive: bool = False
    batch_size: int = 4
    fast_decode: bool = True  # JPEG DCT-scaled decoding near the model size
    max_pixels: int = DEFAULT_MAX_PIXELS
    preview_count: int = 16
    preview_size: int = 128
    extension: str = ".txt"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"`mode` should be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.batch_size < 1:
            raise ValueError(f"`batch_size` should be at least 1, got {self.batch_size}")
        if self.max_pixels < 1:
            raise ValueError(f"`max_pixels` should be positive, got {self.max_pixels}")
        if self.preview_count < 0 or self.preview_size < 8:
            raise ValueError(
                f"`preview_count` >= 0 and `preview_size` >= 8 expected, got {self.preview_count}, {self.preview_size}"
            )
        if not self.extension.startswith(".") or self.extension.lower() in (".jpg", ".png", ".onnx"):
            raise ValueError(
                f"`extension` should be a caption extension such as '.txt', got {self.extension!r}"
            )


@dataclass(frozen=True)
class Tagged:
    image: Path
    caption_path: Path
    tags: tuple[str, ...]


@dataclass(frozen=True)
class CaptionReport:
    folder: Path
    total: int
    tagged: tuple[Tagged, ...]
    skipped: tuple[Problem, ...]
    failed: tuple[Problem, ...]
    tag_counts: tuple[tuple[str, int], ...]  # most frequent first
    previews: tuple[np.ndarray, ...]  # (size, size, 3) uint8 RGB
    stopped: bool = False
    providers: tuple[str, ...] = ()  # onnxruntime providers of the session, in use order
    notes: tuple[str, ...] = ()  # lines for the summary from other captioners (which model, device, dtype)

    def captions_text(self) -> str:
        return "\n".join(f"{_rel(t.image, self.folder)}: {', '.join(t.tags)}" for t in self.tagged)

    def summary(self, top: int = 30) -> str:
        lines = [
            f"{self.folder}: {self.total} images; {len(self.tagged)} tagged, {len(self.skipped)} skipped, "
            f"{len(self.failed)} failed"
            + (" (stopped early; the rest was not touched)" if self.stopped else "")
        ]
        if self.providers:
            lines.append(f"Tagger ran on {self.providers[0]}")
        lines += list(self.notes)
        for title, problems in (("Skipped", self.skipped), ("Failed", self.failed)):
            if problems:
                lines.append(f"{title}:")
                lines += [f"  {_rel(p.path, self.folder)}: {p.reason}" for p in problems]
        if self.tag_counts:
            lines.append(
                f"Tag frequency (top {min(top, len(self.tag_counts))} of {len(self.tag_counts)} tags):"
            )
            lines += [f"  {count:5d}  {tag}" for tag, count in self.tag_counts[:top]]
        return "\n".join(lines)


def _rel(path: Path, folder: Path) -> str:
    try:
        return path.relative_to(folder).as_posix()
    except ValueError:
        return str(path)


@dataclass
class _Plan:
    root: str  # real path of the folder captions are written in (the output folder or the image folder)
    work: list[tuple[Path, Path]] = field(default_factory=list)  # (image, caption path)
    skipped: list[Problem] = field(default_factory=list)


def _unusable_caption(target: Path, root: str) -> str | None:
    """Why an existing caption path must be left alone whatever the mode, or None."""
    if not os.path.lexists(target):
        return None
    if leaves(target, root):
        return f"its caption {target.name} is a link leading outside the folder; left as it is"
    try:
        regular = stat.S_ISREG(os.stat(target).st_mode)
    except OSError:
        regular = False  # a broken link inside the folder
    return None if regular else f"its caption {target.name} is not a regular file; left as it is"


def plan_captions(folder: Path, options: RunOptions) -> _Plan:
    """Which images to tag and where each caption goes; skip mode and name clashes decided here."""
    scan = scan_folder(folder, options.recursive, exclude=options.output_dir, keep_suffix=options.extension)
    plan = _Plan(os.path.realpath(options.output_dir or folder), skipped=list(scan.problems))
    owners: dict[Path, Path] = {}
    for image in scan.images:
        base = options.output_dir / image.parent.relative_to(folder) if options.output_dir else image.parent
        target = base / (image.stem + options.extension)
        unusable = _unusable_caption(target, plan.root)
        if target in owners:
            reason = (
                f"its caption {target.name} would be the same file as {owners[target].name}'s; rename one"
            )
            plan.skipped.append(Problem(image, reason))
        elif unusable:
            plan.skipped.append(Problem(image, unusable))
        elif options.mode == "skip" and target.exists():
            plan.skipped.append(Problem(image, f"already has a caption ({target.name}); mode is 'skip'"))
            owners[target] = image
        else:
            owners[target] = image
            plan.work.append((image, target))
    return plan


@dataclass
class _Batch:
    items: list[tuple[Path, Path]]
    pixels: np.ndarray | None  # (N, S, S, 3) for the decoded items
    failed: list[Problem]
    thumbs: list[np.ndarray]
    error: BaseException | None = None


def _decode(items: list[tuple[Path, Path]], tagger: Tagger, options: RunOptions, want_thumbs: int) -> _Batch:
    ok, arrays, failed, thumbs = [], [], [], []
    draft = tagger.image_size if options.fast_decode else None
    for image_path, caption_path in items:
        try:
            image = load_image(image_path, draft_size=draft, max_pixels=options.max_pixels)
            arrays.append(tagger_input(image, tagger.image_size))
        except ImageLoadError as error:
            failed.append(Problem(image_path, str(error)))
            continue
        ok.append((image_path, caption_path))
        if len(thumbs) < want_thumbs:
            thumbs.append(thumbnail(image, options.preview_size))
    return _Batch(ok, np.stack(arrays) if arrays else None, failed, thumbs)


def _prefetch(
    work: list[tuple[Path, Path]], tagger: Tagger, options: RunOptions, stop: threading.Event
) -> Iterator[_Batch]:
    """Batches decoded by a worker thread, at most two ahead of the consumer."""
    out: queue.Queue[_Batch | None] = queue.Queue(maxsize=2)
    step = tagger.fixed_batch or options.batch_size
    chunks = [work[i : i + step] for i in range(0, len(work), step)]

    def put(item: _Batch | None) -> None:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def worker() -> None:
        thumbs_left = options.preview_count
        _lower_thread_priority(DECODE_NICE)
        try:
            for chunk in chunks:
                if stop.is_set():
                    break
                batch = _decode(chunk, tagger, options, thumbs_left)
                thumbs_left -= len(batch.thumbs)
                put(batch)
        except BaseException as error:  # handed to the consumer, which re-raises it
            put(_Batch([], None, [], [], error))
        put(None)

    thread = threading.Thread(target=worker, name="lora-foundry-caption-decode", daemon=True)
    thread.start()
    try:
        while (batch := out.get()) is not None:
            if batch.error is not None:
                raise batch.error
            yield batch
    finally:
        stop.set()
        thread.join(timeout=30)


def _write_one(target: Path, new_tags: list[str], options: CaptionOptions, mode: str, root: str) -> list[str]:
    """Writes one caption inside `root` (the user chose overwrite / append for existing ones)."""
    tags = new_tags
    if mode == "append" and (existing := caption_to_extend(target, root)) is not None:
        tags = merge_caption(existing, new_tags, options.trigger_word)
    write_caption(target, caption_text(tags), root)
    return tags


def caption_folder(
    folder: Path,
    tagger: Tagger | Path | str,
    caption_options: CaptionOptions,
    run_options: RunOptions | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> CaptionReport:
    """Tag every image in `folder` and write `<stem>.txt` captions; bad files are reported, not fatal.

    `should_stop()` is polled before each batch; it may return True or raise (ComfyUI's interrupt).
    Captions already written stay; nothing else is touched.
    """
    folder = Path(folder)
    if not isinstance(tagger, Tagger):
        tagger = get_tagger(Path(tagger))
    run_options = run_options or RunOptions()
    plan = plan_captions(folder, run_options)
    total = len(plan.work) + len(plan.skipped)
    done = len(plan.skipped)
    tagged: list[Tagged] = []
    failed: list[Problem] = []
    previews: list[np.ndarray] = []
    counts: Counter[str] = Counter()
    stopped = False
    if on_progress:
        on_progress(done, total)
    batches = _prefetch(plan.work, tagger, run_options, threading.Event())
    try:
        for batch in batches:
            if should_stop is not None and should_stop():
                stopped = True
                break
            failed += batch.failed
            previews += batch.thumbs
            probs = tagger.predict(batch.pixels) if batch.pixels is not None else np.zeros((0, 0))
            for (image, target), scores in zip(batch.items, probs, strict=True):
                new_tags = build_caption(scores, tagger.tags, caption_options)
                try:
                    tags = _write_one(target, new_tags, caption_options, run_options.mode, plan.root)
                except (OSError, ValueError) as error:
                    failed.append(Problem(image, f"caption not written: {error}"))
                    continue
                tagged.append(Tagged(image, target, tuple(tags)))
                counts.update(tags)
            done += len(batch.items) + len(batch.failed)
            if on_progress:
                on_progress(done, total)
    finally:
        batches.close()  # stops and joins the decode thread at once, also on an exception
    return CaptionReport(
        folder, total, tuple(tagged), tuple(plan.skipped), tuple(failed),
        tuple(counts.most_common()), tuple(previews), stopped, tuple(tagger.providers),
    )  # fmt: skip
