"""The base check for the DiT families (issue #19): a LoRA of one family on a tiny model of another is
refused with both families named, before anything is patched; where a family really runs another's
LoRAs it is not (Chroma takes a Flux LoRA; Wan 2.1 and 2.2 files load on each other's models).

Each LoRA is every 2-D block weight of its family's tiny model, in kohya / musubi-tuner names
(``lora_unet_`` + the path with underscores) and no header, so only the keys and shapes speak.
"""

from __future__ import annotations

import comfy.supported_models as sm
import model_factory
import pytest
from dit_files import FAMILIES, block_paths, factors, model_of, tensors
from patch_compare import write

from lora_foundry.nodes.load_lora import LoadLoraModelOnly

SOURCES = (*FAMILIES, "hunyuan_video15", "flux")
# What the base check calls each tiny model, and each tiny model's LoRA from its keys alone (Z-Image's
# tiny width is neither Z-Image's nor Lumina 2's, so its keys cannot tell which of the two).
MODEL_LABEL = {"wan": "Wan", "zimage": "Z-Image", "qwen_image": "Qwen-Image", "chroma": "Chroma",
               "flux2": "Flux.2", "hidream": "HiDream", "ltxv": "LTX-Video",
               "hunyuan_video15": "HunyuanVideo 1.5", "flux": "Flux"}  # fmt: skip
LORA_LABEL = {**MODEL_LABEL, "zimage": "Z-Image or Lumina 2"}
RUNS = {("flux", "chroma")}  # (LoRA's family, model's family) pairs that are not a mismatch
_FLUX: list = []


def model(family: str):
    if family == "flux":
        if not _FLUX:
            _FLUX.append(model_factory.flux_model())
        return _FLUX[0]
    return model_of(family)


def kohya_file(family: str, seed: int = 5) -> dict:
    f = factors(block_paths(model(family)), seed=seed)
    return tensors({"lora_unet_" + p.replace(".", "_"): ab for p, ab in f.items()}, "kohya", alpha=2.0)


MISMATCHES = [(s, t) for s in SOURCES for t in SOURCES if s != t and (s, t) not in RUNS]


@pytest.mark.parametrize("source, target", MISMATCHES, ids=[f"{s}-on-{t}" for s, t in MISMATCHES])
def test_a_lora_of_another_family_is_refused_naming_both(source, target, loras_dir):
    name = write(loras_dir, f"{source}_on_{target}.safetensors", kohya_file(source))
    with pytest.raises(RuntimeError) as e:
        LoadLoraModelOnly().execute(model(target), name, 1.0)
    text = str(e.value)
    assert f"is a {LORA_LABEL[source]} LoRA" in text and f"the model is {MODEL_LABEL[target]}" in text, text
    assert name in text and "matched none" not in text


@pytest.mark.parametrize("family", SOURCES)
def test_a_lora_of_the_models_own_family_loads_whole(family, loras_dir):
    lora = kohya_file(family, seed=6)
    name = write(loras_dir, f"{family}_own.safetensors", lora)
    report = LoadLoraModelOnly().execute(model(family), name, 1.0)["ui"]["text"][0]
    n = len({k.rsplit(".lora_", 1)[0] for k in lora if ".lora_" in k})
    assert f"matched: unet {n}" in report and "NOT applied" not in report, report
    assert f"base: LoRA {LORA_LABEL[family]}, model {MODEL_LABEL[family]}" in report, report


def test_chroma_takes_a_flux_lora_minus_the_modulation_layers(loras_dir):
    lora = kohya_file("flux", seed=7)
    name = write(loras_dir, "flux_on_chroma.safetensors", lora)
    out = LoadLoraModelOnly().execute(model("chroma"), name, 1.0)
    report = out["ui"]["text"][0]
    modules = {k.rsplit(".lora_", 1)[0] for k in lora if ".lora_" in k}
    modulation = {m for m in modules if m.endswith(("_mod_lin", "_modulation_lin"))}
    assert modulation and "base: LoRA Flux, model Chroma" in report, report
    assert f"matched: unet {len(modules) - len(modulation)}" in report, report
    assert f"NOT applied: {len(modulation)} modules" in report, report
    assert out["result"][0].patches  # the double / single block layers are patched


def _wan22_5b():
    config = {"image_model": "wan2.1", "model_type": "t2v", "dim": 64, "ffn_dim": 128, "freq_dim": 32,
              "text_dim": 32, "num_heads": 2, "num_layers": 2, "in_dim": 48, "out_dim": 48}  # fmt: skip
    return model_factory._dit_patcher(sm.WAN22_T2V, config, 0)


@pytest.mark.parametrize(
    "header", [{"modelspec.architecture": "wan2.1/lora"}, {"ss_base_model_version": "wan22_14b"}]
)
def test_wan_2_1_and_2_2_loras_load_on_each_others_models(header, loras_dir):
    wan22 = _wan22_5b()
    assert type(wan22.model.model_config).__name__ == "WAN22_T2V"
    for target in (model("wan"), wan22):
        lora = kohya_file("wan", seed=8)
        name = write(loras_dir, f"wan_{len(header)}_{id(target)}.safetensors", lora, header)
        report = LoadLoraModelOnly().execute(target, name, 1.0)["ui"]["text"][0]
        n = len({k.rsplit(".lora_", 1)[0] for k in lora if ".lora_" in k})
        assert f"matched: unet {n}" in report and "base: LoRA Wan, model Wan" in report, report


def test_a_wan_header_on_flux_keys_does_not_hide_the_mismatch(loras_dir):
    """Keys win over a header they contradict: a Flux-keyed file that says Wan is still refused on Wan."""
    name = write(
        loras_dir, "flux_says_wan.safetensors", kohya_file("flux"), {"modelspec.architecture": "wan2.1/lora"}
    )
    with pytest.raises(RuntimeError, match="is a Flux LoRA .*metadata says Wan.* the model is Wan"):
        LoadLoraModelOnly().execute(model("wan"), name, 1.0)
