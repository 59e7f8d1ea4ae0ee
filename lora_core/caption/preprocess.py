"""Pixel preparation for WD14-style taggers: any PIL mode to RGB, pad square on white, BGR float32."""

from __future__ import annotations

import numpy as np
from PIL import Image

WHITE = (255, 255, 255)

# Modes Pillow holds as integers wider than 8 bits (16-bit PNG/TIFF greyscale).
_WIDE_INT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _wide_to_l(image: Image.Image) -> Image.Image:
    """16/32-bit greyscale to 8-bit L by scaling (Pillow's own convert clips everything above 255)."""
    values = np.asarray(image, dtype=np.int64)
    if image.mode == "I" and values.size and int(values.max()) <= 255 and int(values.min()) >= 0:
        return Image.fromarray(values.astype(np.uint8), "L")
    return Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8), "L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode to RGB; transparency is flattened onto white as the reference taggers do."""
    if image.mode in _WIDE_INT_MODES:
        image = _wide_to_l(image)
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), "L")
    if image.mode not in ("RGB", "RGBA"):
        has_alpha = image.mode in ("LA", "PA", "La", "RGBa") or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
    if image.mode == "RGBA":
        canvas = Image.new("RGBA", image.size, WHITE + (255,))
        canvas.alpha_composite(image)
        image = canvas.convert("RGB")
    return image


def pad_to_square(image: Image.Image) -> Image.Image:
    """Centre an RGB image on a white square whose side is its longest side."""
    width, height = image.size
    side = max(width, height)
    if width == height:
        return image
    canvas = Image.new("RGB", (side, side), WHITE)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def tagger_input(image: Image.Image, size: int) -> np.ndarray:
    """One image as the tagger wants it: (size, size, 3) float32 in 0..255, channels B, G, R."""
    square = pad_to_square(to_rgb(image))
    if square.size != (size, size):
        square = square.resize((size, size), Image.Resampling.BICUBIC)
    rgb = np.asarray(square, dtype=np.float32)
    return np.ascontiguousarray(rgb[:, :, ::-1])


def thumbnail(image: Image.Image, size: int) -> np.ndarray:
    """A (size, size, 3) uint8 RGB preview, padded square on white."""
    square = pad_to_square(to_rgb(image))
    return np.asarray(square.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
