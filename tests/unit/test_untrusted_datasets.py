"""Data-set folders as untrusted input (issue #14): links leading out, FIFOs and huge captions in the
folders Prepare Images, Caption Dataset and the training scan read, and files they must not replace."""

from __future__ import annotations

import os

import pytest
from PIL import Image
from tiny_tagger import build_tiny_tagger

from lora_foundry.lora_core.caption.captioning import RunOptions, caption_folder
from lora_foundry.lora_core.caption.captions import CaptionOptions
from lora_foundry.lora_core.caption.image_files import LINK_OUT, NOT_REGULAR, scan_folder
from lora_foundry.lora_core.caption.prepare import PrepareOptions, prepare_images
from lora_foundry.lora_core.caption.tagger import clear_tagger_cache
from lora_foundry.lora_core.files.confine import CAPTION_LIMIT
from lora_foundry.lora_core.train.dataset import DatasetOptions, scan_dataset, tag_frequency

SECRET = "sk-secret-token"
PREPARE = PrepareOptions(target="fixed", width=32, height=32)


def _image(path, colour=(10, 120, 200), size=(40, 32)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


@pytest.fixture
def world(tmp_path):
    """data/ (the folder a node is given) and outside/ (a secret, an image, a folder of images)."""
    data, outside = tmp_path / "data", tmp_path / "outside"
    _image(data / "a.png")
    (data / "a.txt").write_text("red, circle")
    (outside / "photos").mkdir(parents=True)
    (outside / "secret.txt").write_text(SECRET)
    _image(outside / "private.png")
    _image(outside / "photos" / "p.png")
    (outside / "photos" / "p.txt").write_text(SECRET)
    return data, outside


def _snapshot(folder):
    return {
        p: (p.read_bytes() if p.is_file() else None, p.lstat().st_mtime_ns) for p in sorted(folder.rglob("*"))
    }


@pytest.fixture
def tagger(tmp_path):
    clear_tagger_cache()
    return build_tiny_tagger(tmp_path / "tagger", [("general", 9), ("blue", 0)], probs=[0.9, 0.9])


# --- scanning -------------------------------------------------------------------------------------


def test_scan_skips_and_names_links_out_lists_links_in(world):
    data, outside = world
    (data / "leak.png").symlink_to(outside / "private.png")
    (data / "photos").symlink_to(outside / "photos")
    (data / "copy.png").symlink_to(data / "a.png")
    scan = scan_folder(data, recursive=True)
    assert [p.name for p in scan.images] == ["a.png", "copy.png"]
    assert {(p.path.name, p.reason) for p in scan.problems} == {("leak.png", LINK_OUT), ("photos", LINK_OUT)}
    assert all(str(outside) not in p.reason for p in scan.problems)  # named, never their targets


@pytest.mark.timeout(30)
def test_scan_reports_a_fifo_named_like_an_image(world):
    data, _ = world
    os.mkfifo(data / "pipe.png")
    scan = scan_folder(data)
    assert [p.name for p in scan.images] == ["a.png"]
    assert [(p.path.name, p.reason) for p in scan.problems] == [("pipe.png", NOT_REGULAR)]


# --- training scan --------------------------------------------------------------------------------


def test_training_scan_never_reads_a_caption_linking_out(world):
    data, outside = world
    _image(data / "b.png")
    (data / "b.txt").symlink_to(outside / "secret.txt")
    scan = scan_dataset(data, DatasetOptions(resolution=64))
    captions = {e.path.name: e.caption for e in scan.entries}
    assert captions == {"a.png": "red, circle", "b.png": ""}
    assert SECRET not in repr(tag_frequency(scan.entries, "zkw"))
    assert scan.without_caption == 1
    notes = [(p.path.name, p.reason) for p in scan.problems]
    assert notes == [("b.txt", "caption b.txt is a link leading outside the folder; not read")]


def test_training_scan_skips_repeat_folders_linking_out(world):
    data, outside = world
    (data / "10_leak").symlink_to(outside / "photos")
    (data / "2_inside").mkdir()
    _image(data / "2_inside" / "c.png")
    (data / "5_alias").symlink_to(data / "2_inside")  # a link inside the data set is followed
    scan = scan_dataset(data, DatasetOptions(resolution=64))
    assert sorted((e.subset, e.path.name) for e in scan.entries) == [
        ("2_inside", "c.png"), ("5_alias", "c.png"), ("data", "a.png")
    ]  # fmt: skip
    assert [(p.path.name, p.reason) for p in scan.problems] == [("10_leak", LINK_OUT)]
    assert SECRET not in repr(scan)


@pytest.mark.timeout(30)
def test_training_scan_with_a_fifo_caption_does_not_hang(world):
    data, _ = world
    _image(data / "b.png")
    os.mkfifo(data / "b.txt")
    scan = scan_dataset(data, DatasetOptions(resolution=64))
    assert {e.path.name: e.caption for e in scan.entries} == {"a.png": "red, circle", "b.png": ""}
    assert [p.path.name for p in scan.problems] == ["b.txt"] and "not a regular file" in scan.problems[
        0
    ].reason


def test_training_scan_cuts_a_huge_caption_with_a_note(world):
    data, _ = world
    _image(data / "b.png")
    (data / "b.txt").write_text("tag, " * 100_000)  # 500 KB
    scan = scan_dataset(data, DatasetOptions(resolution=64))
    caption = {e.path.name: e.caption for e in scan.entries}["b.png"]
    assert len(caption.encode()) <= CAPTION_LIMIT and caption.startswith("tag, tag")
    assert len(caption) >= CAPTION_LIMIT - 5
    assert "longer than 64 KB" in scan.problems[0].reason and scan.problems[0].path.name == "b.txt"


# --- Prepare Images -------------------------------------------------------------------------------


def test_prepare_never_copies_a_caption_linking_out(world, tmp_path):
    data, outside = world
    _image(data / "b.png")
    (data / "b.txt").symlink_to(outside / "secret.txt")
    report = prepare_images(data, tmp_path / "out", PREPARE)
    assert sorted(p.output.name for p in report.written) == ["a.png", "b.png"]
    assert (tmp_path / "out" / "a.txt").read_text() == "red, circle"
    assert not (tmp_path / "out" / "b.txt").exists()
    assert all(SECRET not in p.read_bytes().decode("latin-1") for p in (tmp_path / "out").iterdir())
    assert "b.txt is a link leading outside the folder" in report.summary()


def test_prepare_keeps_existing_files_and_reruns_cleanly(world, tmp_path):
    data, _ = world
    _image(data / "b.png")
    (data / "b.txt").write_text("from source")
    out = tmp_path / "out"
    out.mkdir()
    (out / "b.txt").write_text("user's own caption")  # e.g. requirements.txt beside requirements.png
    first = prepare_images(data, out, PREPARE)
    assert (out / "b.txt").read_text() == "user's own caption"
    assert sorted(p.output.name for p in first.written) == ["a.png", "b.png"]
    assert [(p.path.name, p.reason) for p in first.notes] == [
        ("b.png", "b.txt already exists in the output folder; it was kept, not replaced by the copy")
    ]
    before = _snapshot(out)
    second = prepare_images(data, out, PREPARE)  # a re-run: nothing replaced, nothing fails
    assert not second.written and len(second.skipped) == 2
    assert all("already exists" in p.reason for p in second.skipped)
    assert _snapshot(out) == before


def test_prepare_does_not_write_through_links_in_its_output(world, tmp_path):
    data, outside = world
    (data / "sub").mkdir()
    _image(data / "sub" / "c.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "sub").symlink_to(outside / "photos")  # a subfolder leading out
    (out / "a.png").symlink_to(outside / "victim.png")  # a dangling link where an output goes
    before = _snapshot(outside)
    report = prepare_images(data, out, PrepareOptions(target="fixed", width=32, height=32, recursive=True))
    assert _snapshot(outside) == before and not (outside / "victim.png").exists()
    reasons = {p.path.name: p.reason for p in report.skipped}
    assert "already exists" in reasons["a.png"] and "leads outside" in reasons["c.png"]


@pytest.mark.timeout(30)
def test_prepare_with_fifo_and_huge_captions(world, tmp_path):
    data, _ = world
    os.remove(data / "a.txt")
    os.mkfifo(data / "a.txt")
    _image(data / "b.png")
    (data / "b.txt").write_text("x" * (CAPTION_LIMIT + 10))
    report = prepare_images(data, tmp_path / "out", PREPARE)
    assert sorted(p.output.name for p in report.written) == ["a.png", "b.png"]
    assert not (tmp_path / "out" / "a.txt").exists()
    assert (tmp_path / "out" / "b.txt").read_text() == "x" * CAPTION_LIMIT
    notes = {p.path.name: p.reason for p in report.notes}
    assert "not a regular file" in notes["a.png"] and "longer than 64 KB" in notes["b.png"]


# --- Caption Dataset ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["overwrite", "append", "skip"])
def test_caption_leaves_a_caption_linking_out_alone(world, tagger, mode):
    data, outside = world
    (data / "a.txt").unlink()
    (data / "a.txt").symlink_to(outside / "secret.txt")
    before = _snapshot(outside)
    report = caption_folder(data, tagger, CaptionOptions(), RunOptions(mode=mode))
    assert _snapshot(outside) == before
    assert os.readlink(data / "a.txt") == str(outside / "secret.txt")
    assert not report.tagged and "a.txt is a link leading outside the folder" in report.summary()
    assert SECRET not in report.summary() + report.captions_text()


@pytest.mark.timeout(30)
def test_caption_append_with_a_fifo_caption_does_not_hang(world, tagger):
    data, _ = world
    _image(data / "b.png")
    os.mkfifo(data / "b.txt")
    report = caption_folder(data, tagger, CaptionOptions(), RunOptions(mode="append"))
    assert [t.image.name for t in report.tagged] == ["a.png"]
    assert "b.txt is not a regular file" in report.summary()
    assert (data / "a.txt").read_text() == "red, circle, blue\n"


def test_caption_append_refuses_to_cut_a_huge_caption(world, tagger):
    data, _ = world
    huge = "tag, " * 20_000
    (data / "a.txt").write_text(huge)
    report = caption_folder(data, tagger, CaptionOptions(), RunOptions(mode="append"))
    assert (data / "a.txt").read_text() == huge
    assert "longer than 64 KB; left as it is" in report.failed[0].reason


def test_caption_output_folder_links_are_not_followed(world, tagger, tmp_path):
    data, outside = world
    (data / "sub").mkdir()
    _image(data / "sub" / "c.png")
    out = tmp_path / "captions"
    out.mkdir()
    (out / "sub").symlink_to(outside / "photos")
    before = _snapshot(outside)
    report = caption_folder(data, tagger, CaptionOptions(), RunOptions(mode="overwrite", output_dir=out,
                                                                       recursive=True))  # fmt: skip
    assert _snapshot(outside) == before
    assert (out / "a.txt").read_text() == "blue\n"
    assert [(p.path.name, "leads outside" in p.reason) for p in report.failed] == [("c.png", True)]
