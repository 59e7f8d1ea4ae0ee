"""Whole-file layouts ComfyUI core renames before loading (Wan Fun, USO) load here with core's
weights; a Flux control LoRA, which needs the model's input widened, is refused with a pointer."""

from __future__ import annotations

import comfy.sd
import comfy.utils
import model_factory
import pytest
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


def test_flux_control_lora_is_refused_with_a_pointer(flux, loras_dir):
    sd = flux.model.diffusion_model.state_dict()
    g = torch.Generator().manual_seed(73)
    up, down = _pair(g, sd["img_in.weight"].shape[0], 2 * sd["img_in.weight"].shape[1])
    tensors = {"img_in.lora_B.weight": up, "img_in.lora_A.weight": down,
               "single_blocks.0.norm.key_norm.scale": torch.ones(sd["single_blocks.0.norm.key_norm.scale"].shape)}  # fmt: skip
    name = write(loras_dir, "flux_depth_control.safetensors", tensors)
    with pytest.raises(
        RuntimeError, match=r"flux_depth_control\.safetensors: .*control LoRA.*LoraLoaderModelOnly"
    ):
        LoadLoraModelOnly().execute(flux, name, 1.0)
