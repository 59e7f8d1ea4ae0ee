"""The one family table (issue #18): what is written for a family is read back as that family, ComfyUI's
class names reach the same labels, and the trainer's metadata for a class comes from it."""

import pytest

from lora_foundry.lora_core.apply.loader import model_family
from lora_foundry.lora_core.files import families
from lora_foundry.lora_core.files.detect import family_from_metadata


@pytest.mark.parametrize("family", families.FAMILIES, ids=lambda f: f.label)
def test_what_is_written_for_a_family_reads_back_as_it(family):
    if family.base_model_version:
        assert (
            family_from_metadata({"ss_base_model_version": family.base_model_version}).family == family.label
        )
    if family.architecture:
        assert family_from_metadata({"modelspec.architecture": family.architecture}).family == family.label
    for name in family.comfy_classes:
        assert model_family(name, {}).family == family.label


def test_the_refiner_is_not_read_as_sdxl():
    guess = family_from_metadata({"modelspec.architecture": "stable-diffusion-xl-v1-refiner/lora"})
    assert guess.family == "SDXL Refiner"


def test_class_names_and_labels_are_unique():
    classes = [c for f in families.FAMILIES for c in f.comfy_classes]
    assert len(classes) == len(set(classes))
    assert len({f.label for f in families.FAMILIES}) == len(families.FAMILIES)


def test_training_metadata_for_a_class():
    assert families.training_metadata_for_class("SD15") == {
        "ss_base_model_version": "sd_v1",
        "modelspec.architecture": "stable-diffusion-v1/lora",
    }
    assert families.training_metadata_for_class("SDXL")["ss_base_model_version"] == "sdxl_base_v1-0"
    # Unknown to the table: the class name, as the bridge always wrote it, and no modelspec.
    assert families.training_metadata_for_class("HunyuanVideo") == {"ss_base_model_version": "hunyuanvideo"}
    assert families.training_metadata_for_class("SDXLRefiner") == {"ss_base_model_version": "sdxlrefiner"}


def test_an_unknown_class_falls_back_to_the_unet_config():
    assert model_family("NotAClass", {"context_dim": 768, "in_channels": 4}).family == "SD1.x"
