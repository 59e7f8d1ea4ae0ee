"""Resolving module names: a hand-made key map in ComfyUI's spellings (see comfy/lora.py)."""

from lora_foundry.lora_core.apply.keymap import resolve, summarize_unmatched

Q = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
OUT = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight"
TE = "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
TE2 = "clip_g.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
DIFF = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
KEY_MAP = {
    # what model_lora_keys_unet writes for one diffusers weight (to_q and to_out.0)
    f"lora_unet_{DIFF.replace('.', '_')}_to_q": Q,
    f"{DIFF}.processor.to_q": Q,
    f"unet.{DIFF}.processor.to_q": Q,
    f"lora_unet_{DIFF.replace('.', '_')}_to_out_0": OUT,
    f"unet.{DIFF}.processor.to_out": OUT,
    "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q": Q,
    "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q": Q,
    # what model_lora_keys_clip writes (SDXL: te1 = clip_l, te2 = clip_g)
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": TE,
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": TE,
    "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": TE2,
    "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj": TE2,
    "flux_linear1_qkv": ("diffusion_model.x.weight", (0, 0, 9)),
}


def test_as_is_and_opaque_tuple_targets():
    names = ["lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q", "flux_linear1_qkv"]
    res = resolve(names, KEY_MAP)
    assert res.matched == {names[0]: Q, names[1]: ("diffusion_model.x.weight", (0, 0, 9))}
    assert res.unmatched == ()


def test_peft_unet_names_resolve():
    names = [f"base_model.model.{DIFF}.to_q", f"base_model.model.{DIFF}.to_out.0"]
    assert resolve(names, KEY_MAP).matched == {names[0]: Q, names[1]: OUT}


def test_new_and_old_diffusers_spellings():
    names = [f"unet.{DIFF}.to_q", f"unet.{DIFF}.to_out.0", f"unet.{DIFF}.processor.to_out"]
    assert resolve(names, KEY_MAP).matched == {names[0]: Q, names[1]: OUT, names[2]: OUT}


def test_text_encoders_and_peft_text_encoder():
    names = {
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": TE,
        "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj": TE2,
        "base_model.model.text_model.encoder.layers.0.self_attn.q_proj": TE,
    }
    assert resolve(dict.fromkeys(names), KEY_MAP).matched == names


def test_comfy_trainer_and_lycoris_spellings():
    names = [
        "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q",
        f"lycoris_{DIFF.replace('.', '_')}_to_q",
    ]
    assert resolve(names, KEY_MAP).matched == dict.fromkeys(names, Q)


def test_unmatched_are_returned_in_order():
    res = resolve(["lora_unet_nope", f"base_model.model.{DIFF}.to_q", "text_encoder.nope"], KEY_MAP)
    assert res.unmatched == ("lora_unet_nope", "text_encoder.nope")


def test_summary_collapses_by_prefix():
    names = [f"lora_unet_up_blocks_{i}_attentions_{j}_proj" for i in range(3) for j in range(8)]
    names += ["lora_te_text_model_encoder_layers_3_mlp_fc1", "lora_unet_conv_in"]
    assert summarize_unmatched(names) == [
        "lora_unet_up_blocks_* (24 modules)",
        "lora_te_text_model_encoder_layers_3_mlp_fc1",
        "lora_unet_conv_in",
    ]
    many = [f"g{i}.0.x" for i in range(12)]
    lines = summarize_unmatched(many, max_lines=3)
    assert len(lines) == 4 and lines[-1] == "... and 9 more modules in 9 other groups"
