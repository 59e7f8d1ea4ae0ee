"""diffusers-named HunyuanVideo 1.5 LoRA files (issue #19): PEFT's adapter on a tiny diffusers
``HunyuanVideo15Transformer3DModel`` (the names diffusers / SimpleTuner / ai-toolkit write), loaded onto the
tiny ComfyUI HunyuanVideo 1.5 model of scripts/dit_factory.py. ComfyUI packs each block's q, k, v into one
``img_attn.qkv`` / ``txt_attn.qkv`` weight where diffusers keeps ``attn.to_q`` ... and ``attn.add_q_proj`` ...
apart, and ComfyUI's own key map names none of these diffusers paths. The peer: the diffusers model given
the ComfyUI model's weights (q, k, v cut from the fused ones), PEFT's own merge of the adapter into it, the
merged weights mapped back by name (q, k, v stacked): every patched ComfyUI weight must equal it."""

from __future__ import annotations

import pytest
import torch
from dit_files import model_of
from patch_compare import TOL, patched, write

from lora_foundry.nodes.load_lora import LoadLoraModelOnly

RANK = 4
# The tiny diffusers model with the dims of dit_factory's "hunyuan_video15" (hidden 64 = 2 heads x 32,
# 2 double blocks, text width 32, 4x MLP).
CONFIG = dict(in_channels=32, out_channels=32, num_attention_heads=2, attention_head_dim=32, num_layers=2,
              num_refiner_layers=1, text_embed_dim=32, text_embed_2_dim=32, image_embed_dim=1152,
              rope_axes_dim=(8, 12, 12), patch_size=1, patch_size_t=1)  # fmt: skip
# diffusers path in transformer_blocks.{i} -> (ComfyUI path in double_blocks.{i}, slice of the fused rows)
_BLOCK = {
    **{f"attn.to_{x}": ("img_attn.qkv", n) for n, x in enumerate("qkv")},
    **{f"attn.add_{x}_proj": ("txt_attn.qkv", n) for n, x in enumerate("qkv")},
    "attn.to_out.0": ("img_attn.proj", None), "attn.to_add_out": ("txt_attn.proj", None),
    "ff.net.0.proj": ("img_mlp.0", None), "ff.net.2": ("img_mlp.2", None),
    "ff_context.net.0.proj": ("txt_mlp.0", None), "ff_context.net.2": ("txt_mlp.2", None),
    "norm1.linear": ("img_mod.lin", None), "norm1_context.linear": ("txt_mod.lin", None),
}  # fmt: skip


def _comfy_key(path: str) -> tuple[str, int | None]:
    _, i, rest = path.split(".", 2)
    ours, part = _BLOCK[rest]
    return f"diffusion_model.double_blocks.{i}.{ours}", part


def _peer(comfy_sd: dict) -> tuple[dict, dict]:
    """(PEFT's adapter state dict with diffusers names, the merged weights under ComfyUI's keys)."""
    from diffusers import HunyuanVideo15Transformer3DModel
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(91)
    model = HunyuanVideo15Transformer3DModel(**CONFIG).float()
    targets = [f"transformer_blocks.{i}.{p}" for i in range(CONFIG["num_layers"]) for p in _BLOCK]
    linears = dict(model.named_modules())
    with torch.no_grad():
        for path in targets:  # the ComfyUI model's weights (and biases) into the diffusers model
            key, part = _comfy_key(path)
            for attr in ("weight", "bias"):
                t = comfy_sd[f"{key}.{attr}"].float()
                rows = t.shape[0] // 3
                getattr(linears[path], attr).copy_(t if part is None else t[part * rows : (part + 1) * rows])
    # lora_alpha = rank: the file carries no alpha, so a loader scales by 1 as PEFT does here
    cfg = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=targets, init_lora_weights=False)
    model = inject_adapter_in_model(cfg, model)
    adapter = get_peft_model_state_dict(model)
    assert len(adapter) == 2 * len(targets), sorted(adapter)[:4]
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.merge()
    merged_parts: dict[str, dict] = {}
    for path in targets:
        key, part = _comfy_key(path)
        merged_parts.setdefault(key, {})[part] = model.get_submodule(path).base_layer.weight.detach().clone()
    merged = {
        f"{key}.weight": parts[None] if None in parts else torch.cat([parts[n] for n in range(3)])
        for key, parts in merged_parts.items()
    }
    return adapter, merged


@pytest.mark.parametrize(
    ("prefix", "expect"),
    [("transformer.", "diffusers / SimpleTuner / ai-toolkit"), ("diffusion_model.", "ai-toolkit / ComfyUI-style"),
     ("", "DiffSynth-Studio")],
)  # fmt: skip
def test_diffusers_hunyuan_video_15_equals_peft_merge(prefix, expect, loras_dir):
    model = model_of("hunyuan_video15")
    adapter, merged = _peer(model.model.state_dict())
    file = {prefix + k: v for k, v in adapter.items()}
    name = write(loras_dir, f"hv15_diffusers_{prefix.strip('.') or 'bare'}.safetensors", file)
    out = LoadLoraModelOnly().execute(model, name, 1.0)
    report = out["ui"]["text"][0]
    n = len(adapter) // 2
    assert f"matched: unet {n}" in report and "NOT applied" not in report, report
    assert f"layout: {expect} HunyuanVideo 1.5 LoRA" in report, report
    ours = patched(out["result"][0])
    assert set(ours) == set(merged), (sorted(set(ours) ^ set(merged)))[:5]
    base = model.model.state_dict()
    for key, weight in merged.items():
        assert (weight - base[key].float()).abs().max() > 1e-3, f"{key}: the peer's merge changed nothing"
        diff = (ours[key] - weight).abs().max().item()
        assert diff <= TOL, f"{key}: max abs diff {diff}"
