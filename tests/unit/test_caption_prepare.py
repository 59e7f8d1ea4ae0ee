"""Prepare Images: buckets, crop/resize, orientation and modes, a new folder, originals untouched."""

import numpy as np
import pytest
from PIL import Image

from lora_foundry.lora_core.caption.prepare import (
    PrepareOptions,
    fit_image,
    nearest_bucket,
    prepare_buckets,
    prepare_images,
)


def _source(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (300, 200), (200, 10, 10)).save(src / "wide.jpg")
    Image.new("RGBA", (100, 300), (0, 0, 0, 0)).save(src / "tall.png")
    Image.new("CMYK", (64, 64)).save(src / "cmyk.jpg")
    (src / "broken.png").write_bytes(b"nope")
    (src / "wide.txt").write_text("a caption\n")
    return src


def test_buckets_respect_area_and_step():
    buckets = prepare_buckets(512, 64)
    assert (512, 512) in buckets
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in buckets)
    assert all(max(w, h) <= 4 * min(w, h) for w, h in buckets)
    assert nearest_bucket((3000, 2000), buckets) == (640, 384)  # 1.67 is the nearest ratio to 1.5 here
    assert nearest_bucket((100, 100), buckets) == (512, 512)


def test_fit_crop_is_exact_size_and_centred():
    pixels = np.zeros((100, 200, 3), np.uint8)
    pixels[:, 50:150] = 255  # white centre band, black sides
    out = fit_image(Image.fromarray(pixels), (50, 50), "crop")
    assert out.size == (50, 50)
    assert np.asarray(out).min() > 240  # only the centre survived


def test_fit_resize_keeps_aspect():
    assert fit_image(Image.new("RGB", (200, 100)), (64, 64), "resize").size == (64, 32)


def test_prepare_fixed_crop(tmp_path):
    src = _source(tmp_path)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    report = prepare_images(src, tmp_path / "out", PrepareOptions(target="fixed", width=64, height=48))
    assert sorted(p.output.name for p in report.written) == ["cmyk.png", "tall.png", "wide.png"]
    assert all(p.size == (64, 48) for p in report.written)
    with Image.open(tmp_path / "out" / "tall.png") as tall:
        assert tall.mode == "RGB" and tall.getpixel((0, 0)) == (255, 255, 255)
    assert (tmp_path / "out" / "wide.txt").read_text() == "a caption\n"
    assert [p.path.name for p in report.skipped] == ["broken.png"]
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before  # originals unchanged


def test_prepare_buckets_and_existing_outputs_kept(tmp_path):
    src = _source(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "wide.png").write_bytes(b"mine")
    report = prepare_images(src, out, PrepareOptions(resolution=256, bucket_step=32, output_format="png"))
    assert (out / "wide.png").read_bytes() == b"mine"
    assert any("already exists" in p.reason for p in report.skipped)
    sizes = {p.source.name: p.size for p in report.written}
    assert sizes["cmyk.jpg"] == (256, 256) and sizes["tall.png"][1] > sizes["tall.png"][0]


def test_no_upscale_option(tmp_path):
    src = _source(tmp_path)
    report = prepare_images(src, tmp_path / "o", PrepareOptions(target="fixed", width=128, height=128,
                                                                allow_upscale=False))  # fmt: skip
    assert any("upscaling is off" in p.reason for p in report.skipped)


def test_refuses_source_as_output(tmp_path):
    src = _source(tmp_path)
    with pytest.raises(ValueError, match="is the source folder"):
        prepare_images(src, src)
    with pytest.raises(ValueError, match="inside the source folder"):
        prepare_images(src, src / "out", PrepareOptions(recursive=True))


def test_exif_orientation_applied(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (80, 40), (0, 128, 0)).save(src / "r.jpg", exif=exif)
    report = prepare_images(
        src, tmp_path / "out", PrepareOptions(target="fixed", width=40, height=80, fit="resize")
    )
    assert report.written[0].size == (40, 80)
    with Image.open(report.written[0].output) as image:
        assert not image.getexif().get(0x0112)


@pytest.mark.parametrize(
    ("kwargs", "field"), [({"target": "x"}, "`target`"), ({"fit": "pad"}, "`fit`"), ({"width": 0}, "`width`")]
)
def test_options_validate(kwargs, field):
    with pytest.raises(ValueError, match=field):
        PrepareOptions(**kwargs)
