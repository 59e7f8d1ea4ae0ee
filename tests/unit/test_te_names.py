"""Text-encoder names transformers 5 writes (no ``text_model`` level), against a hand-made key map
in ComfyUI's spellings (comfy/lora.py model_lora_keys_clip) for SD1.x and SDXL."""

import pytest
import torch

from lora_foundry.lora_core.apply.keymap import resolve
from lora_foundry.lora_core.apply.loader import LoadedLora, plan_lora
from lora_foundry.lora_core.apply.te_names import kohya_te4_name, naming_note, te4_name
from lora_foundry.lora_core.files.detect import FamilyGuess
from lora_foundry.lora_core.files.formats import parse_lora

L = "clip_l.transformer.text_model.encoder.layers.{}.{}.weight"
G = "clip_g.transformer.text_model.encoder.layers.{}.{}.weight"
PROJS = {"self_attn.q_proj": "self_attn_q_proj", "mlp.fc2": "mlp_fc2"}


def sdxl_key_map() -> dict[str, str]:
    """What model_lora_keys_clip writes for an SDXL CLIP (clip_l + clip_g), for layers 0 and 1."""
    km = {}
    for b in range(2):
        for dotted, kohya in PROJS.items():
            km[f"lora_te_text_model_encoder_layers_{b}_{kohya}"] = L.format(b, dotted)
            km[f"lora_te1_text_model_encoder_layers_{b}_{kohya}"] = L.format(b, dotted)
            km[f"text_encoder.text_model.encoder.layers.{b}.{dotted}"] = L.format(b, dotted)
            km[f"lora_te2_text_model_encoder_layers_{b}_{kohya}"] = G.format(b, dotted)
            km[f"text_encoder_2.text_model.encoder.layers.{b}.{dotted}"] = G.format(b, dotted)
            km[f"text_encoders.clip_l.transformer.text_model.encoder.layers.{b}.{dotted}"] = L.format(
                b, dotted
            )
    # OneTrainer's T5 names (Flux: clip_l + t5, where lora_te2_ is the T5); never rewritten
    km["lora_te2_encoder_block_0_layer_0_SelfAttention_q"] = (
        "t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight"
    )
    return km


@pytest.mark.parametrize(
    ("flat", "te4", "target"),
    [
        ("text_encoder.encoder.layers.1.mlp.fc2", "text_encoder.text_model.encoder.layers.1.mlp.fc2", L.format(1, "mlp.fc2")),
        ("text_encoder_2.encoder.layers.0.self_attn.q_proj", "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj", G.format(0, "self_attn.q_proj")),
        ("base_model.model.encoder.layers.0.self_attn.q_proj", "base_model.model.text_model.encoder.layers.0.self_attn.q_proj", L.format(0, "self_attn.q_proj")),
        ("lora_te_encoder_layers_1_self_attn_q_proj", "lora_te_text_model_encoder_layers_1_self_attn_q_proj", L.format(1, "self_attn.q_proj")),
        ("lora_te1_encoder_layers_0_mlp_fc2", "lora_te1_text_model_encoder_layers_0_mlp_fc2", L.format(0, "mlp.fc2")),
        ("lora_te2_encoder_layers_1_mlp_fc2", "lora_te2_text_model_encoder_layers_1_mlp_fc2", G.format(1, "mlp.fc2")),
    ],
)  # fmt: skip
def test_flat_name_resolves_to_the_target_of_its_transformers4_spelling(flat, te4, target):
    km = sdxl_key_map()
    assert te4_name(flat) == te4
    res = resolve([flat, te4], km)  # the 4.x spelling is what ComfyUI's key map knows
    assert res.matched == {flat: target, te4: target}
    assert res.transformers5 == (flat,)  # only the flat one was read through its 4.x spelling


@pytest.mark.parametrize(
    "name",
    [
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",  # already 4.x
        "lora_te1_text_model_encoder_layers_0_mlp_fc2",
        "lora_te2_encoder_block_0_layer_0_SelfAttention_q",  # T5 (encoder.block), never CLIP
        "text_encoder_3.encoder.block.0.layer.0.SelfAttention.q",
        "unet.encoder.layers.0.to_q",  # not a text encoder component
        "lora_unet_encoder_layers_0_proj",
        "transformer.encoder.layers.0.self_attn.q_proj",
    ],
)
def test_other_names_are_not_rewritten(name):
    assert te4_name(name) is None
    assert kohya_te4_name(name) == name


def test_t5_onetrainer_name_still_matches_itself():
    name = "lora_te2_encoder_block_0_layer_0_SelfAttention_q"
    res = resolve([name], sdxl_key_map())
    assert res.matched == {name: "t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight"}
    assert res.transformers5 == ()


def test_kohya_te4_name_only_rewrites_kohya_names():
    assert (
        kohya_te4_name("lora_te1_encoder_layers_3_mlp_fc1") == "lora_te1_text_model_encoder_layers_3_mlp_fc1"
    )
    assert kohya_te4_name("text_encoder.encoder.layers.3.mlp.fc1") == "text_encoder.encoder.layers.3.mlp.fc1"


def test_a_flat_name_for_a_layer_the_model_lacks_stays_unmatched():
    res = resolve(["text_encoder.encoder.layers.7.mlp.fc2"], sdxl_key_map())
    assert res.unmatched == ("text_encoder.encoder.layers.7.mlp.fc2",) and res.transformers5 == ()


def test_report_names_the_naming_it_read():
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for b in range(2):
        tensors[f"text_encoder.encoder.layers.{b}.mlp.fc2.lora_A.weight"] = torch.randn(2, 8, generator=g)
        tensors[f"text_encoder.encoder.layers.{b}.mlp.fc2.lora_B.weight"] = torch.randn(8, 2, generator=g)
    tensors["text_encoder_2.text_model.encoder.layers.0.mlp.fc2.lora_A.weight"] = torch.randn(
        2, 8, generator=g
    )
    tensors["text_encoder_2.text_model.encoder.layers.0.mlp.fc2.lora_B.weight"] = torch.randn(
        8, 2, generator=g
    )
    unknown = FamilyGuess("unknown", "test")
    lora = LoadedLora(
        path="x.safetensors", parsed=parse_lora(tensors), metadata={}, family=unknown, triggers=()
    )
    plan = plan_lora(lora, {"clip": sdxl_key_map()}, {"clip": 1.0}, unknown)
    assert plan.report.matched == {"clip": 3} and not plan.report.unmatched
    notes = [n for n in plan.report.notes if "transformers 5" in n]
    assert notes == list(
        naming_note(["text_encoder.encoder.layers.0.mlp.fc2", "text_encoder.encoder.layers.1.mlp.fc2"])
    )
    assert notes[0].startswith("2 text-encoder modules")
    assert "transformers 5" in plan.report.text()


def test_no_note_for_transformers4_names():
    assert naming_note([]) == ()
