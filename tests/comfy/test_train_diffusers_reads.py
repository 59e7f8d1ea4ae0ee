"""LoRAs that Train LoRA writes for Qwen-Image and Z-Image in diffusers' own loader: the family's
pipeline ``lora_state_dict`` converts every module of our file (Qwen-Image: musubi-tuner's
``lora_unet_transformer_blocks_N_`` names; Z-Image: a fused ``attention.qkv`` that diffusers splits
into to_q / to_k / to_v), the converted file puts the same weights into the model as core's loader
does with our file (and our loader on diffusers names equals PEFT's own merge:
tests/comfy/test_dit_layouts.py), and a tiny diffusers transformer of the family takes it with every
module adapted."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from dit_files import check, model_of
from flow_data import flux_dataset, qwen_dataset

# family -> the tiny diffusers transformer shaped like the tiny ComfyUI model trained here
# (Z-Image: the 256-wide model of tests/comfy/test_train_dit_families.py; its feed-forward is 688
# wide in ComfyUI, rounded to a multiple of 16, and 682 in diffusers, so only attention is trained)
DIFFUSERS = {
    "flux": ("FluxTransformer2DModel", "FluxPipeline", dict(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=32, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(8, 12, 12))),
    "qwen_image": ("QwenImageTransformer2DModel", "QwenImagePipeline", None),
    "zimage": ("ZImageTransformer2DModel", "ZImagePipeline", dict(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=256, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=[32, 48, 48], axes_lens=[64, 32, 32])),
}  # fmt: skip


# diffusers' kohya Flux converter splits a single block's linear1 at Flux's real widths (3 x 3072 +
# 12288), so on the tiny Flux only the double blocks (q, k, v split in three equal parts) are trained
BLOCKS = {"flux": "double0-1"}


def tiny_model(family: str):
    if family == "qwen_image":
        return model_of(family)
    if family == "flux":
        import model_factory

        return model_factory.flux_model()
    import comfy.supported_models as sm
    import dit_factory
    import model_factory

    return model_factory._dit_patcher(sm.ZImage, dict(dit_factory.ZIMAGE_TRAINABLE), 0)


def trained_file(family: str, loras_dir, targets: str):
    """Train LoRA (the node) on the family's tiny model, a few steps at a large learning rate;
    returns (model, path of the file it wrote)."""
    import comfy.model_management
    from train_run import TRAIN_ARGS

    from lora_foundry.nodes.train import TrainLora

    model = tiny_model(family)
    settings = {
        **TRAIN_ARGS,
        "output_name": f"{family}_reads_{targets}",
        "targets": targets,
        "lr": 1e-2,
        "blocks": BLOCKS.get(family, ""),
    }
    try:
        with torch.inference_mode():  # as ComfyUI runs a graph
            data = flux_dataset() if family == "flux" else qwen_dataset()
            out = TrainLora().execute(model, None, data, **settings, unique_id="7")
    finally:
        comfy.model_management.unload_all_models()
    return model, loras_dir / out["result"][2]


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("family", "targets"),
    [
        ("flux", "attention"),
        ("flux", "all_linear"),
        ("qwen_image", "attention"),
        ("qwen_image", "all_linear"),
        ("zimage", "attention"),
    ],
)
def test_diffusers_reads_a_trained_file_as_core_does(family, targets, loras_dir):
    import diffusers
    import dit_peer

    model, path = trained_file(family, loras_dir, targets)
    ours = safetensors.torch.load_file(str(path))
    modules = {k.split(".")[0] for k in ours}
    cls_name, pipe, config = DIFFUSERS[family]
    converted = getattr(diffusers, pipe).lora_state_dict(str(path))
    converted = converted[0] if isinstance(converted, tuple) else converted
    converted = {k: v.clone() for k, v in converted.items()}  # Flux: q, k, v share one lora_A tensor
    assert converted and all(k.startswith("transformer.") for k in converted), sorted(converted)[:3]
    converted_modules = {k.rsplit(".lora_", 1)[0] for k in converted}
    assert len(converted_modules) >= len(modules)  # a fused qkv becomes three
    check(model, loras_dir, family, converted, ours, f"diffusers_reads_{targets}",
          "diffusers / SimpleTuner / ai-toolkit")  # fmt: skip
    torch.manual_seed(0)
    transformer = getattr(diffusers, cls_name)(**(config or dit_peer.PEERS[family][1]))
    transformer.load_lora_adapter(converted, prefix="transformer", adapter_name="ours")
    adapted = {n for n, m in transformer.named_modules() if hasattr(m, "lora_A") and "ours" in m.lora_A}
    assert {f"transformer.{n}" for n in adapted} == converted_modules
