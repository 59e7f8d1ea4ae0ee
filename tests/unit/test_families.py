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


@pytest.mark.parametrize(
    "meta, label",
    [  # what the trainers write (sources cited in lora_core/files/families.py)
        ({"modelspec.architecture": "Flux.2-dev/lora"}, "Flux.2"),  # musubi-tuner
        ({"modelspec.architecture": "Flux.2-klein-4b/lora"}, "Flux.2"),  # musubi-tuner
        ({"ss_base_model_version": "flux2_klein_9b"}, "Flux.2"),  # ai-toolkit
        ({"ss_base_model_version": "flux1"}, "Flux"),
        ({"modelspec.architecture": "Flux.1-dev/lora"}, "Flux"),  # musubi-tuner (Kontext)
        ({"modelspec.architecture": "chroma/lora"}, "Chroma"),  # sd-scripts
        ({"modelspec.architecture": "lumina-2/lora"}, "Lumina 2"),  # sd-scripts
        ({"modelspec.architecture": "Z-Image/lora"}, "Z-Image"),  # musubi-tuner
        ({"modelspec.architecture": "Qwen-Image-Edit-2511/lora"}, "Qwen-Image"),  # musubi-tuner
        ({"modelspec.architecture": "wan2.1/lora"}, "Wan"),  # musubi-tuner, Wan 2.1 and 2.2
        ({"ss_base_model_version": "wan22_14b"}, "Wan"),
        ({"modelspec.architecture": "hunyuan-video-1.5/lora"}, "HunyuanVideo 1.5"),  # musubi-tuner
        ({"ss_base_model_version": "hidream"}, "HiDream"),
        ({"ss_base_model_version": "ltxv"}, "LTX-Video"),
    ],
)
def test_what_the_dit_trainers_write_is_read_as_its_family(meta, label):
    assert family_from_metadata(meta).family == label


def test_hunyuan_video_1_0_is_not_read_as_1_5():
    assert family_from_metadata({"modelspec.architecture": "hunyuan-video/lora"}) is None


def test_dit_training_runs_write_their_own_family():
    assert families.training_metadata_for_class("Flux2") == {"ss_base_model_version": "flux2"}
    assert families.training_metadata_for_class("Chroma") == {"ss_base_model_version": "chroma"}
    assert families.training_metadata_for_class("Flux") == {"ss_base_model_version": "flux1"}
    assert families.training_metadata_for_class("WAN22_T2V") == {"ss_base_model_version": "wan"}
    assert families.training_metadata_for_class("QwenImage") == {"ss_base_model_version": "qwen_image"}


def test_which_models_run_which_loras():
    assert families.accepts("Chroma", ("Flux",))  # Flux's double / single block layers are all in Chroma
    assert not families.accepts("Flux", ("Chroma",))
    assert families.accepts("Flux.2", ("Flux", "Flux.2", "Chroma"))  # keys that could be either
    assert not families.accepts("Wan", ("Flux", "Flux.2", "Chroma"))
    assert families.accepts("Z-Image", ("Z-Image", "Lumina 2")) and not families.accepts(
        "Z-Image", ("Lumina 2",)
    )
    assert all(families.by_label(t) for f in families.FAMILIES for t in f.takes)  # every taken label is a row
