"""Every kind of bad or unusual image file: reported with a reason, or decoded right."""

import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from lora_foundry.lora_core.caption.image_files import ImageLoadError, load_image, scan_folder


def _png_header_only(path, width, height):
    """A PNG whose header claims width x height: Pillow reads only the header before deciding."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10)))
    return path


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageLoadError, match="0 bytes"):
        load_image(tmp_path / "empty.jpg")


def test_not_an_image(tmp_path):
    (tmp_path / "notes.png").write_text("just some text, not pixels")
    with pytest.raises(ImageLoadError, match="not an image"):
        load_image(tmp_path / "notes.png")


def test_truncated_jpeg(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="cannot decode"):
        load_image(tmp_path / "cut.jpg")


def test_decompression_bomb_header(tmp_path):
    _png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    with pytest.raises(ImageLoadError, match="bomb"):
        load_image(tmp_path / "bomb.png")


def test_over_our_pixel_limit(tmp_path):
    Image.new("RGB", (40, 30)).save(tmp_path / "big.png")
    with pytest.raises(ImageLoadError, match="40x30 = 1,200 pixels exceeds the limit of 1,000"):
        load_image(tmp_path / "big.png", max_pixels=1000)


def test_animated_gif_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    image = load_image(tmp_path / "anim.gif")
    r, g, b = image.getpixel((4, 4))
    assert image.mode == "RGB" and r > 200 and b < 50


def test_rgba_png_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[:, :2] = (0, 0, 0, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    image = load_image(tmp_path / "a.png")
    assert image.getpixel((0, 0)) == (0, 0, 0) and image.getpixel((3, 0)) == (255, 255, 255)


def test_palette_png(tmp_path):
    Image.new("RGB", (4, 4), (12, 200, 40)).convert("P", palette=Image.Palette.ADAPTIVE).save(
        tmp_path / "p.png"
    )
    assert load_image(tmp_path / "p.png").getpixel((1, 1)) == (12, 200, 40)


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (16, 16), (0, 0, 0, 0)).save(tmp_path / "c.jpg", quality=100)
    image = load_image(tmp_path / "c.jpg")
    assert image.mode == "RGB" and min(image.getpixel((8, 8))) > 245


def test_sixteen_bit_png(tmp_path):
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as raw:
        assert raw.mode.startswith("I")
    assert load_image(tmp_path / "deep.png").getpixel((0, 0)) == (255, 255, 255)


def test_exif_rotated_jpeg(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)  # left half red
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    Image.fromarray(pixels).save(tmp_path / "r.jpg", exif=exif, quality=95)
    image = load_image(tmp_path / "r.jpg")
    assert image.size == (20, 40)
    top, bottom = image.getpixel((10, 5)), image.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60


def test_jpeg_draft_decodes_near_target(tmp_path):
    Image.new("RGB", (2000, 1000), (90, 90, 90)).save(tmp_path / "photo.jpg")
    image = load_image(tmp_path / "photo.jpg", draft_size=100)
    assert 100 <= max(image.size) <= 250 and image.size[0] == 2 * image.size[1]
    assert load_image(tmp_path / "photo.jpg").size == (2000, 1000)


def test_scan_folder_lists_images_only(tmp_path):
    for name in ("b.jpg", "a.PNG", "notes.txt", ".hidden.png", "model.onnx"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.webp").write_bytes(b"x")
    assert [p.name for p in scan_folder(tmp_path).images] == ["a.PNG", "b.jpg"]
    assert [p.name for p in scan_folder(tmp_path, recursive=True).images] == ["a.PNG", "b.jpg", "c.webp"]


def test_scan_missing_folder(tmp_path):
    with pytest.raises(NotADirectoryError, match="does not exist"):
        scan_folder(tmp_path / "nope")


def test_unlistable_subfolder_is_reported_not_fatal(tmp_path, monkeypatch):
    (tmp_path / "ok.png").write_bytes(b"x")
    (tmp_path / "locked").mkdir()
    real_scandir = os.scandir

    def scandir(path):
        if os.path.basename(path) == "locked":
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    scan = scan_folder(tmp_path, recursive=True)
    assert [p.name for p in scan.images] == ["ok.png"]
    assert [(p.path.name, p.reason) for p in scan.problems] == [
        ("locked", "cannot list this folder: Permission denied")
    ]
