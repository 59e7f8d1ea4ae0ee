"""Block-weight specs: vectors, presets and the readable form, and which block a key belongs to."""

import pytest

from lora_foundry.lora_core.apply.block_weights import block_of, block_weight_for, parse_block_weights

SD_VEC = "1,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0,1.1,1.2,1.3,1.4,1.5,1.6"


@pytest.mark.parametrize(
    "key, block",
    [
        ("diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight", ("IN", 4)),
        ("diffusion_model.middle_block.1.proj_in.weight", ("MID", 1)),
        ("diffusion_model.output_blocks.11.1.proj_out.weight", ("OUT", 11)),
        ("lora_unet_output_blocks_3_1_transformer_blocks_0_attn2_to_k", ("OUT", 3)),
        ("lora_unet_down_blocks_1_attentions_0_proj_in", ("IN", 4)),
        ("unet.up_blocks.1.attentions.2.proj_out", ("OUT", 5)),
        ("lora_unet_down_blocks_0_downsamplers_0_conv", ("IN", 3)),
        ("lora_unet_mid_block_attentions_0_proj_in", ("MID", 1)),
        ("lora_unet_mid_block_resnets_1_conv1", ("MID", 2)),
        ("clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight", "BASE"),
        ("lora_te1_text_model_encoder_layers_0_mlp_fc1", "BASE"),
        ("diffusion_model.time_embed.0.weight", "BASE"),
    ],
)
def test_block_of(key, block):
    assert block_of(key) == block


def test_sd_vector_positions():
    bw = parse_block_weights(SD_VEC, "SD1.x")
    expect = {
        "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": 1.0,
        "diffusion_model.input_blocks.1.1.proj_in.weight": 0.1,
        "diffusion_model.input_blocks.8.1.proj_in.weight": 0.6,
        "diffusion_model.middle_block.1.proj_in.weight": 0.7,
        "diffusion_model.middle_block.0.in_layers.2.weight": 0.7,
        "diffusion_model.output_blocks.3.1.proj_in.weight": 0.8,
        "diffusion_model.output_blocks.11.1.proj_in.weight": 1.6,
        "diffusion_model.input_blocks.3.0.op.weight": 1.0,  # not in the 17-number layout: default
    }
    assert {k: bw.weight_for(k) for k in expect} == pytest.approx(expect)


def test_sdxl_vector_and_presets():
    bw = parse_block_weights("1,0,0,0,0,1,0,0,0,0,0,0", "SDXL")
    assert bw.weight_for("diffusion_model.middle_block.1.proj_in.weight") == 1.0
    assert bw.weight_for("diffusion_model.input_blocks.4.1.proj_in.weight") == 0.0
    assert bw.weight_for("diffusion_model.output_blocks.5.1.proj_in.weight") == 0.0
    out = parse_block_weights("OUTALL", "SDXL")
    assert out.weight_for("diffusion_model.output_blocks.0.1.proj_in.weight") == 1.0
    assert out.weight_for("diffusion_model.input_blocks.7.1.proj_in.weight") == 0.0
    ins = parse_block_weights("SD-INS")
    assert [ins.weight_for(f"diffusion_model.input_blocks.{i}.1.x") for i in (1, 2, 4, 5)] == [1, 1, 1, 0]
    assert parse_block_weights("SD-ALL0.5").weight_for("lora_te_x") == 0.5
    assert (
        parse_block_weights("MIDD:1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0").weight_for(
            "lora_unet_output_blocks_6_1_x"
        )
        == 1
    )


def test_lycoris_layout_covers_every_block():
    vec = ",".join(str(i) for i in range(27))
    bw = parse_block_weights(vec, "SD1.x")
    assert bw.weight_for("diffusion_model.input_blocks.3.0.op.weight") == 3
    assert bw.weight_for("diffusion_model.middle_block.2.out_layers.3.weight") == 14
    assert bw.weight_for("diffusion_model.output_blocks.0.0.out_layers.3.weight") == 15


def test_readable_form():
    spec = "in=0.5, mid=1, out=0.8, IN04=0.2, base=0, default=0.3"
    assert block_weight_for("diffusion_model.input_blocks.4.1.x.weight", spec) == 0.2
    assert block_weight_for("diffusion_model.input_blocks.5.1.x.weight", spec) == 0.5
    assert block_weight_for("lora_unet_middle_block_1_proj_in", spec) == 1.0
    assert block_weight_for("unet.up_blocks.0.attentions.0.proj_in", spec) == 0.8
    assert block_weight_for("lora_te_text_model_encoder_layers_0_mlp_fc1", spec) == 0.0
    assert block_weight_for("diffusion_model.output_blocks.2.x", "%IN04=0") == 1.0  # unnamed: default


@pytest.mark.parametrize(
    "spec, family, message",
    [
        ("1,0,0,0,0", "SD1.x", "SD1.x block weights need 17 or 27 numbers .* got 5: 1,0,0,0,0"),
        ("1,0,0,0,0", None, "need 17 or 12 or 27 or 21 numbers"),
        ("1,1,1,1,1,1,1,1,1,1,1,1", "SD1.x", "got 12"),
        ("A,1,1,1,1,1,1,1,1,1,1,1", "SDXL", "'A' is not a number.*not supported"),
        ("MIDD", "SDXL", "unknown preset 'MIDD'.*SDXL-ALL"),
        ("in=abc", None, "cannot read 'in=abc'"),
        ("in4=0.5", None, "two digits"),
        ("", None, "empty spec"),
        ("ALL", "Flux", "this model is Flux"),
    ],
)
def test_malformed_specs(spec, family, message):
    with pytest.raises(ValueError, match=message):
        parse_block_weights(spec, family)
