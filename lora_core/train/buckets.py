"""Aspect-ratio buckets (kohya style): sizes of about resolution^2 pixels, sides multiples of 64,
each image going to the bucket nearest its aspect ratio, resized to cover it and cropped."""

from __future__ import annotations

import math

from PIL import Image

Size = tuple[int, int]  # (width, height) in pixels


def make_buckets(resolution: int, step: int = 64, min_side: int = 0, max_side: int = 0) -> list[Size]:
    """All (w, h) with w, h multiples of `step`, w * h <= resolution^2, each w at its largest h."""
    if resolution < step or resolution % 8:
        raise ValueError(f"`resolution` should be a multiple of 8 and at least {step}, got {resolution}")
    area = resolution * resolution
    min_side = min_side or max(step, resolution // 2)
    max_side = max_side or resolution * 2
    buckets = {(resolution // step * step, resolution // step * step)}
    width = min_side
    while width <= max_side:
        height = min(max_side, (area // width) // step * step)
        if height >= min_side:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    return sorted(buckets)


def nearest_bucket(size: Size, buckets: list[Size]) -> Size:
    """The bucket whose aspect ratio is closest (in log space) to the image's; ties to the larger."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def cover_size(size: Size, bucket: Size, multiple: int = 8) -> Size:
    """The image resized (aspect kept) to cover the bucket, sides rounded up to `multiple`."""
    scale = max(bucket[0] / size[0], bucket[1] / size[1])
    w = max(bucket[0], math.ceil(size[0] * scale / multiple) * multiple)
    h = max(bucket[1], math.ceil(size[1] * scale / multiple) * multiple)
    return w, h


def resize_cover(image: Image.Image, bucket: Size, multiple: int = 8) -> Image.Image:
    size = cover_size(image.size, bucket, multiple)
    return image if image.size == size else image.resize(size, Image.LANCZOS)


def center_offset(cover: Size, bucket: Size) -> Size:
    return (cover[0] - bucket[0]) // 2, (cover[1] - bucket[1]) // 2


def center_crop(image: Image.Image, bucket: Size) -> Image.Image:
    left, top = center_offset(image.size, bucket)
    return image.crop((left, top, left + bucket[0], top + bucket[1]))
