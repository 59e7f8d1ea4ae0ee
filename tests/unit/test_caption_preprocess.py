"""Tagger preprocessing checked against an independent numpy computation."""

import numpy as np
import pytest
from PIL import Image

from lora_foundry.lora_core.caption.preprocess import pad_to_square, tagger_input, to_rgb


def _numpy_pad_bgr(rgb: np.ndarray) -> np.ndarray:
    h, w, _ = rgb.shape
    side = max(h, w)
    out = np.full((side, side, 3), 255, np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    out[top : top + h, left : left + w] = rgb
    return out


@pytest.mark.parametrize("shape", [(10, 16), (16, 7), (16, 16), (9, 16)])
def test_pad_without_resize_is_exact(shape):
    rgb = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    got = tagger_input(Image.fromarray(rgb), 16)
    expected = _numpy_pad_bgr(rgb)[:, :, ::-1].astype(np.float32)
    assert got.dtype == np.float32 and got.shape == (16, 16, 3)
    np.testing.assert_array_equal(got, expected)


def test_resize_follows_padding_and_bgr():
    rgb = np.random.default_rng(1).integers(0, 256, (12, 30, 3), dtype=np.uint8)
    got = tagger_input(Image.fromarray(rgb), 16)
    padded = Image.fromarray(_numpy_pad_bgr(rgb)).resize((16, 16), Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(got, np.asarray(padded, np.float32)[:, :, ::-1])
    assert got[0, :, :].min() == 255.0  # top rows are padding


def test_channel_order_is_bgr():
    red = Image.new("RGB", (8, 8), (255, 10, 0))
    np.testing.assert_array_equal(tagger_input(red, 8)[0, 0], [0.0, 10.0, 255.0])


def test_rgba_is_flattened_on_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[:2] = (10, 20, 30, 255)  # opaque
    rgba[2:] = (10, 20, 30, 0)  # transparent
    rgb = np.asarray(to_rgb(Image.fromarray(rgba, "RGBA")))
    np.testing.assert_array_equal(rgb[:2], np.broadcast_to([10, 20, 30], (2, 4, 3)))
    np.testing.assert_array_equal(rgb[2:], np.full((2, 4, 3), 255))


def test_palette_with_transparency_goes_white():
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    image.putpixel((0, 0), 1)
    image.info["transparency"] = 0
    rgb = np.asarray(to_rgb(image))
    assert tuple(rgb[0, 0]) == (200, 0, 0) and tuple(rgb[3, 3]) == (255, 255, 255)


def test_sixteen_bit_grey_is_scaled_not_clipped():
    values = np.array([[0, 256, 32768, 65535]], np.uint16)
    image = Image.fromarray(values)
    assert image.mode.startswith("I")
    rgb = np.asarray(to_rgb(image))
    np.testing.assert_array_equal(rgb[0, :, 0], [0, 1, 128, 255])
    assert rgb.shape == (1, 4, 3)


def test_cmyk_and_greyscale_modes():
    assert to_rgb(Image.new("CMYK", (2, 2), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("CMYK", (2, 2), (255, 0, 0, 0))).getpixel((0, 0)) == (0, 255, 255)
    assert to_rgb(Image.new("L", (2, 2), 7)).getpixel((1, 1)) == (7, 7, 7)
    assert to_rgb(Image.new("LA", (2, 2), (7, 0))).getpixel((1, 1)) == (255, 255, 255)


def test_pad_to_square_keeps_square_images():
    image = Image.new("RGB", (5, 5))
    assert pad_to_square(image) is image
