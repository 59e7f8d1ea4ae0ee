"""DiT key-map aliases (lora_core.files.layouts_dit), trainer / layout names (lora_core.files.trainer_names) and DiT
block weights (lora_core.apply.block_weights_dit) on hand-made key maps and keys."""

from __future__ import annotations

import json

import pytest

from lora_foundry.lora_core.apply.block_weights_dit import DitBlocks, count_blocks, parse_dit_block_weights
from lora_foundry.lora_core.files.layouts_dit import with_aliases
from lora_foundry.lora_core.files.trainer_names import family_name, layout_label

QKV = "diffusion_model.layers.0.attention.qkv.weight"
# A Z-Image-like map: ComfyUI's own path and the diffusers split q of the fused qkv (a slice).
ZMAP = {
    "diffusion_model.layers.0.attention.qkv": QKV,
    "lora_unet_layers_0_attention_qkv": QKV,
    "diffusion_model.layers.0.attention.to_q": (QKV, (0, 0, 8)),
}


def test_aliases_give_every_trainer_spelling_of_each_path():
    out = with_aliases(ZMAP)
    for name in ("lora_unet_layers_0_attention_to_q", "lora_transformer_layers_0_attention_to_q",
                 "lycoris_layers_0_attention_to_q", "transformer.layers.0.attention.to_q",
                 "layers.0.attention.to_q"):  # fmt: skip
        assert out[name] == (QKV, (0, 0, 8)), name
    assert out["layers.0.attention.qkv"] == QKV
    assert {k: out[k] for k in ZMAP} == ZMAP  # the map's own names unchanged


def test_an_alias_never_replaces_a_name_of_the_map():
    key_map = {**ZMAP, "lora_unet_layers_0_attention_to_q": "diffusion_model.other.weight"}
    assert with_aliases(key_map)["lora_unet_layers_0_attention_to_q"] == "diffusion_model.other.weight"


def test_an_alias_two_weights_claim_is_left_out():
    # "a.b_c" and "a_b.c" both flatten to "a_b_c": neither weight may take lora_unet_a_b_c.
    key_map = {"diffusion_model.a.b_c": "diffusion_model.a.b_c.weight",
               "diffusion_model.a_b.c": "diffusion_model.a_b.c.weight"}  # fmt: skip
    out = with_aliases(key_map)
    assert "lora_unet_a_b_c" not in out and "lycoris_a_b_c" not in out
    assert out["transformer.a.b_c"] == "diffusion_model.a.b_c.weight"


def test_unet_models_are_left_alone():
    key_map = {"diffusion_model.input_blocks.1.1.proj_in": "diffusion_model.input_blocks.1.1.proj_in.weight"}
    assert with_aliases(key_map) == key_map


def test_wan_diffusers_names_from_the_table():
    key_map = {"diffusion_model.blocks.0.self_attn.q": "diffusion_model.blocks.0.self_attn.q.weight",
               "diffusion_model.head.modulation": "diffusion_model.head.modulation"}  # fmt: skip
    out = with_aliases(key_map)
    assert out["transformer.blocks.0.attn1.to_q"] == "diffusion_model.blocks.0.self_attn.q.weight"
    assert out["lora_transformer_blocks_0_attn1_to_q"] == "diffusion_model.blocks.0.self_attn.q.weight"
    assert "transformer.blocks.0.attn1.to_k" not in out  # the model has no such weight


def test_hunyuan_split_qkv_needs_and_uses_the_shapes():
    qkv = "diffusion_model.double_blocks.0.img_attn.qkv.weight"
    key_map = {"diffusion_model.double_blocks.0.img_attn.qkv": qkv,
               "diffusion_model.txt_in.individual_token_refiner.blocks.0.norm1":
                   "diffusion_model.txt_in.individual_token_refiner.blocks.0.norm1.weight"}  # fmt: skip
    assert "lora_unet_double_blocks_0_img_attn_k" not in with_aliases(key_map)
    out = with_aliases(key_map, {qkv: (96, 32)})
    assert out["lora_unet_double_blocks_0_img_attn_k"] == (qkv, (0, 32, 32))
    assert out["diffusion_model.double_blocks.0.img_attn_v"] == (qkv, (0, 64, 32))


@pytest.mark.parametrize(
    ("names", "metadata", "family", "label"),
    [
        (["lora_unet_blocks_0_self_attn_q"], {"ss_network_module": "networks.lora_wan"}, "Wan 2.1",
         "musubi-tuner Wan 2.1 LoRA (lora_unet_ names)"),
        (["lora_unet_double_blocks_0_img_attn_qkv"], {"ss_network_module": "networks.lora_flux"}, "Flux",
         "kohya sd-scripts Flux LoRA (lora_unet_ names)"),
        (["diffusion_model.blocks.0.self_attn.q"], {"software": json.dumps({"name": "ai-toolkit"})}, "Wan 2.2",
         "ai-toolkit Wan 2.2 LoRA (diffusion_model. names)"),
        (["transformer.transformer_blocks.0.attn.to_q"], {}, "Qwen-Image",
         "diffusers / SimpleTuner / ai-toolkit Qwen-Image LoRA (transformer. PEFT names)"),
        (["lora_transformer_layers_0_attention_to_q"], {}, "Z-Image", "OneTrainer Z-Image LoRA (lora_transformer_ names)"),
        (["layers.0.attention.to_q"], {}, "", "DiffSynth-Studio LoRA (bare module paths)"),
        (["lycoris_a", "lycoris_b", "lora_te1_c"], {}, "Flux",
         "SimpleTuner LyCORIS Flux LoRA (lycoris_ names; also lora_te names)"),
    ],
)  # fmt: skip
def test_layout_labels(names, metadata, family, label):
    assert layout_label(names, metadata, family) == label


def test_a_huge_header_value_is_not_searched():
    assert layout_label(["diffusion_model.x.y"], {"software": "ai-toolkit" + "x" * 5000}, "").startswith(
        "ai-toolkit / ComfyUI-style"
    )


def test_family_names():
    assert [family_name(c) for c in ("WAN21_T2V", "WAN22_T2V", "ZImage", "Flux2", "HunyuanVideo15", "SD15")] == [
        "Wan 2.1", "Wan 2.2", "Z-Image", "Flux.2", "HunyuanVideo 1.5", ""]  # fmt: skip


FLUX = DitBlocks({"double": 19, "single": 38})


def test_readable_dit_spec():
    bw = parse_dit_block_weights("double=0.5, single0-10=1, single11-37=0, base=0.2", FLUX)
    assert bw.weight_for("diffusion_model.double_blocks.18.img_attn.qkv.weight") == 0.5
    assert bw.weight_for("diffusion_model.single_blocks.10.linear1.weight") == 1.0
    assert bw.weight_for("diffusion_model.single_blocks.11.linear1.weight") == 0.0
    assert bw.weight_for("diffusion_model.img_in.weight") == 0.2
    # a block beats its group whatever the order
    assert parse_dit_block_weights("single3=2, single=0", FLUX).weight_for("single_blocks.3.linear2") == 2.0


def test_inspire_flux_vector_positions():
    values = [str(i) for i in range(58)]  # BASE=0, double k = 1+k, single k = 20+k
    bw = parse_dit_block_weights(",".join(values), FLUX)
    assert bw.weight_for("diffusion_model.txt_in.weight") == 0
    assert bw.weight_for("diffusion_model.double_blocks.0.img_mlp.0.weight") == 1
    assert bw.weight_for("diffusion_model.double_blocks.18.img_mlp.0.weight") == 19
    assert bw.weight_for("diffusion_model.single_blocks.37.linear2.weight") == 57
    assert parse_dit_block_weights("FLUX-TEST:" + ",".join(values), FLUX).blocks == bw.blocks


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("single38=1", "single38 is not a block of this model; its blocks are double0-18, single0-37"),
        ("single5-99999999=1", "is not a block of this model"),
        ("in=1", "names no block group of this model; its groups are double, single"),
        ("double=nan", "does not give a finite number"),
        ("double", "need 58 numbers"),
        ("1,2,3", "need 58 numbers (BASE, then double0-18, single0-37), got 3"),
        ("x" * 5000, "a block spec is at most"),
    ],
)
def test_bad_dit_specs_name_the_problem(spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_dit_block_weights(spec, FLUX)


def test_counts_from_model_keys():
    keys = [f"diffusion_model.blocks.{i}.self_attn.q.weight" for i in range(30)] + [
        "diffusion_model.head.head.weight"
    ]
    assert count_blocks(keys).counts == {"block": 30}
