"""Caption Dataset with a vision-language captioner through a real ComfyUI server (issue #20): a folder in
models/captioners is offered, a prompt writes sentence captions, and a folder with pickle weights is never
offered nor run while the server keeps answering."""

from __future__ import annotations

import shutil
import uuid

import pytest
from PIL import Image
from tiny_vlm import build_tiny_vlm

pytestmark = pytest.mark.server

NAME = "tiny_qwen_vl"
TAGGER = "lora_foundry_demo_tagger/model.onnx"


def caption_prompt(folder: str, captioner: str, tagger: str) -> dict:
    inputs = dict(folder=folder, tagger=tagger, general_threshold=0.5, character_threshold=0.85, trigger_word="zkw",
                  mode="overwrite", batch_size=4, captioner=captioner, prompt_preset="training (trigger first)",
                  max_new_tokens=12, temperature=0.0, tag_hints=True)  # fmt: skip
    return {"1": {"class_type": "LoraFoundry_CaptionDataset", "inputs": inputs}}


@pytest.fixture(scope="module")
def captioner(server):
    folder = server.base_dir / "models" / "captioners" / NAME
    if not folder.exists():
        build_tiny_vlm(folder, "qwen2_5_vl", seed=2)
    return folder


@pytest.fixture
def dataset(server):
    folder = server.base_dir / "input" / f"vlm_{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    for i in range(5):
        Image.new("RGB", (64, 48 + 4 * i), (40 * i, 90, 160)).save(folder / f"{i}.png")
    return folder


@pytest.mark.timeout(900)
def test_caption_dataset_with_a_vlm_folder_writes_sentences(server, demo_models, captioner, dataset):
    listed = server.get("/object_info/LoraFoundry_CaptionDataset")["LoraFoundry_CaptionDataset"]
    assert NAME in listed["input"]["optional"]["captioner"][0]
    entry = server.run(caption_prompt(dataset.name, NAME, TAGGER), timeout=900)
    summary = entry["outputs"]["1"]["text"][0]
    assert (
        "5 images; 5 tagged, 0 skipped, 0 failed" in summary and f"Captioner {NAME} (Qwen2.5-VL)" in summary
    )
    for i in range(5):
        text = (dataset / f"{i}.txt").read_text()
        assert text.startswith("zkw, ") and text.endswith("\n") and text.count("\n") == 1


@pytest.mark.timeout(900)
def test_pickle_only_folder_is_not_offered_and_server_answers(server, demo_models, captioner, dataset):
    bad = captioner.parent / f"pickled_{uuid.uuid4().hex[:6]}"
    shutil.copytree(captioner, bad)
    (bad / "model.safetensors").rename(bad / "pytorch_model.bin")
    listed = server.get("/object_info/LoraFoundry_CaptionDataset")["LoraFoundry_CaptionDataset"]
    assert bad.name not in listed["input"]["optional"]["captioner"][0]
    # refused when the prompt is checked, before it runs
    with pytest.raises(RuntimeError, match=rf"400.*captioner: '{bad.name}' not in"):
        server.queue(caption_prompt(dataset.name, bad.name, TAGGER))
    assert not list(dataset.glob("*.txt"))
    assert server.proc.poll() is None and server.get("/system_stats")["system"]
