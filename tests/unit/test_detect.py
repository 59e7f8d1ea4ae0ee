"""Base-family detection from keys, shapes and metadata, and from a model's unet_config."""

import pytest
import torch

from lora_foundry.lora_core.files.detect import detect_family, model_family_from_unet_config


def pair(name, in_dim, out_dim=8, rank=2):
    return {
        f"{name}.lora_down.weight": torch.zeros(rank, in_dim),
        f"{name}.lora_up.weight": torch.zeros(out_dim, rank),
    }


@pytest.mark.parametrize(
    "sd, family",
    [
        (pair("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 768), "SD1.x"),
        (pair("lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_v", 1024), "SD2.x"),
        (pair("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 2048), "SDXL"),
        (pair("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 1280), "SDXL"),
        (pair("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 768), "SD1.x"),
        (pair("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 1024), "SD2.x"),
        (pair("lora_unet_double_blocks_0_img_attn_qkv", 3072), "Flux, Flux.2 or Chroma"),
        (pair("transformer.single_transformer_blocks.0.attn.to_q", 3072), "Flux"),
        (pair("transformer.transformer_blocks.0.attn.to_q", 3072), "Flux"),
        (pair("transformer.transformer_blocks.0.attn.to_q", 1536), "SD3"),
        (pair("lora_unet_joint_blocks_0_x_block_attn_qkv", 1536), "SD3"),
    ],
)
def test_from_keys_and_shapes(sd, family):
    assert detect_family(sd, {}).family == family


@pytest.mark.parametrize(
    "meta, family",
    [
        ({"ss_base_model_version": "sd_v1"}, "SD1.x"),
        ({"ss_base_model_version": "sdxl_base_v1-0"}, "SDXL"),
        ({"ss_base_model_version": "sd_v2_768_v"}, "SD2.x"),
        ({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, "SDXL"),
        ({"modelspec.architecture": "flux-1-dev/lora"}, "Flux"),
        ({"ss_v2": "True"}, "SD2.x"),
        ({}, "unknown"),
    ],
)
def test_from_metadata_when_keys_say_nothing(meta, family):
    guess = detect_family({"x.weird": torch.zeros(1)}, meta)
    assert guess.family == family and guess.evidence


def test_keys_win_over_conflicting_metadata():
    sd = pair("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 2048)
    guess = detect_family(sd, {"ss_base_model_version": "sd_v1"})
    assert guess.family == "SDXL" and "metadata says SD1.x" in guess.evidence


@pytest.mark.parametrize(
    "cfg, family",
    [
        ({"context_dim": 768, "adm_in_channels": None, "in_channels": 4}, "SD1.x"),
        ({"context_dim": 1024, "adm_in_channels": None, "in_channels": 4}, "SD2.x"),
        ({"context_dim": 2048, "adm_in_channels": 2816, "in_channels": 4}, "SDXL"),
        ({"context_dim": 1280, "adm_in_channels": 2560, "in_channels": 4}, "SDXL Refiner"),
        ({"context_dim": 1024, "adm_in_channels": 768, "in_channels": 8}, "unknown"),
        ({"image_model": "flux", "hidden_size": 3072}, "Flux"),
        ({"image_model": "hunyuan_video"}, "unknown"),
        ({"in_channels": 16, "pos_embed_scaling_factor": None}, "SD3"),
    ],
)
def test_model_family_from_unet_config(cfg, family):
    assert model_family_from_unet_config(cfg).family == family


def dit(names, width=8, out=None):
    sd = {}
    for name in names:
        sd |= pair(name, width, out or width)
    return sd


@pytest.mark.parametrize(
    "names, family",
    [  # each family's own module paths, in the spellings trainers write (ComfyUI, kohya / musubi, diffusers)
        (["diffusion_model.blocks.0.self_attn.q", "diffusion_model.blocks.0.cross_attn.k"], "Wan"),
        (["lora_unet_blocks_0_cross_attn_q", "lora_unet_blocks_0_ffn_0"], "Wan"),
        (["transformer.blocks.0.attn1.to_q", "transformer.blocks.0.attn2.to_k"], "Wan"),  # diffusers Wan
        (["blocks.3.self_attn.o"], "Wan"),  # DiffSynth-Studio, bare
        (["transformer_blocks.0.img_mlp.net.0.proj", "transformer_blocks.0.attn.to_q"], "Qwen-Image"),
        (["lora_unet_transformer_blocks_0_txt_mod_1"], "Qwen-Image"),
        (["transformer.transformer_blocks.0.attn1.to_q", "transformer.transformer_blocks.0.attn2.to_k"], "LTX-Video"),
        (["diffusion_model.double_stream_blocks.0.block.attn1.to_q"], "HiDream"),
        (["lora_unet_single_stream_blocks_1_block_ff_i_shared_experts_w1"], "HiDream"),
        (["transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj"], "Flux.2"),  # diffusers Flux.2
        (["lora_unet_distilled_guidance_layer_layers_0_in_layer", "lora_unet_double_blocks_0_img_attn_qkv"],
         "Chroma"),
        (["diffusion_model.txt_in.individual_token_refiner.blocks.0.self_attn.qkv",
          "diffusion_model.double_blocks.0.img_attn.qkv"], "HunyuanVideo 1.5"),
        (["diffusion_model.double_blocks.30.img_attn.proj"], "HunyuanVideo 1.5"),  # 19 double blocks in Flux
    ],
)  # fmt: skip
def test_dit_families_from_their_module_names(names, family):
    guess = detect_family(dit(names), {})
    assert guess.family == family and guess.labels == (family,), guess


def test_double_single_blocks_narrowed_by_the_mlp_width():
    flux = pair("lora_unet_single_blocks_0_linear1", 64, 7 * 64) | pair(
        "lora_unet_double_blocks_0_img_mlp_0", 64, 256
    )
    flux2 = pair("lora_unet_single_blocks_0_linear1", 64, 9 * 64) | pair(
        "lora_unet_double_blocks_0_img_mlp_0", 64, 384
    )
    assert detect_family(flux, {}).labels == ("Flux", "Chroma")
    assert detect_family(flux2, {}).labels == ("Flux.2",)
    # Per-block modulation: Flux.1 (and HunyuanVideo), never Flux.2 or Chroma.
    assert detect_family(pair("lora_unet_double_blocks_0_img_mod_lin", 64), {}).labels == (
        "Flux",
        "HunyuanVideo 1.5",
    )


def test_the_header_picks_among_what_the_keys_allow():
    keys = pair("lora_unet_double_blocks_0_img_attn_qkv", 64, 192)
    assert detect_family(keys, {"ss_base_model_version": "flux2"}).family == "Flux.2"
    assert detect_family(keys, {"modelspec.architecture": "chroma/lora"}).family == "Chroma"
    wan = detect_family(keys, {"modelspec.architecture": "wan2.1/lora"})  # not one the keys allow: keys win
    assert "Wan" not in wan.labels and "metadata says Wan" in wan.evidence


def test_z_image_and_lumina_told_apart_by_width_only():
    names = ["diffusion_model.layers.0.attention.qkv", "diffusion_model.layers.0.feed_forward.w1"]
    assert detect_family(dit(names, 3840), {}).family == "Z-Image"
    assert detect_family(dit(names, 2304), {}).family == "Lumina 2"
    assert detect_family(dit(names, 64), {}).labels == ("Z-Image", "Lumina 2")
    assert detect_family(dit(names, 64), {"modelspec.architecture": "z-image/lora"}).family == "Z-Image"


@pytest.mark.parametrize(
    "cfg, family",
    [
        ({"image_model": "flux2"}, "Flux.2"),
        ({"image_model": "chroma"}, "Chroma"),
        ({"image_model": "qwen_image"}, "Qwen-Image"),
        ({"image_model": "wan2.1", "model_type": "t2v"}, "Wan"),
        ({"image_model": "lumina2", "z_image_modulation": True}, "Z-Image"),
        ({"image_model": "lumina2"}, "Lumina 2"),
        ({"image_model": "hidream"}, "HiDream"),
        ({"image_model": "ltxv"}, "LTX-Video"),
    ],
)
def test_dit_model_family_from_unet_config(cfg, family):
    assert model_family_from_unet_config(cfg).family == family
