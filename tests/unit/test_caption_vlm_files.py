"""Broken captioner folders give clear errors naming the file and the fix; pickle weights are never opened."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import transformers
from tiny_vlm import build_tiny_vlm

from lora_foundry.lora_core.caption import vlm_files
from lora_foundry.lora_core.caption.vlm import load_captioner
from lora_foundry.lora_core.caption.vlm_files import CaptionerError, find_captioners, inspect_captioner


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("good") / "qwen", "qwen2_5_vl")


@pytest.fixture
def folder(tmp_path, pristine):
    return shutil.copytree(pristine, tmp_path / "captioners" / "mine")


class _Trap:
    """Unpickling this creates a file: proof that a loader ran code from the weights."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _set_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_good_folder_is_found_with_its_family(folder):
    found, problems = find_captioners([folder.parent])
    assert [(c.name, c.family.model_type) for c in found] == [("mine", "qwen2_5_vl")] and problems == []


@pytest.mark.parametrize("missing", ["processor_config.json", "tokenizer_config.json", "tokenizer.json"])
def test_missing_processor_file_is_named(folder, missing):
    (folder / missing).unlink()
    with pytest.raises(CaptionerError, match="download it with the model") as error:
        inspect_captioner(folder)
    assert missing in str(error.value)
    found, problems = find_captioners([folder.parent])
    assert found == [] and missing in problems[0]


def test_pickle_only_weights_are_refused_by_name_and_never_unpickled(folder, tmp_path):
    marker = tmp_path / "ran"
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    with pytest.raises(CaptionerError, match=r"only pickle weights \(pytorch_model.bin\).*safetensors"):
        load_captioner(folder)
    assert not marker.exists()


def test_no_weights_at_all(folder):
    (folder / "model.safetensors").unlink()
    with pytest.raises(CaptionerError, match="has no weights"):
        inspect_captioner(folder)


@pytest.mark.parametrize("model_type", ["bert", None, 7])
def test_wrong_family_lists_the_supported_ones(folder, model_type):
    _set_config(folder, model_type=model_type)
    with pytest.raises(
        CaptionerError, match=r"config.json has model_type .*Qwen2.5-VL \(qwen2_5_vl\).*Florence-2"
    ):
        inspect_captioner(folder)


def test_remote_code_florence_is_refused(folder):
    _set_config(
        folder, model_type="florence2", auto_map={"AutoModelForCausalLM": "modeling_florence2.Florence2"}
    )
    with pytest.raises(CaptionerError, match="remote-code Florence-2.*florence-community"):
        inspect_captioner(folder)


def test_config_that_is_not_json(folder):
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CaptionerError, match="config.json is not valid JSON"):
        inspect_captioner(folder)


def test_family_newer_than_installed_transformers_names_the_version(folder, monkeypatch):
    family = vlm_files.FAMILIES["qwen2_5_vl"]
    newer = vlm_files.Family(family.model_type, family.label, "Qwen9VLForConditionalGeneration", "9.1.0")
    monkeypatch.setitem(vlm_files.FAMILIES, "qwen2_5_vl", newer)
    with pytest.raises(CaptionerError) as error:
        load_captioner(folder)
    assert f"Qwen2.5-VL needs transformers >= 9.1.0; this ComfyUI has {transformers.__version__}" in str(
        error.value
    )


def test_damaged_weights_name_the_folder(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(CaptionerError, match=r"could not be loaded \(its config or safetensors weights\)"):
        load_captioner(folder)
