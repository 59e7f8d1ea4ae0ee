"""Issue #14 through a real ComfyUI server, as the hostile user did it (POST /prompt): every folder
input of Prepare Images, Caption Dataset and LoRA Training Dataset refuses an absolute path, '..' and a
symlink leaving input/, writes nothing outside, and the server answers the next prompt; a secret behind a
symlinked caption reaches neither Prepare Images' output nor a trained LoRA's /view_metadata."""

from __future__ import annotations

import json
import os
import re
import uuid

import pytest
from comfy_server import PromptFailed
from PIL import Image

pytestmark = pytest.mark.server

CHECKPOINT = "lora_foundry_demo_sd15.safetensors"
TAGGER = "lora_foundry_demo_tagger/model.onnx"
SECRET = "sk-secret-token"
OUTSIDE_MESSAGE = "is not inside a folder this server lets nodes"


def _image(path, colour=(200, 30, 30), size=(64, 64)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _snapshot(folder):
    return {
        p: (p.read_bytes() if p.is_file() else None, p.lstat().st_mtime_ns) for p in sorted(folder.rglob("*"))
    }


def prepare_prompt(source: str, output: str) -> dict:
    inputs = dict(source_folder=source, output_folder=output, target="fixed", resolution=256, width=64, height=64,
                  fit="crop")  # fmt: skip
    return {"1": {"class_type": "LoraFoundry_PrepareImages", "inputs": inputs}}


def caption_prompt(folder: str, output_folder: str = "") -> dict:
    inputs = dict(folder=folder, tagger=TAGGER, general_threshold=0.5, character_threshold=0.85, trigger_word="zkw",
                  mode="overwrite", output_folder=output_folder)  # fmt: skip
    return {"1": {"class_type": "LoraFoundry_CaptionDataset", "inputs": inputs}}


def dataset_prompt(folder: str) -> dict:
    inputs = dict(folder=folder, vae=["1", 2], clip=["1", 1], resolution=64, trigger_word="zkw", buckets=True,
                  crop="center", flip=False, shuffle_tags=False, keep_tags=0, caption_dropout=0.0, repeats=1,
                  cache="memory")  # fmt: skip
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {"class_type": "LoraFoundry_TrainingDataset", "inputs": inputs},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}},
    }


def train_prompt(folder: str, name: str) -> dict:
    train = dict(model=["1", 0], clip=["1", 1], dataset=["2", 0], output_name=name, steps=1, epochs=0, batch_size=1,
                 grad_accum=1, rank=4, alpha=4.0, targets="attention", blocks="", lr=1e-3, te_lr=0.0,
                 optimizer="AdamW", scheduler="constant", warmup_steps=0, warmup_ratio=0.0, min_snr_gamma=0.0,
                 noise_offset=0.0, loss="MSE", precision="fp32", gradient_checkpointing=True, seed=1,
                 loraplus_ratio=1.0, dora=False, save_every=0, keep_last=3, save_dtype="fp16", existing="overwrite")  # fmt: skip
    return {**dataset_prompt(folder), "4": {"class_type": "LoraFoundry_TrainLora", "inputs": train}}


NODES = {  # node: (prompt for a bad folder and a good data set's name, error prefix, input named)
    "prepare_source": (lambda bad, ds: prepare_prompt(bad, ds + "_out"), "[Prepare Images]", "source_folder"),
    "prepare_output": (lambda bad, ds: prepare_prompt(ds, bad), "[Prepare Images]", "output_folder"),
    "caption_folder": (lambda bad, ds: caption_prompt(bad), "[Caption Dataset]", "folder"),
    "caption_output": (lambda bad, ds: caption_prompt(ds, bad), "[Caption Dataset]", "output_folder"),
    "training_folder": (lambda bad, ds: dataset_prompt(bad), "[LoRA Training Dataset]", "folder"),
}


@pytest.fixture
def dataset(server):
    """A captioned folder in the server's input/ (a fresh name per test)."""
    folder = server.base_dir / "input" / f"confine_{uuid.uuid4().hex[:8]}"
    _image(folder / "a.png")
    (folder / "a.txt").write_text("red, circle")
    return folder


@pytest.fixture
def outside(tmp_path):
    """Outside every root of the server: a secret, a captioned image, an existing requirements.txt."""
    root = tmp_path / "outside"
    _image(root / "private.png")
    (root / "private.txt").write_text(SECRET)
    (root / "secret.txt").write_text(SECRET)
    (root / "requirements.txt").write_text("torch\n")
    return root


def failed_with(server, prompt: dict) -> dict:
    with pytest.raises(PromptFailed) as e:
        server.run(prompt, timeout=600)
    errors = [data for kind, data in e.value.entry["status"]["messages"] if kind == "execution_error"]
    assert len(errors) == 1, e.value.entry["status"]
    return errors[0]


def assert_server_answers(server, dataset):
    out = f"{dataset.name}_ok_{uuid.uuid4().hex[:6]}"
    entry = server.run(prepare_prompt(dataset.name, out), timeout=600)
    assert re.search(r": [1-9]\d* written, 0 skipped", entry["outputs"]["1"]["text"][0])
    assert server.proc.poll() is None and server.get("/system_stats")["system"]


@pytest.mark.parametrize("escape", ["absolute", "dotdot", "symlink"])
@pytest.mark.parametrize("node", sorted(NODES))
def test_folder_inputs_refuse_escapes_and_server_runs_on(server, demo_models, dataset, outside, node, escape):
    make, prefix, field = NODES[node]
    input_dir = server.base_dir / "input"
    if escape == "symlink":
        link = input_dir / f"leak_{uuid.uuid4().hex[:8]}"
        link.symlink_to(outside)
        bad = link.name
    else:
        bad = str(outside) if escape == "absolute" else os.path.relpath(outside, input_dir)
    before = _snapshot(outside)
    err = failed_with(server, make(bad, dataset.name))
    assert err["exception_message"].startswith(f"{prefix} `{field}` {bad!r} {OUTSIDE_MESSAGE}")
    assert str(outside) not in err["exception_message"].replace(repr(bad), "")
    assert _snapshot(outside) == before
    assert_server_answers(server, dataset)


def test_outside_message_does_not_tell_whether_a_path_exists(server, demo_models, outside):
    messages = []
    for path in (outside, outside.parent / "no_such_folder"):
        err = failed_with(server, dataset_prompt(str(path)))
        messages.append(err["exception_message"].replace(repr(str(path)), "<path>"))
    assert messages[0] == messages[1]


def test_requirements_txt_beside_an_uploaded_png_is_never_replaced(server, demo_models, dataset, outside):
    """The issue's attack, inside the roots: a .txt already in the output folder is kept."""
    _image(dataset / "requirements.png")
    (dataset / "requirements.txt").write_text("evil-package\n")
    out = server.base_dir / "input" / f"{dataset.name}_target"
    out.mkdir()
    (out / "requirements.txt").write_text("torch\n")
    summary = server.run(prepare_prompt(dataset.name, out.name), timeout=600)["outputs"]["1"]["text"][0]
    assert (out / "requirements.txt").read_text() == "torch\n"
    assert "requirements.txt already exists in the output folder; it was kept" in summary


@pytest.mark.timeout(900)
def test_symlinked_secret_reaches_neither_prepared_folder_nor_trained_lora(
    server, demo_models, dataset, outside
):
    _image(dataset / "b.png", colour=(30, 30, 200))
    (dataset / "b.txt").symlink_to(outside / "secret.txt")
    (dataset / "c.png").symlink_to(outside / "private.png")
    out = f"{dataset.name}_prepared"
    summary = server.run(prepare_prompt(dataset.name, out), timeout=600)["outputs"]["1"]["text"][0]
    prepared = server.base_dir / "input" / out
    assert sorted(os.listdir(prepared)) == ["a.png", "a.txt", "b.png"]
    assert all(SECRET.encode() not in p.read_bytes() for p in prepared.iterdir())
    assert "skipped c.png" in summary and "note b.png" in summary

    name = f"confine_{dataset.name}"
    entry = server.run(train_prompt(dataset.name, name), timeout=900)
    dataset_summary = entry["outputs"]["3"]["text"][0]
    assert "b.txt is a link leading outside the folder" in dataset_summary and SECRET not in dataset_summary
    meta = server.get(f"/view_metadata/loras?filename={name}/{name}.safetensors")
    assert SECRET not in json.dumps(meta)
    assert json.loads(meta["ss_tag_frequency"]) == {dataset.name: {"zkw": 2, "red": 1, "circle": 1}}


@pytest.mark.timeout(300)
def test_fifo_caption_does_not_hang_the_queue(server, demo_models, dataset):
    _image(dataset / "b.png")
    os.mkfifo(dataset / "b.txt")
    entry = server.run(dataset_prompt(dataset.name), timeout=240)
    assert "caption b.txt is not a regular file" in entry["outputs"]["3"]["text"][0]
    assert_server_answers(server, dataset)
