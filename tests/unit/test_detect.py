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
        (pair("lora_unet_double_blocks_0_img_attn_qkv", 3072), "Flux"),
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
