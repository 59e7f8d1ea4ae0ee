"""Whole-file layout renames (lora_core/files/layouts.py) on plain dicts."""

import torch

from lora_foundry.lora_core.files.layouts import convert_layout


def test_ordinary_files_pass_unchanged():
    tensors = {
        "lora_unet_x.lora_up.weight": torch.zeros(2, 1),
        "lora_unet_x.lora_down.weight": torch.zeros(1, 2),
    }
    out, layout = convert_layout(tensors)
    assert layout is None and out == tensors and out is not tensors


def test_wan_fun_renames_only_its_doubled_prefix():
    t = torch.zeros(1)
    out, layout = convert_layout(
        {
            "lora_unet__blocks_0_cross_attn_k.lora_down.weight": t,
            "lora_unet__blocks_0_cross_attn_k.alpha": t,
            "lora_te_other.alpha": t,
        }  # fmt: skip
    )
    assert layout == "Wan Fun"
    assert set(out) == {"lora_unet_blocks_0_cross_attn_k.lora_down.weight", "lora_unet_blocks_0_cross_attn_k.alpha",
                        "lora_te_other.alpha"}  # fmt: skip


def test_uso_keys_become_comfyui_trainer_keys():
    t = torch.zeros(1)
    keys = ["single_blocks.37.processor.qkv_lora.up.weight", "double_blocks.18.processor.qkv_lora2.up.weight",
            "double_blocks.0.processor.proj_lora1.down.weight", "single_blocks.3.processor.proj_lora.up.weight"]  # fmt: skip
    out, layout = convert_layout(dict.fromkeys(keys, t))
    assert layout == "USO"
    assert set(out) == {
        "diffusion_model.single_blocks.37.linear1_qkv.lora_up.weight",
        "diffusion_model.double_blocks.18.txt_attn.qkv.lora_up.weight",
        "diffusion_model.double_blocks.0.img_attn.proj.lora_down.weight",
        "diffusion_model.single_blocks.3.linear2.lora_up.weight",
    }


def test_flux_control_layout_gets_comfyui_names_and_a_reshape():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 128, generator=g), torch.randn(64, 4, generator=g)
    tensors = {"img_in.lora_A.weight": a, "img_in.lora_B.weight": b, "img_in.lora_B.bias": torch.zeros(64),
               "single_blocks.0.norm.key_norm.scale": torch.ones(32)}  # fmt: skip
    out, layout = convert_layout(tensors)
    assert layout == "Flux control"
    assert set(out) == {"diffusion_model.img_in.lora_A.weight", "diffusion_model.img_in.lora_B.weight",
                        "diffusion_model.img_in.diff_b", "diffusion_model.single_blocks.0.norm.key_norm.scale.set_weight",
                        "diffusion_model.img_in.reshape_weight"}  # fmt: skip
    assert out["diffusion_model.img_in.reshape_weight"].tolist() == [64, 128]
