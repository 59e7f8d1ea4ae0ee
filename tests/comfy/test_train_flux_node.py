"""Train LoRA (the node) on ComfyUI's tiny Flux: the file carries kohya's Flux names
(lora_unet_double_blocks_0_img_attn_qkv ...) and flux1 metadata, loads in ComfyUI core's loader
with zero unmatched keys, and the MODEL output equals core's load of the same file; a video model
and min-SNR on a flow model are refused with named errors."""

from __future__ import annotations

import comfy.lora
import comfy.model_management
import comfy.sd
import pytest
import safetensors
import safetensors.torch
import torch
from flow_data import flux_dataset
from patch_compare import assert_same, patched
from train_run import TRAIN_ARGS, train_model

from lora_foundry.lora_core.train.dataset import Sample
from lora_foundry.nodes.train import TrainLora


def train_flux(patcher, **changes):
    return train_model(patcher, flux_dataset(), unique_id="3", **changes)


@pytest.mark.timeout(600)
def test_flux_file_has_kohya_names_and_loads_in_core_as_ours(flux, loras_dir, caplog):
    out = train_flux(flux, output_name="tiny_flux", targets="attention_ff", steps=3, lr=1e-2)
    model, _, lora_name, _ = out["result"]
    path = loras_dir / lora_name
    with safetensors.safe_open(str(path), "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    modules = {k.split(".")[0] for k in keys}
    assert "lora_unet_double_blocks_0_img_attn_qkv" in modules
    assert "lora_unet_single_blocks_1_linear1" in modules and "lora_unet_double_blocks_1_txt_mlp_2" in modules
    assert all(m.startswith("lora_unet_") for m in modules)
    assert meta["ss_base_model_version"] == "flux1" and meta["ss_steps"] == "3"
    sd = safetensors.torch.load_file(str(path))
    assert any(v.abs().max() > 0 for k, v in sd.items() if "lora_up" in k)
    with caplog.at_level("WARNING"):
        loaded = comfy.lora.load_lora(sd, comfy.lora.model_lora_keys_unet(flux.model, {}))
    assert not [r for r in caplog.records if "not loaded" in r.getMessage()]
    assert len(loaded) == len(modules)
    core_model, _ = comfy.sd.load_lora_for_models(flux, None, sd, 1.0, 0.0)
    assert_same(patched(model), patched(core_model))


@pytest.mark.timeout(120)
def test_video_model_and_min_snr_on_flow_are_named_errors(flux, loras_dir):
    import model_factory

    wan = model_factory.wan_model()
    with pytest.raises(RuntimeError, match=r"\[Train LoRA\] WAN21_T2V is a model for video \(5-D latents\)"):
        train_flux(wan, output_name="wan_try")
    with pytest.raises(
        RuntimeError, match=r"\[Train LoRA\] `min_snr_gamma` applies to eps / v-prediction.*loss_weighting"
    ):
        train_flux(flux, output_name="snr_try", min_snr_gamma=5.0)


@pytest.mark.timeout(600)
def test_flux_blocks_in_its_own_numbering(flux, loras_dir):
    out = train_flux(flux, output_name="flux_blocks", blocks="double1, single0", steps=1)
    with safetensors.safe_open(str(loras_dir / out["result"][2]), "pt") as f:
        modules = {k.split(".")[0] for k in f.keys()}  # noqa: SIM118  (safe_open is no dict)
    assert modules and all(
        m.startswith(("lora_unet_double_blocks_1_", "lora_unet_single_blocks_0_")) for m in modules
    )
    assert any(m.startswith("lora_unet_single_blocks_0_") for m in modules)
    with pytest.raises(
        RuntimeError, match=r"\[Train LoRA\] `blocks` entry 'double2' is past .*double0-1, single0-1"
    ):
        train_flux(flux, output_name="flux_blocks_bad", blocks="double2")
    with pytest.raises(RuntimeError, match=r"`blocks` entry 'in4' is not a block of this model"):
        train_flux(flux, output_name="flux_blocks_bad", blocks="in4")


def test_resolution_the_patches_cannot_take_names_the_nearest(flux):
    ds = flux_dataset(1)
    ds.samples[0] = Sample(torch.zeros(16, 5, 5), None, (40, 40), ds.samples[0].caption, 1)
    with (
        pytest.raises(
            RuntimeError, match=r"\[Train LoRA\] .*40x40.*multiples of 16.*nearest valid size is 48x48"
        ),
        torch.inference_mode(),
    ):
        TrainLora().execute(flux, None, ds, **{**TRAIN_ARGS, "output_name": "odd_size"}, unique_id="3")


@pytest.mark.timeout(600)
def test_fp8_stored_flux_base_trains_with_fp32_lora_weights(loras_dir):
    """weight_dtype fp8_e4m3fn: the base stays fp8 (computed in float32 on the CPU), the LoRA learns
    in float32 and the saved file loads in core's loader with zero unmatched keys."""
    import model_factory

    fp8 = model_factory.flux_model(seed=0, dtype=torch.float8_e4m3fn)
    qkv = fp8.model.diffusion_model.double_blocks[0].img_attn.qkv.weight
    assert qkv.dtype == torch.float8_e4m3fn
    out = train_flux(fp8, output_name="flux_fp8", steps=2, lr=1e-2, save_dtype="fp32")
    assert fp8.model.diffusion_model.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn
    sd = safetensors.torch.load_file(str(loras_dir / out["result"][2]))
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert any(v.abs().max() > 0 for k, v in sd.items() if "lora_up" in k)
    loaded = comfy.lora.load_lora(sd, comfy.lora.model_lora_keys_unet(fp8.model, {}))
    assert len(loaded) == len({k.split(".")[0] for k in sd})
