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
from dit_files import check, trained_model
from flow_data import flux_dataset, qwen_dataset
from train_run import train_model

# diffusers' kohya Flux converter splits a single block's linear1 at Flux's real widths (3 x 3072 +
# 12288), so on the tiny Flux only the double blocks (q, k, v split in three equal parts) are trained
BLOCKS = {"flux": "double0-1"}


def trained_file(family: str, loras_dir, targets: str):
    """Train LoRA (the node) on the family's tiny model, a few steps at a large learning rate;
    returns (model, path of the file it wrote)."""
    model = trained_model(family)
    with torch.inference_mode():  # as ComfyUI's dataset node makes them
        data = flux_dataset() if family == "flux" else qwen_dataset()
    out = train_model(model, data, output_name=f"{family}_reads_{targets}", targets=targets, lr=1e-2,
                      blocks=BLOCKS.get(family, ""))  # fmt: skip
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
    cls_name, config, pipe = dit_peer.trained_peer(family)
    converted = getattr(diffusers, pipe).lora_state_dict(str(path))
    converted = converted[0] if isinstance(converted, tuple) else converted
    converted = {k: v.clone() for k, v in converted.items()}  # Flux: q, k, v share one lora_A tensor
    assert converted and all(k.startswith("transformer.") for k in converted), sorted(converted)[:3]
    converted_modules = {k.rsplit(".lora_", 1)[0] for k in converted}
    assert len(converted_modules) >= len(modules)  # a fused qkv becomes three
    check(model, loras_dir, family, converted, ours, f"diffusers_reads_{targets}",
          "diffusers / SimpleTuner / ai-toolkit")  # fmt: skip
    torch.manual_seed(0)
    transformer = getattr(diffusers, cls_name)(**config)
    transformer.load_lora_adapter(converted, prefix="transformer", adapter_name="ours")
    adapted = {n for n, m in transformer.named_modules() if hasattr(m, "lora_A") and "ours" in m.lora_A}
    assert {f"transformer.{n}" for n in adapted} == converted_modules
