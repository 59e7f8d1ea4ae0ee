"""Parsing tiny hand-made dicts: exact modules, exact unused keys, format labels."""

import pytest
import torch

from lora_foundry.lora_core.adapters import DiffAdapter, LohaAdapter, LokrAdapter, LoraAdapter, SetAdapter
from lora_foundry.lora_core.files.formats import parse_lora


def t(*shape):
    return torch.ones(*shape)


def test_kohya_lora_with_alpha_mid_and_stray_key():
    sd = {
        "lora_unet_a.lora_up.weight": t(4, 2),
        "lora_unet_a.lora_down.weight": t(2, 3),
        "lora_unet_a.alpha": torch.tensor(1.0),
        "lora_te_b.lora_up.weight": t(4, 2, 1, 1),
        "lora_te_b.lora_down.weight": t(2, 3, 1, 1),
        "lora_te_b.lora_mid.weight": t(2, 2, 3, 3),
        "lora_unet_orphan.alpha": torch.tensor(4.0),
        "something_else": t(1),
    }
    p = parse_lora(sd)
    assert set(p.modules) == {"lora_unet_a", "lora_te_b"}
    a = p.modules["lora_unet_a"]
    assert isinstance(a, LoraAdapter) and a.alpha == 1.0 and a.mid is None
    assert p.modules["lora_te_b"].mid is not None and p.modules["lora_te_b"].alpha is None
    assert set(p.unused_keys) == {"lora_unet_orphan.alpha", "something_else"}
    assert p.format == "kohya LoRA"


def test_diffusers_spellings_and_peft_prefix():
    sd = {
        "unet.x.attn1.to_q.lora_A.weight": t(2, 3),
        "unet.x.attn1.to_q.lora_B.weight": t(4, 2),
        "unet.x.attn1.processor.to_k_lora.up.weight": t(4, 2),
        "unet.x.attn1.processor.to_k_lora.down.weight": t(2, 3),
        "text_encoder.y.lora.up.weight": t(4, 2),
        "text_encoder.y.lora.down.weight": t(2, 3),
        "transformer.z.lora_linear_layer.up.weight": t(4, 2),
        "transformer.z.lora_linear_layer.down.weight": t(2, 3),
    }
    p = parse_lora(sd)
    assert set(p.modules) == {
        "unet.x.attn1.to_q",
        "unet.x.attn1.processor.to_k",
        "text_encoder.y",
        "transformer.z",
    }
    q = p.modules["unet.x.attn1.to_q"]
    assert q.up.shape == (4, 2) and q.down.shape == (2, 3)  # B is up, A is down
    assert p.unused_keys == () and p.format == "diffusers"
    peft = parse_lora(
        {"base_model.model.m.lora_A.weight": t(2, 3), "base_model.model.m.lora_B.weight": t(4, 2)}
    )
    assert set(peft.modules) == {"base_model.model.m"} and peft.format == "PEFT"


@pytest.mark.parametrize("suffix", ["", ".weight", ".default.weight"])
def test_peft_dora_magnitude_is_read_as_peft_dora(suffix):
    sd = {
        "base_model.model.m.lora_A.weight": t(2, 3),
        "base_model.model.m.lora_B.weight": t(4, 2),
        f"base_model.model.m.lora_magnitude_vector{suffix}": t(4),
    }
    p = parse_lora(sd)
    adapter = p.modules["base_model.model.m"]
    assert not p.unused_keys and not p.notes and p.format == "PEFT (DoRA)"
    assert adapter.dora_peft and adapter.dora_scale.shape == (4,)


def test_loha_lokr_and_mixed_label():
    sd = {
        "lora_unet_h.hada_w1_a": t(4, 2),
        "lora_unet_h.hada_w1_b": t(2, 3),
        "lora_unet_h.hada_w2_a": t(4, 2),
        "lora_unet_h.hada_w2_b": t(2, 3),
        "lora_unet_h.alpha": torch.tensor(2.0),
        "lora_unet_k.lokr_w1": t(2, 2),
        "lora_unet_k.lokr_w2_a": t(2, 1),
        "lora_unet_k.lokr_w2_b": t(1, 3),
        "lora_unet_k.alpha": torch.tensor(1.0),
        "lora_unet_k.dora_scale": t(4, 1),
        "lora_unet_l.lora_up.weight": t(4, 2),
        "lora_unet_l.lora_down.weight": t(2, 3),
    }
    p = parse_lora(sd)
    assert isinstance(p.modules["lora_unet_h"], LohaAdapter) and p.modules["lora_unet_h"].alpha == 2.0
    k = p.modules["lora_unet_k"]
    assert isinstance(k, LokrAdapter) and k.w1 is not None and k.dora_scale is not None
    assert p.unused_keys == ()
    assert p.format.startswith("mixed: ") and "LyCORIS LoHa" in p.format and "LyCORIS LoKr (DoRA)" in p.format


def test_comfy_trainer_file_with_bias_and_norm_diffs():
    sd = {
        "diffusion_model.a.lora_up.weight": t(4, 2),
        "diffusion_model.a.lora_down.weight": t(2, 3),
        "diffusion_model.a.alpha": torch.tensor(1.0),
        "diffusion_model.a.diff_b": t(4),
        "diffusion_model.norm.diff": t(4),
        "diffusion_model.norm.diff_b": t(4),
        "diffusion_model.s.set_weight": t(4),
    }
    p = parse_lora(sd)
    assert set(p.modules) == {"diffusion_model.a", "diffusion_model.norm", "diffusion_model.s"}
    assert isinstance(p.modules["diffusion_model.norm"], DiffAdapter)
    assert isinstance(p.modules["diffusion_model.s"], SetAdapter)
    assert set(p.bias_diffs) == {"diffusion_model.a", "diffusion_model.norm"}
    assert p.unused_keys == ()
    assert p.format.startswith("mixed: ComfyUI trainer")


def test_incomplete_pairs_and_unknown_keys_are_unused():
    sd = {
        "lora_unet_a.lora_up.weight": t(4, 2),
        "lora_unet_b.lora_A.weight": t(2, 3),
        "lora_unet_c.hada_w1_a": t(4, 2),
        "lora_unet_d.reshape_weight": torch.tensor([4, 3]),
    }
    p = parse_lora(sd)
    assert p.modules == {}
    assert p.unused_keys == tuple(sd)
    assert p.format == "unrecognised"
    assert len(p.notes) == 1 and p.notes[0].startswith(
        "3 modules have an incomplete set of weights (e.g. lora_unet_a: lora_unet_a.lora_up.weight)"
    )
