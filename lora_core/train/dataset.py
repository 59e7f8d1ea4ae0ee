"""Training data: a folder of images and captions, read once into cached latents and text embeddings.

Folder layout (kohya): images with same-name ``.txt`` captions, either directly in the folder
(``default_repeats`` each) or in ``N_name`` subfolders repeated N times per epoch. Nothing in the
folder is written, and nothing outside it is read (links leading out are skipped and reported). Latents are encoded once per image (and once more flipped when flips are on);
caption embeddings once per distinct caption when captions do not change between steps. The
cache lives in memory, or on disk as safetensors keyed by file, size, time, bucket and encoder.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from torch import Tensor

from ..caption.captions import read_caption, split_caption
from ..caption.image_files import ImageLoadError, Problem, load_image, scan_folder
from ..files.confine import is_within
from .buckets import Size, center_crop, center_offset, make_buckets, nearest_bucket, resize_cover
from .trainer import Batch

REPEAT_DIR = re.compile(r"^(\d+)_(.+)$")
CROPS = ("center", "random")

EncodeImages = Callable[[Tensor], Tensor]  # (B, H, W, 3) float 0..1 -> (B, C, H/8, W/8) raw latents
EncodeTexts = Callable[[list[str]], dict[str, Tensor]]  # captions -> {"context": (B, L, D), ...}


@dataclass(frozen=True)
class DatasetOptions:
    resolution: int = 512
    buckets: bool = True  # aspect-ratio buckets; False: every image cropped square
    crop: str = "center"
    flip: bool = False
    trigger_word: str = ""
    shuffle_tags: bool = False
    keep_tags: int = 0  # tags after the trigger word that stay in place when shuffling
    caption_dropout: float = 0.0
    default_repeats: int = 1
    caption_extension: str = ".txt"

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise ValueError(f"`crop` should be one of {', '.join(CROPS)}, got {self.crop!r}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"`caption_dropout` should be in [0, 1], got {self.caption_dropout}")
        if self.keep_tags < 0 or self.default_repeats < 1:
            raise ValueError(
                f"`keep_tags` >= 0 and `default_repeats` >= 1 expected, got {self.keep_tags}, {self.default_repeats}"
            )
        make_buckets(self.resolution)  # checks the resolution

    @property
    def captions_vary(self) -> bool:
        """Captions differ between steps, so their embeddings cannot be cached once."""
        return self.shuffle_tags


@dataclass(frozen=True)
class ImageEntry:
    path: Path
    caption: str  # tags as written in the file (may be empty)
    repeats: int
    subset: str  # the folder it came from, as kohya names it in ss_tag_frequency


@dataclass(frozen=True)
class DatasetScan:
    folder: Path
    entries: tuple[ImageEntry, ...]
    problems: tuple[Problem, ...]
    without_caption: int


def scan_dataset(folder: Path, options: DatasetOptions) -> DatasetScan:
    """Images and captions of a training folder, kohya ``N_name`` subfolders included.

    The folder is untrusted: images, captions and N_name folders whose real path leaves it (symlinks
    pointing elsewhere) are skipped and reported by name, captions are read only from regular files
    and at most CAPTION_LIMIT bytes of each (cut ones are reported).
    """
    folder = Path(folder)
    real = os.path.realpath(folder)
    groups: list[tuple[Path, int, str]] = [(folder, options.default_repeats, folder.name)]
    problems: list[Problem] = []
    for sub in _subfolders(folder, real):
        m = REPEAT_DIR.match(sub.name)
        if m and int(m[1]) > 0:
            groups.append((sub, int(m[1]), sub.name))
        else:
            problems.append(Problem(sub, "subfolder ignored: name it N_name (e.g. 10_mychar) to train on it"))
    entries, missing = [], 0
    for path, repeats, subset in groups:
        scan = scan_folder(path, keep_suffix=options.caption_extension)
        problems += scan.problems
        for image in scan.images:
            caption = read_caption(image.with_suffix(options.caption_extension), real)
            if caption.note:
                problems.append(Problem(image.with_suffix(options.caption_extension), caption.note))
            missing += caption.text is None
            entries.append(ImageEntry(image, (caption.text or "").strip(), repeats, subset))
    if not entries:
        raise FileNotFoundError(
            f"no images found in {folder} (nor in N_name subfolders): put .png/.jpg files there "
            "with same-name .txt captions"
        )
    return DatasetScan(folder, tuple(entries), tuple(problems), missing)


def _subfolders(folder: Path, real: str) -> list[Path]:
    """Visible subfolders whose real path stays inside the data set (links out are reported by
    scan_folder, which lists the top folder)."""
    subs = []
    for entry in os.scandir(folder):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        if not entry.is_symlink() or is_within(os.path.realpath(entry.path), real):
            subs.append(Path(entry.path))
    return sorted(subs)


def caption_tags(caption: str, trigger: str) -> list[str]:
    """Tags with the trigger word first (and only once)."""
    tags = [t for t in split_caption(caption) if t != trigger.strip()]
    return [trigger.strip(), *tags] if trigger.strip() else tags


def process_caption(caption: str, options: DatasetOptions, rng: random.Random) -> str:
    """The caption used for one step: trigger first, tags shuffled after the kept ones, maybe dropped."""
    tags = caption_tags(caption, options.trigger_word)
    if options.shuffle_tags:
        head = (1 if options.trigger_word.strip() else 0) + options.keep_tags
        tail = tags[head:]
        rng.shuffle(tail)
        tags = tags[:head] + tail
    if options.caption_dropout > 0 and rng.random() < options.caption_dropout:
        return ""
    return ", ".join(tags)


def tag_frequency(entries: tuple[ImageEntry, ...], trigger: str) -> dict[str, dict[str, int]]:
    """kohya's ss_tag_frequency: subset folder -> tag -> images carrying it."""
    out: dict[str, Counter] = {}
    for e in entries:
        out.setdefault(e.subset, Counter()).update(set(caption_tags(e.caption, trigger)))
    return {k: dict(v.most_common()) for k, v in out.items()}


@dataclass(frozen=True, eq=False)
class Sample:
    latent: Tensor  # (C, h, w): the cover-resized image (bucket-sized when centre-cropped)
    latent_flipped: Tensor | None
    bucket: Size  # (w, h) pixels
    caption: str
    repeats: int


@dataclass(eq=False)
class LatentDataset:
    """Cached latents (and caption embeddings) of a scanned folder; ready for Batches."""

    samples: list[Sample]
    options: DatasetOptions
    scan: DatasetScan
    conds: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # caption -> (1, ...) tensors

    @property
    def num_images(self) -> int:
        return len(self.samples)

    def dataset_dirs(self) -> dict[str, dict[str, int]]:
        dirs: dict[str, dict[str, int]] = {}
        for e in self.scan.entries:
            d = dirs.setdefault(e.subset, {"n_repeats": e.repeats, "img_count": 0})
            d["img_count"] += 1
        return dirs

    def summary(self) -> str:
        buckets = Counter(s.bucket for s in self.samples)
        lines = [
            f"{self.num_images} images from {self.scan.folder.name} "
            f"({sum(s.repeats for s in self.samples)} per epoch with repeats)",
            "buckets: " + ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(buckets.items())),
        ]
        if self.scan.without_caption:
            lines.append(
                f"{self.scan.without_caption} images have no caption (trained with the trigger word only)"
            )
        lines += [f"skipped {p.path.name}: {p.reason}" for p in self.scan.problems[:10]]
        if len(self.scan.problems) > 10:
            lines.append(f"... and {len(self.scan.problems) - 10} more skipped")
        return "\n".join(lines)


def _image_tensor(image) -> Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]  # (1, H, W, 3)


def _cache_name(*parts: object) -> str:
    return hashlib.sha1("|".join(map(str, parts)).encode("utf-8")).hexdigest()[:24]


def _encode_image(image, bucket: Size, options: DatasetOptions, encode: EncodeImages) -> dict:
    image = resize_cover(image, bucket)
    if options.crop == "center":
        image = center_crop(image, bucket)
    pixels = _image_tensor(image)
    out = {"latent": encode(pixels)[0].float().contiguous()}
    if options.flip:
        out["latent_flipped"] = encode(pixels.flip(2))[0].float().contiguous()
    return out


def build_dataset(
    scan: DatasetScan,
    options: DatasetOptions,
    encode_images: EncodeImages,
    encode_texts: EncodeTexts | None,
    cache_dir: Path | None = None,
    encoder_id: str = "",
    on_item: Callable[[int, int], None] | None = None,
) -> LatentDataset:
    """Encodes every image once (reusing disk-cached latents when cache_dir is given)."""
    buckets = make_buckets(options.resolution) if options.buckets else [(options.resolution,) * 2]
    samples, problems = [], list(scan.problems)
    for i, entry in enumerate(scan.entries):
        try:
            image = load_image(entry.path)
            bucket = nearest_bucket(image.size, buckets)
            stat = entry.path.stat()
            key = _cache_name(
                entry.path.resolve(),
                stat.st_size,
                stat.st_mtime_ns,
                bucket,
                options.crop,
                options.flip,
                encoder_id,
            )
            cached = _load_cached(cache_dir, key)
            if cached is None:
                cached = _encode_image(image, bucket, options, encode_images)
                _store_cached(cache_dir, key, cached)
        except ImageLoadError as error:
            problems.append(Problem(entry.path, str(error)))
            continue
        samples.append(
            Sample(cached["latent"], cached.get("latent_flipped"), bucket, entry.caption, entry.repeats)
        )
        if on_item is not None:
            on_item(i + 1, len(scan.entries))
    if not samples:
        raise ValueError(
            f"none of the {len(scan.entries)} images in {scan.folder} could be read: {problems[0].reason}"
        )
    scan = DatasetScan(scan.folder, scan.entries, tuple(problems), scan.without_caption)
    dataset = LatentDataset(samples, options, scan)
    if encode_texts is not None and not options.captions_vary:
        dataset.conds = _encode_captions(dataset, encode_texts, cache_dir, encoder_id)
    return dataset


def _encode_captions(
    dataset: LatentDataset, encode: EncodeTexts, cache_dir: Path | None, encoder_id: str
) -> dict:
    options = dataset.options
    texts = {", ".join(caption_tags(s.caption, options.trigger_word)) for s in dataset.samples}
    if options.caption_dropout > 0:
        texts.add("")
    conds = {}
    for text in sorted(texts):
        key = "text-" + _cache_name(text, encoder_id)
        cached = _load_cached(cache_dir, key)
        if cached is None:
            with torch.no_grad():
                cached = {k: v.detach().float().cpu().contiguous() for k, v in encode([text]).items()}
            _store_cached(cache_dir, key, cached)
        conds[text] = cached
    return conds


def _load_cached(cache_dir: Path | None, key: str) -> dict | None:
    if cache_dir is None:
        return None
    path = Path(cache_dir) / f"{key}.safetensors"
    if not path.exists():
        return None
    try:
        return safetensors.torch.load_file(str(path))
    except Exception:  # a damaged cache file is re-encoded, never trusted
        return None


def _store_cached(cache_dir: Path | None, key: str, tensors: dict) -> None:
    if cache_dir is None:
        return
    from .state import _atomic_write  # one atomic writer for every file this package writes

    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    _atomic_write(Path(cache_dir) / f"{key}.safetensors", safetensors.torch.save(tensors))


def stack_conds(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Concatenates per-sample conds; token sequences of different length are repeated to their
    least common multiple, as ComfyUI does when it batches cross-attention conds."""
    out = {}
    for key in items[0]:
        tensors = [c[key] for c in items]
        if tensors[0].dim() == 3:
            lengths = [t.shape[1] for t in tensors]
            lcm = math.lcm(*lengths)
            tensors = [t.repeat(1, lcm // t.shape[1], 1) for t in tensors]
        out[key] = torch.cat(tensors, dim=0)
    return out


def batch_encoder(encode_one: Callable[[str], dict[str, Tensor]]) -> Callable[[list[str]], dict[str, Tensor]]:
    """captions -> stacked conds, from a one-caption encoder (the text encoder the bridge hands over)."""

    def encode(captions: list[str]) -> dict[str, Tensor]:
        return stack_conds([encode_one(c) for c in captions])

    return encode


class Batches:
    """The TrainingData the trainer reads: epochs of same-bucket batches, flips, crops, captions."""

    def __init__(
        self,
        dataset: LatentDataset,
        batch_size: int,
        latent_transform: Callable[[Tensor], Tensor] | None = None,
    ):
        self.dataset, self.batch_size = dataset, batch_size
        self.transform = latent_transform

    def epoch_order(self, epoch: int, seed: int) -> list[list[int]]:
        """Batches of sample indices for an epoch: a pure function of (seed, epoch)."""
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        pool = [i for i, s in enumerate(self.dataset.samples) for _ in range(s.repeats)]
        shuffled = [pool[j] for j in torch.randperm(len(pool), generator=gen).tolist()]
        by_bucket: dict[Size, list[int]] = {}
        for i in shuffled:
            by_bucket.setdefault(self.dataset.samples[i].bucket, []).append(i)
        batches = [
            idx[k : k + self.batch_size]
            for _, idx in sorted(by_bucket.items())
            for k in range(0, len(idx), self.batch_size)
        ]
        return [batches[j] for j in torch.randperm(len(batches), generator=gen).tolist()]

    def _latent(self, sample: Sample, generator: torch.Generator) -> Tensor:
        latent = sample.latent
        if sample.latent_flipped is not None and torch.rand((), generator=generator).item() < 0.5:
            latent = sample.latent_flipped
        w, h = sample.bucket[0] // 8, sample.bucket[1] // 8
        H, W = latent.shape[-2:]
        if (h, w) == (H, W):
            return latent
        if self.dataset.options.crop == "random":
            top = int(torch.randint(0, H - h + 1, (), generator=generator))
            left = int(torch.randint(0, W - w + 1, (), generator=generator))
        else:
            left, top = center_offset((W, H), (w, h))
        return latent[:, top : top + h, left : left + w]

    def batch(self, indices: list[int], generator: torch.Generator, rng: random.Random) -> Batch:
        samples = [self.dataset.samples[i] for i in indices]
        latents = torch.stack([self._latent(s, generator) for s in samples])
        if self.transform is not None:
            latents = self.transform(latents)
        captions = tuple(process_caption(s.caption, self.dataset.options, rng) for s in samples)
        conds = None
        if self.dataset.conds and all(c in self.dataset.conds for c in captions):
            conds = stack_conds([self.dataset.conds[c] for c in captions])
        return Batch(latents, captions, conds)
