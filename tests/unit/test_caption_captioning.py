"""caption_folder end to end with a tiny ONNX tagger: files written, modes, bad inputs, stop, progress."""

import os
import sys
import threading

import numpy as np
import pytest
from PIL import Image
from tiny_tagger import build_tiny_tagger

from lora_foundry.lora_core.caption import captions as captions_mod
from lora_foundry.lora_core.caption.captioning import RunOptions, caption_folder
from lora_foundry.lora_core.caption.captions import CaptionOptions
from lora_foundry.lora_core.caption.tagger import clear_tagger_cache, get_tagger

TAGS = [("general", 9), ("1girl", 0), ("long_hair", 0), ("hat_(object)", 0), ("blurry", 0), ("miku", 4)]
PROBS = [0.9, 0.95, 0.8, 0.7, 0.2, 0.9]
EXPECTED = "trig, miku, 1girl, long hair, hat \\(object\\)\n"
OPTIONS = CaptionOptions(trigger_word="trig")


@pytest.fixture
def model(tmp_path):
    clear_tagger_cache()
    return build_tiny_tagger(tmp_path / "tagger", TAGS, probs=PROBS)


def _images(folder, names, size=(24, 16)):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", size, (30, 60, 90)).save(folder / name)
    return folder


def test_captions_written_beside_images(tmp_path, model):
    folder = _images(tmp_path / "data", ["a.png", "b.jpg", "c.webp"])
    report = caption_folder(folder, model, OPTIONS, RunOptions(batch_size=2))
    assert [t.image.name for t in report.tagged] == ["a.png", "b.jpg", "c.webp"]
    for stem in "abc":
        assert (folder / f"{stem}.txt").read_text() == EXPECTED
    assert not report.failed and not report.skipped and report.total == 3
    assert dict(report.tag_counts) == {
        "trig": 3,
        "miku": 3,
        "1girl": 3,
        "long hair": 3,
        "hat \\(object\\)": 3,
    }
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temp files left
    assert "3 tagged, 0 skipped, 0 failed" in report.summary()
    assert "Tagger ran on CPUExecutionProvider" in report.summary()
    assert report.captions_text().splitlines()[0] == "a.png: " + EXPECTED.strip()


def test_bad_files_are_reported_and_the_rest_is_done(tmp_path, model):
    folder = _images(tmp_path / "data", ["good.png"])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.png").write_text("hello")
    (folder / "notes.txt").write_text("not an image; ignored")
    report = caption_folder(folder, model, OPTIONS)
    assert [t.image.name for t in report.tagged] == ["good.png"]
    assert {p.path.name: p.reason for p in report.failed} == {
        "empty.jpg": "empty file (0 bytes)",
        "text.png": "not an image Pillow can read (unknown or damaged format)",
    }
    assert not (folder / "empty.txt").exists()
    assert (folder / "notes.txt").read_text() == "not an image; ignored"


def test_skip_mode_keeps_existing_captions(tmp_path, model):
    folder = _images(tmp_path / "data", ["a.png", "b.png"])
    (folder / "a.txt").write_text("hand written")
    report = caption_folder(folder, model, OPTIONS, RunOptions(mode="skip"))
    assert (folder / "a.txt").read_text() == "hand written"
    assert (folder / "b.txt").read_text() == EXPECTED
    assert [(p.path.name, p.reason) for p in report.skipped] == [
        ("a.png", "already has a caption (a.txt); mode is 'skip'")
    ]


def test_overwrite_mode(tmp_path, model):
    folder = _images(tmp_path / "data", ["a.png"])
    (folder / "a.txt").write_text("old")
    caption_folder(folder, model, OPTIONS, RunOptions(mode="overwrite"))
    assert (folder / "a.txt").read_text() == EXPECTED


def test_append_mode_merges_without_duplicates(tmp_path, model):
    folder = _images(tmp_path / "data", ["a.png", "b.png"])
    (folder / "a.txt").write_text("custom, long_hair, 1girl\n")
    caption_folder(folder, model, OPTIONS, RunOptions(mode="append"))
    assert (folder / "a.txt").read_text() == "trig, custom, long_hair, 1girl, miku, hat \\(object\\)\n"
    assert (folder / "b.txt").read_text() == EXPECTED


def test_output_folder_and_subfolders(tmp_path, model):
    folder = _images(tmp_path / "data", ["a.png"])
    _images(folder / "sub", ["b.png"])
    out = tmp_path / "captions"
    caption_folder(folder, model, OPTIONS, RunOptions(output_dir=out, recursive=True))
    assert (out / "a.txt").read_text() == EXPECTED and (out / "sub" / "b.txt").read_text() == EXPECTED
    assert not (folder / "a.txt").exists()


def test_same_stem_images_do_not_share_a_caption(tmp_path, model):
    folder = _images(tmp_path / "data", ["a.jpg", "a.png"])
    report = caption_folder(folder, model, OPTIONS)
    assert [t.image.name for t in report.tagged] == ["a.jpg"]
    assert "same file as a.jpg's" in report.skipped[0].reason


def test_failed_write_leaves_old_caption_and_no_temp(tmp_path, model, monkeypatch):
    folder = _images(tmp_path / "data", ["a.png"])
    (folder / "a.txt").write_text("precious")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(captions_mod.os, "replace", broken_replace)
    report = caption_folder(folder, model, OPTIONS, RunOptions(mode="overwrite"))
    assert (folder / "a.txt").read_text() == "precious"
    assert sorted(p.name for p in folder.iterdir()) == ["a.png", "a.txt"]
    assert "caption not written" in report.failed[0].reason


def test_bgr_pixels_reach_the_model(tmp_path):
    # outputs are the mean B, G, R / 255: a pure red image must score only the 'r' tag
    model = build_tiny_tagger(
        tmp_path / "t", [("b", 0), ("g", 0), ("r", 0)], weights=np.eye(3), sigmoid=False
    )
    folder = tmp_path / "data"
    folder.mkdir()
    Image.new("RGB", (16, 16), (255, 0, 0)).save(folder / "red.png")
    report = caption_folder(folder, model, CaptionOptions(general_threshold=0.5))
    assert report.tagged[0].tags == ("r",)


def test_session_reused_across_runs(tmp_path, model):
    folder = _images(tmp_path / "data", ["a.png"])
    caption_folder(folder, model, OPTIONS, RunOptions(mode="overwrite"))
    session = get_tagger(model).session
    caption_folder(folder, model, OPTIONS, RunOptions(mode="overwrite"))
    assert get_tagger(model).session is session


def test_progress_previews_and_fixed_batch(tmp_path):
    model = build_tiny_tagger(tmp_path / "t", TAGS, probs=PROBS, batch_dim=1)
    folder = _images(tmp_path / "data", [f"{i}.png" for i in range(5)])
    (folder / "x.jpg").write_bytes(b"")
    seen = []
    report = caption_folder(folder, model, OPTIONS, RunOptions(batch_size=3, preview_count=2, preview_size=32),
                            on_progress=lambda d, t: seen.append((d, t)))  # fmt: skip
    assert seen[0] == (0, 6) and seen[-1] == (6, 6) and len(report.tagged) == 5
    assert len(report.previews) == 2 and report.previews[0].shape == (32, 32, 3)


def test_stop_keeps_written_captions(tmp_path, model):
    folder = _images(tmp_path / "data", [f"{i}.png" for i in range(6)])
    calls = []
    report = caption_folder(folder, model, OPTIONS, RunOptions(batch_size=2),
                            should_stop=lambda: calls.append(1) or len(calls) > 1)  # fmt: skip
    assert report.stopped and len(report.tagged) == 2
    assert sorted(p.name for p in folder.glob("*.txt")) == ["0.txt", "1.txt"]
    assert "stopped early" in report.summary()


def test_interrupt_exception_propagates_and_thread_ends(tmp_path, model):
    folder = _images(tmp_path / "data", [f"{i}.png" for i in range(6)])

    def interrupt():
        raise KeyboardInterrupt  # stands in for ComfyUI's InterruptProcessingException

    with pytest.raises(KeyboardInterrupt):
        caption_folder(folder, model, OPTIONS, RunOptions(batch_size=1), should_stop=interrupt)
    assert not [t for t in threading.enumerate() if t.name == "lora-foundry-caption-decode"]


def test_missing_folder_is_a_clear_error(tmp_path, model):
    with pytest.raises(NotADirectoryError, match="does not exist"):
        caption_folder(tmp_path / "nope", model, OPTIONS)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"mode": "replace"}, "`mode`"),
        ({"batch_size": 0}, "`batch_size`"),
        ({"extension": "txt"}, "`extension`"),
    ],
)
def test_run_options_validate(kwargs, field):
    with pytest.raises(ValueError, match=field):
        RunOptions(**kwargs)


def test_non_utf8_caption_is_left_alone_in_append(tmp_path, model):
    folder = _images(tmp_path / "data", ["a.png"])
    (folder / "a.txt").write_bytes(b"\xff\xfe\xfa bad")
    report = caption_folder(folder, model, OPTIONS, RunOptions(mode="append"))
    assert (folder / "a.txt").read_bytes() == b"\xff\xfe\xfa bad"
    assert "not UTF-8" in report.failed[0].reason
    assert os.path.exists(folder / "a.png")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is a Linux feature")
def test_decode_thread_yields_to_inference(tmp_path, model, monkeypatch):
    """The decode thread runs at a lower priority than the caller; the caller's own is untouched."""
    from lora_foundry.lora_core.caption import captioning as dataset

    seen = []
    real = dataset._decode

    def spy(*args, **kwargs):
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return real(*args, **kwargs)

    monkeypatch.setattr(dataset, "_decode", spy)
    folder = _images(tmp_path / "images", ["a.png", "b.png"])
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    report = caption_folder(folder, model, CaptionOptions(), RunOptions(mode="overwrite", batch_size=1))
    assert len(report.tagged) == 2
    assert seen and all(p == min(19, mine + dataset.DECODE_NICE) for p in seen)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine
