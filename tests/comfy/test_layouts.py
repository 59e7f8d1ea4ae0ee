"""Whole-file layouts ComfyUI core converts before loading (Wan Fun, USO, BFL's Flux control
LoRAs) load here with core's weights."""

from __future__ import annotations

import comfy.sd
import comfy.utils
import model_factory
import torch
from patch_compare import assert_same, patched, write

from lora_foundry.nodes.load_lora import LoadLoraModelOnly


def core_loader(model, loras_dir, name: str, strength: float):
    sd = comfy.utils.load_torch_file(str(loras_dir / name), safe_load=True)
    return comfy.sd.load_lora_for_models(model, None, sd, strength, 0)[0]


def _pair(g, rows: int, cols: int, rank: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(rows, rank, generator=g) * 0.1, torch.randn(rank, cols, generator=g) * 0.1


def test_wan_fun_layout_equals_core(loras_dir):
    wan = model_factory.wan_model()
    sd = wan.model.diffusion_model.state_dict()
    g = torch.Generator().manual_seed(71)
    tensors = {}
    for i in range(2):
        for attn in ("self_attn", "cross_attn"):
            for proj in ("q", "k", "v", "o"):
                w = sd[f"blocks.{i}.{attn}.{proj}.weight"]
                up, down = _pair(g, *w.shape)
                name = f"lora_unet__blocks_{i}_{attn}_{proj}"
                tensors |= {f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down,
                            f"{name}.alpha": torch.tensor(2.0)}  # fmt: skip
    name = write(loras_dir, "wan_fun.safetensors", tensors)
    out = LoadLoraModelOnly().execute(wan, name, 0.9)
    report = out["ui"]["text"][0]
    assert "Wan Fun layout" in report and "matched: unet 16" in report and "unmatched" not in report, report
    assert_same(patched(out["result"][0]), patched(core_loader(wan, loras_dir, name, 0.9)))


def test_uso_layout_equals_core(loras_dir):
    flux = model_factory.flux_model(depth=19, single=38)  # the layout is recognised by its last blocks
    sd = flux.model.diffusion_model.state_dict()
    hidden = sd["img_in.weight"].shape[0]
    g = torch.Generator().manual_seed(72)
    tensors = {}

    def add(name, rows, cols):
        up, down = _pair(g, rows, cols)
        tensors.update({f"{name}.up.weight": up, f"{name}.down.weight": down})

    for i in range(19):
        for lora, weight in (("qkv_lora1", "img_attn.qkv"), ("qkv_lora2", "txt_attn.qkv"),
                             ("proj_lora1", "img_attn.proj"), ("proj_lora2", "txt_attn.proj")):  # fmt: skip
            add(f"double_blocks.{i}.processor.{lora}", *sd[f"double_blocks.{i}.{weight}.weight"].shape)
    for i in range(38):
        add(f"single_blocks.{i}.processor.qkv_lora", 3 * hidden, hidden)  # the q, k, v rows of linear1
        add(f"single_blocks.{i}.processor.proj_lora", *sd[f"single_blocks.{i}.linear2.weight"].shape)
    name = write(loras_dir, "uso_style.safetensors", tensors)
    out = LoadLoraModelOnly().execute(flux, name, 0.75)
    report = out["ui"]["text"][0]
    assert "USO layout" in report and f"matched: unet {19 * 4 + 38 * 2}" in report, report
    assert "unmatched" not in report, report
    assert_same(patched(out["result"][0]), patched(core_loader(flux, loras_dir, name, 0.75)))


def test_flux_control_lora_equals_core_and_grows_img_in(flux, loras_dir):
    """BFL's Canny / Depth layout: img_in widened for the control latents (reshape_weight), norm
    scales replaced (set_weight), bias changes; weights equal core's, and unloading restores shapes."""
    sd = flux.model.diffusion_model.state_dict()
    hidden, channels = sd["img_in.weight"].shape
    g = torch.Generator().manual_seed(73)
    up, down = _pair(g, hidden, 2 * channels)
    tensors = {"img_in.lora_B.weight": up, "img_in.lora_A.weight": down,
               "img_in.lora_B.bias": torch.randn(hidden, generator=g) * 0.1}  # fmt: skip
    for i in range(2):
        key = f"single_blocks.{i}.norm.key_norm.scale"
        tensors[key] = torch.rand(sd[key].shape, generator=g) + 0.5
        w = sd[f"double_blocks.{i}.img_attn.qkv.weight"]
        up, down = _pair(g, *w.shape)
        tensors |= {
            f"double_blocks.{i}.img_attn.qkv.lora_B.weight": up,
            f"double_blocks.{i}.img_attn.qkv.lora_A.weight": down,
        }
    name = write(loras_dir, "flux_depth_control.safetensors", tensors)
    out = LoadLoraModelOnly().execute(flux, name, 0.8)
    report = out["ui"]["text"][0]
    assert "Flux control layout" in report and "unmatched" not in report, report
    ours, core = out["result"][0], core_loader(flux, loras_dir, name, 0.8)
    weights = patched(ours)
    assert tuple(weights["diffusion_model.img_in.weight"].shape) == (hidden, 2 * channels)
    assert_same(weights, patched(core))

    ours.patch_model()  # the real load: the model takes the grown weight, and gives it back
    grown = ours.model.diffusion_model.img_in.weight
    assert tuple(grown.shape) == (hidden, 2 * channels)
    assert torch.allclose(grown, weights["diffusion_model.img_in.weight"], atol=1e-6)
    ours.unpatch_model()
    assert tuple(flux.model.diffusion_model.img_in.weight.shape) == (hidden, channels)
