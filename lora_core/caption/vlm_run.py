"""Captioning a folder in sentences: plan as for tags, caption each batch of images with one padded generate
call (optionally with the WD14 tagger's tags as hints), clean, write, report."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .captioning import CaptionReport, RunOptions, Tagged, plan_captions
from .captions import CaptionOptions, caption_to_extend, select_tags, write_caption
from .image_files import ImageLoadError, Problem, load_image
from .preprocess import tagger_input, thumbnail
from .tagger import Tagger
from .vlm import Answer, Generation, VlmCaptioner
from .vlm_text import SentenceOptions, clean_caption, florence_task, instruction, merge_sentences

DRAFT_SIZE = 1024  # JPEGs decode at a DCT scale near this; VLM processors resize to about this or less


@dataclass(frozen=True)
class TagHints:
    """The WD14 tagger whose tags are given to the VLM as hints, and how its scores become tags."""

    tagger: Tagger
    options: CaptionOptions


@dataclass
class _Decoded:
    items: list[tuple[Path, Path]]
    images: list
    failed: list[Problem]


def _decode(items: list[tuple[Path, Path]], options: RunOptions) -> _Decoded:
    decoded = _Decoded([], [], [])
    for image_path, caption_path in items:
        try:
            image = load_image(
                image_path,
                draft_size=DRAFT_SIZE if options.fast_decode else None,
                max_pixels=options.max_pixels,
            )
        except ImageLoadError as error:
            decoded.failed.append(Problem(image_path, str(error)))
            continue
        decoded.items.append((image_path, caption_path))
        decoded.images.append(image)
    return decoded


def _hint_tags(images: list, hints: TagHints | None) -> list[list[str]]:
    if hints is None:
        return [[] for _ in images]
    size = hints.tagger.image_size
    probs = hints.tagger.predict(np.stack([tagger_input(image, size) for image in images]))
    # The trigger word is not a tag the picture shows: only the tagger's own tags are hints.
    return [select_tags(row, hints.tagger.tags, hints.options) for row in probs]


def prompts_for(captioner: VlmCaptioner, options: SentenceOptions, tags: list[list[str]]) -> list[str]:
    if captioner.family.task_tokens:
        return [florence_task(options)] * len(tags)
    return [instruction(options, row if options.tag_hints else None) for row in tags]


def write_sentence(target: Path, caption: str, mode: str, root: str) -> str:
    """Writes one caption inside `root`; append mode adds it after the existing text, once."""
    text = caption
    if mode == "append" and (existing := caption_to_extend(target, root)) is not None:
        text = merge_sentences(existing, caption)
    write_caption(target, text + "\n", root)
    return text


def _notes(captioner: VlmCaptioner, options: SentenceOptions, hints: TagHints | None) -> tuple[str, ...]:
    dtype = str(captioner.dtype).replace("torch.", "")
    lines = [
        f"Captioner {captioner.files.name} ({captioner.family.label}) ran on {captioner.device} in {dtype}"
    ]
    if options.tag_hints and captioner.family.task_tokens:
        lines.append("Florence-2 takes no written instruction: the tag hints were not used")
    elif options.tag_hints and hints is None:
        lines.append("tag hints were asked for but no WD14 tagger was given: captions were made without them")
    return tuple(lines)


def caption_folder_vlm(
    folder: Path,
    captioner: VlmCaptioner,
    options: SentenceOptions,
    run_options: RunOptions | None = None,
    hints: TagHints | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> CaptionReport:
    """Caption every image in `folder` in sentences and write `<stem>.txt`; bad files are reported, not fatal.

    `should_stop()` is polled before each batch and between generated tokens; it may return True (stop after
    the batch) or raise (ComfyUI's Cancel). Captions already written stay; nothing else is touched.
    """
    folder = Path(folder)
    run_options = run_options or RunOptions()
    plan = plan_captions(folder, run_options)
    total, done = len(plan.work) + len(plan.skipped), len(plan.skipped)
    tagged: list[Tagged] = []
    failed: list[Problem] = []
    previews: list[np.ndarray] = []
    stopped = False
    generation = Generation(options.max_new_tokens, options.temperature)
    if on_progress:
        on_progress(done, total)
    step = run_options.batch_size
    for start in range(0, len(plan.work), step):
        if should_stop is not None and should_stop():
            stopped = True
            break
        batch = _decode(plan.work[start : start + step], run_options)
        failed += batch.failed
        for image in batch.images[: max(0, run_options.preview_count - len(previews))]:
            previews.append(thumbnail(image, run_options.preview_size))
        prompts = prompts_for(
            captioner, options, _hint_tags(batch.images, hints if options.tag_hints else None)
        )
        answers = captioner.generate(batch.images, prompts, generation, should_stop)
        for (image, target), answer in zip(batch.items, answers, strict=True):
            outcome = _write_answer(image, target, answer, options, run_options.mode, plan.root)
            (tagged if isinstance(outcome, Tagged) else failed).append(outcome)
        done += len(batch.items) + len(batch.failed)
        if on_progress:
            on_progress(done, total)
    return CaptionReport(
        folder, total, tuple(tagged), tuple(plan.skipped), tuple(failed), (), tuple(previews), stopped,
        notes=_notes(captioner, options, hints),
    )  # fmt: skip


def _write_answer(
    image: Path, target: Path, answer: Answer, options: SentenceOptions, mode: str, root: str
) -> Tagged | Problem:
    caption = clean_caption(answer.text, options, answer.finished)
    if not caption or caption == options.trigger_word.strip():
        cut = "" if answer.finished else " (max new tokens stopped it: raise max_new_tokens)"
        return Problem(image, f"the captioner returned no usable text{cut}; nothing written")
    try:
        written = write_sentence(target, caption, mode, root)
    except (OSError, ValueError) as error:
        return Problem(image, f"caption not written: {error}")
    return Tagged(image, target, (written,))
