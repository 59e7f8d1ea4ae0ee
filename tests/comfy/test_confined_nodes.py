"""The dataset nodes in-process (issue #14): every folder input is confined to input, output, the models
folders (read only) and the owner's folders; a secret behind a symlinked caption never reaches a trained
LoRA's metadata; the owner widens the rule by environment or allowed_folders.txt, a graph never can."""

from __future__ import annotations

import json
import os
import uuid

import folder_paths
import pytest
import safetensors
from make_demo_models import write_demo_tagger
from PIL import Image
from train_run import make_dataset, train

from lora_foundry.lora_core.files.confine import ALLOWED_FILE, ENV_VAR
from lora_foundry.nodes import comfy_bridge as bridge
from lora_foundry.nodes.caption import CaptionDataset
from lora_foundry.nodes.prepare import PrepareImages

SECRET = "sk-secret-token"
OUTSIDE_MESSAGE = "is not inside a folder this server lets nodes"
TAGGER = "confine_tagger/model.onnx"  # as the tagger list names a <name>/model.onnx tagger


# one torch thread: these tiny models train in reproducible order and leave the cores to others
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def taggers(comfy_base, monkeypatch):
    folder = comfy_base / "models" / "taggers"
    if not (folder / TAGGER).exists():
        write_demo_tagger(folder / TAGGER.split("/")[0])
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "taggers", ([str(folder)], set()))
    # ComfyUI's PreviewImage lives in its top-level module `nodes`, which this repository's own nodes/
    # package shadows when pytest runs from the repository; the previews are not what these tests check.
    monkeypatch.setattr(bridge, "preview_images", lambda images, prefix: [])
    return folder


def _image(path, colour=(200, 30, 30), size=(64, 64)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


@pytest.fixture
def outside(tmp_path):
    """A folder outside every root: a secret, a captioned image, and a 3_name folder."""
    root = tmp_path / "outside"
    _image(root / "private.png")
    (root / "private.txt").write_text(SECRET)
    (root / "secret.txt").write_text(SECRET)
    _image(root / "3_set" / "x.png")
    return root


@pytest.fixture
def dataset(comfy_base):
    """A fresh captioned folder in input/ (unique name: the ComfyUI base is shared by the session)."""
    folder = comfy_base / "input" / f"confine_{uuid.uuid4().hex[:8]}"
    _image(folder / "a.png")
    (folder / "a.txt").write_text("red, circle")
    return folder


def _snapshot(folder):
    return {
        p: (p.read_bytes() if p.is_file() else None, p.lstat().st_mtime_ns) for p in sorted(folder.rglob("*"))
    }


def prepare(source, output, **changes):
    args = dict(target="fixed", resolution=1024, width=64, height=64, fit="crop")
    return PrepareImages().execute(source, output, **{**args, **changes})


def caption(folder, mode="overwrite", output_folder=""):
    return CaptionDataset().execute(folder, TAGGER, 0.5, 0.85, "zkw", mode, output_folder=output_folder)


def _escapes(comfy_base, outside, dataset):
    """The three ways out of input/ the issue found: absolute, '..', a symlink leaving input."""
    link = comfy_base / "input" / f"leak_{uuid.uuid4().hex[:8]}"
    link.symlink_to(outside)
    up = os.path.relpath(outside, comfy_base / "input")
    return {"absolute": str(outside), "dotdot": up, "symlink": link.name}


NODES = {
    "prepare_source": (
        "[Prepare Images]",
        "source_folder",
        lambda bad, ds, sd: prepare(bad, ds.name + "_out"),
    ),
    "prepare_output": ("[Prepare Images]", "output_folder", lambda bad, ds, sd: prepare(ds.name, bad)),
    "caption_folder": ("[Caption Dataset]", "folder", lambda bad, ds, sd: caption(bad)),
    "caption_output": (
        "[Caption Dataset]",
        "output_folder",
        lambda bad, ds, sd: caption(ds.name, output_folder=bad),
    ),
    "training_folder": (
        "[LoRA Training Dataset]",
        "folder",
        lambda bad, ds, sd: make_dataset(sd, folder=bad),
    ),
}


@pytest.mark.parametrize("escape", ["absolute", "dotdot", "symlink"])
@pytest.mark.parametrize("node", sorted(NODES))
def test_every_folder_input_is_confined(comfy_base, sd15, taggers, outside, dataset, node, escape):
    prefix, field, run = NODES[node]
    bad = _escapes(comfy_base, outside, dataset)[escape]
    before = _snapshot(outside)
    with pytest.raises(RuntimeError) as e:
        run(bad, dataset, sd15)
    msg = str(e.value)
    assert msg.startswith(f"{prefix} `{field}` {bad!r} {OUTSIDE_MESSAGE}"), msg
    assert str(outside) not in msg.replace(repr(bad), "")  # the target of a link is never shown
    assert _snapshot(outside) == before


def test_outside_error_is_the_same_for_existing_and_missing_paths(sd15, outside):
    messages = []
    for path in (outside / "3_set", outside / "no_such_folder"):
        with pytest.raises(RuntimeError) as e:
            make_dataset(sd15, folder=str(path))
        messages.append(str(e.value).replace(repr(str(path)), "<path>"))
    assert messages[0] == messages[1]


def test_models_folders_are_read_only(comfy_base, loras_dir, dataset):
    source = loras_dir / f"confine_set_{uuid.uuid4().hex[:8]}"
    _image(source / "m.png")
    try:
        out = prepare(str(source), dataset.name + "_from_models")["result"][0]
        assert sorted(os.listdir(out)) == ["m.png"]
        with pytest.raises(
            RuntimeError, match=r"\[Prepare Images\] `output_folder` .* lets nodes write into"
        ):
            prepare(dataset.name, str(loras_dir / "new_set"))
        assert not (loras_dir / "new_set").exists()
    finally:
        for p in source.iterdir():
            p.unlink()
        source.rmdir()


def test_owner_folders_from_environment_and_file(comfy_base, outside, tmp_path, monkeypatch):
    with pytest.raises(RuntimeError, match=OUTSIDE_MESSAGE):
        prepare(str(outside), "owner_out")
    monkeypatch.setenv(ENV_VAR, str(outside))
    assert prepare(str(outside), f"owner_env_{uuid.uuid4().hex[:8]}")["result"][1].count("written") == 1
    monkeypatch.delenv(ENV_VAR)
    pack = tmp_path / "pack"  # stands in for the pack's folder, where the owner's file lives
    pack.mkdir()
    monkeypatch.setattr(bridge, "PACK_DIR", str(pack))
    (pack / ALLOWED_FILE).write_text(f"# the owner's datasets\n{outside}\n{tmp_path}\n")
    out = prepare(str(outside), str(outside / "prepared"))["result"][0]
    assert sorted(os.listdir(out)) == ["private.png", "private.txt"]
    # the owner allowed the pack's parent: the pack's own folder (and its allowed_folders.txt) stays unwritable
    with pytest.raises(RuntimeError, match=r"`output_folder` .* lets nodes write into"):
        prepare(str(outside), str(pack))
    assert sorted(os.listdir(pack)) == [ALLOWED_FILE]


def test_secret_behind_a_caption_link_never_reaches_a_trained_lora(sd15, dataset, outside, loras_dir):
    _image(dataset / "b.png", colour=(30, 30, 200))
    (dataset / "b.txt").symlink_to(outside / "secret.txt")
    (dataset / "4_more").symlink_to(outside / "3_set")
    data, summary = make_dataset(sd15, folder=dataset.name)
    assert "skipped b.txt: caption b.txt is a link leading outside the folder" in summary
    assert "skipped 4_more: a link leading outside the folder" in summary
    assert data.num_images == 2 and SECRET not in summary
    name = f"confine_{dataset.name}"
    lora_name = train(sd15, data, output_name=name, steps=1)["result"][2]
    with safetensors.safe_open(str(loras_dir / lora_name), "pt") as f:
        meta = f.metadata()
    assert SECRET not in json.dumps(meta)
    assert json.loads(meta["ss_tag_frequency"]) == {dataset.name: {"zkw": 2, "red": 1, "circle": 1}}


def test_prepare_never_copies_the_secret_and_keeps_existing_files(dataset, outside, comfy_base):
    (dataset / "c.png").symlink_to(outside / "private.png")
    _image(dataset / "b.png")
    (dataset / "b.txt").symlink_to(outside / "secret.txt")
    out = comfy_base / "input" / f"{dataset.name}_out"
    out.mkdir()
    (out / "a.txt").write_text("the user's own file")
    summary = prepare(dataset.name, out.name)["result"][1]
    assert sorted(os.listdir(out)) == ["a.png", "a.txt", "b.png"]
    assert (out / "a.txt").read_text() == "the user's own file"
    assert all(SECRET.encode() not in p.read_bytes() for p in out.iterdir())
    assert "skipped c.png: a link leading outside the folder" in summary
    assert "note b.png: caption b.txt is a link leading outside the folder" in summary
    assert "note a.png: a.txt already exists in the output folder; it was kept" in summary


def test_workflow_shape_reruns_prepare_then_caption(dataset, taggers, comfy_base):
    """As caption_dataset.json runs twice in a row: the second run keeps the prepared images and
    recaptions them (overwrite is the user's choice inside a confined folder)."""
    out_name = f"{dataset.name}_prepared"
    for run in range(2):
        folder, summary = prepare(dataset.name, out_name)["result"]
        assert summary.splitlines()[0].endswith(f"{1 - run} written, {run} skipped")
        result = caption(folder)["result"]
        assert result[3] == folder and "1 tagged" in result[1]
    assert (comfy_base / "input" / out_name / "a.txt").read_text().startswith("zkw")


@pytest.mark.timeout(60)
def test_fifo_caption_does_not_hang_the_dataset_node(sd15, dataset):
    _image(dataset / "b.png")
    os.mkfifo(dataset / "b.txt")
    data, summary = make_dataset(sd15, folder=dataset.name)
    assert data.num_images == 2 and "skipped b.txt: caption b.txt is not a regular file" in summary


def test_huge_caption_is_cut_with_a_note(sd15, dataset):
    (dataset / "a.txt").write_text("red, " + "x" * 100_000)
    data, summary = make_dataset(sd15, folder=dataset.name)
    assert "a.txt is longer than 64 KB; only its first 64 KB are used" in summary
    assert len(data.scan.entries[0].caption) == 64 * 1024
