"""Kohya names chosen for merged files: what kohya's own trainers write for each weight."""

from lora_foundry.lora_core.apply.keymap import kohya_names

L_KEY = "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
G_KEY = "clip_g.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
U_KEY = "diffusion_model.input_blocks.1.1.proj_in.weight"


def test_sdxl_text_encoders_get_te1_and_te2():
    key_map = {  # ComfyUI names clip_l both lora_te_ and lora_te1_ when clip_g is present
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": L_KEY,
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": L_KEY,
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": G_KEY,
    }
    names = kohya_names(key_map)
    assert names[L_KEY].startswith("lora_te1_") and names[G_KEY].startswith("lora_te2_")


def test_single_text_encoder_gets_te_and_unet_prefers_diffusers_paths():
    key_map = {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": L_KEY,
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": L_KEY,
        "lora_unet_input_blocks_1_1_proj_in": U_KEY,
        "lora_unet_down_blocks_0_attentions_0_proj_in": U_KEY,
        "unet.down_blocks.0.attentions.0.proj_in": U_KEY,
    }
    names = kohya_names(key_map)
    assert names == {L_KEY: "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
                     U_KEY: "lora_unet_down_blocks_0_attentions_0_proj_in"}  # fmt: skip


def test_sdxl_unet_gets_the_sgm_paths_kohya_trains_it_on():
    key_map = {
        "lora_unet_down_blocks_0_attentions_0_proj_in": U_KEY,
        "lora_unet_input_blocks_1_1_proj_in": U_KEY,
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": L_KEY,
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": L_KEY,
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": G_KEY,
    }
    names = kohya_names(key_map, sgm_unet=True)
    assert names[U_KEY] == "lora_unet_input_blocks_1_1_proj_in"
    assert names[L_KEY].startswith("lora_te1_text_model") and names[G_KEY].startswith("lora_te2_text_model")
    assert kohya_names(key_map)[U_KEY] == "lora_unet_down_blocks_0_attentions_0_proj_in"
