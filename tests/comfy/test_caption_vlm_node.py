"""Caption Dataset with a vision-language captioner in-process: models/captioners is listed, a run writes
sentences, broken folders give the node's error, and graphs saved before the VLM widgets still load."""

from __future__ import annotations

import shutil
import uuid

import folder_paths
import pytest
import torch
from make_demo_models import write_demo_tagger
from PIL import Image
from tiny_vlm import build_tiny_vlm

from lora_foundry.nodes import comfy_bridge as bridge
from lora_foundry.nodes import comfy_bridge_caption as vlm_bridge
from lora_foundry.nodes.caption import CaptionDataset
from lora_foundry.nodes.caption_vlm import TAGGER_CHOICE

TAGGER = "vlm_tagger/model.onnx"
# Caption Dataset's widgets in the order graphs saved before issue #20 hold their values (workflows/
# caption_dataset.json as it was): the frontend fills widgets by position, so these must stay first.
OLD_WIDGETS = ["folder", "tagger", "general_threshold", "character_threshold", "trigger_word", "mode", "always_first",
               "exclude_tags", "tag_replacements", "replace_underscores", "escape_brackets", "max_tags",
               "output_folder", "include_subfolders", "batch_size"]  # fmt: skip


@pytest.fixture
def captioners(comfy_base, monkeypatch):
    root = comfy_base / "models" / "captioners"
    if not (root / "tinyqwen").exists():
        build_tiny_vlm(root / "tinyqwen", "qwen2_5_vl", seed=1)
    taggers = comfy_base / "models" / "taggers"
    if not (taggers / TAGGER).exists():
        write_demo_tagger(taggers / TAGGER.split("/")[0])
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "captioners", ([str(root)], set()))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "taggers", ([str(taggers)], set()))
    monkeypatch.setattr(
        bridge, "preview_images", lambda images, prefix: []
    )  # ComfyUI's `nodes` is shadowed here
    return root


@pytest.fixture
def dataset(comfy_base):
    folder = comfy_base / "input" / f"vlm_{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    for i, colour in enumerate([(200, 30, 30), (30, 30, 200), (30, 200, 30)]):
        Image.new("RGB", (48 + 8 * i, 48), colour).save(folder / f"{i}.png")
    return folder


def _widget_names(node_class) -> list[str]:
    inputs = node_class.INPUT_TYPES()
    return [*inputs["required"], *inputs.get("optional", {})]


def test_old_graphs_keep_every_widget_in_its_place(captioners, dataset):
    names = _widget_names(CaptionDataset)
    assert names[: len(OLD_WIDGETS)] == OLD_WIDGETS
    assert names[len(OLD_WIDGETS)] == "captioner"
    old_values = [
        dataset.name,
        TAGGER,
        0.5,
        0.85,
        "foundrystyle",
        "overwrite",
        "",
        "",
        "",
        True,
        True,
        0,
        "",
        False,
        4,
    ]
    out = CaptionDataset().execute(**dict(zip(OLD_WIDGETS, old_values, strict=True)))  # new widgets: defaults
    assert "3 tagged" in out["result"][1]
    assert (dataset / "0.txt").read_text().startswith("foundrystyle, ")


@pytest.mark.timeout(300)
def test_vlm_captioner_listed_and_run_writes_sentences(captioners, dataset):
    choices = CaptionDataset.INPUT_TYPES()["optional"]["captioner"][0]
    assert choices[0] == TAGGER_CHOICE and "tinyqwen" in choices
    out = CaptionDataset().execute(
        dataset.name, TAGGER, 0.5, 0.85, "zqx", "overwrite", batch_size=2, captioner="tinyqwen",
        prompt_preset="short", max_new_tokens=8, tag_hints=True,
    )  # fmt: skip
    captions, summary = out["result"][0], out["result"][1]
    assert "3 tagged" in summary and "Captioner tinyqwen (Qwen2.5-VL) ran on cpu in float32" in summary
    for i in range(3):
        text = (dataset / f"{i}.txt").read_text()
        assert text.startswith("zqx, ") and text.count("\n") == 1
        assert f"{i}.png: {text.strip()}" in captions.splitlines()


def test_broken_captioner_gives_the_node_error(captioners, dataset):
    broken = captioners / f"broken_{uuid.uuid4().hex[:6]}"
    shutil.copytree(captioners / "tinyqwen", broken)
    (broken / "model.safetensors").rename(broken / "pytorch_model.bin")
    assert broken.name not in CaptionDataset.INPUT_TYPES()["optional"]["captioner"][0]  # not offered
    with pytest.raises(
        RuntimeError, match=rf"^\[Caption Dataset\] .*{broken.name} holds only pickle weights"
    ):
        CaptionDataset().execute(dataset.name, TAGGER, 0.5, 0.85, "", "overwrite", captioner=broken.name)
    with pytest.raises(RuntimeError, match=r"^\[Caption Dataset\] captioner 'missing' is not installed"):
        CaptionDataset().execute(dataset.name, TAGGER, 0.5, 0.85, "", "overwrite", captioner="missing")
    assert not list(dataset.glob("*.txt"))


def test_placement_on_this_machine_and_model_back_on_cpu_after(captioners):
    place = vlm_bridge.placement(str(captioners / "tinyqwen"))
    assert place.device == torch.device("cpu") and place.dtype == "float32"  # the test machine has no GPU
    moves = []

    class Spy(torch.nn.Linear):
        def to(self, *args, **kwargs):
            moves.append(str(args[0]))
            return self

    with pytest.raises(ValueError), vlm_bridge.on_device(Spy(2, 2), torch.device("cuda:0")):
        raise ValueError("a failed run")
    assert moves == ["cuda:0", "cpu"]  # onto the device for the run, back to the CPU also on an error
