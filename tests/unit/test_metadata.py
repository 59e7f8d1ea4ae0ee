"""Header metadata: trigger words, rank/alpha and training info; malformed JSON never raises."""

import json

import pytest
import torch

from lora_foundry.lora_core.adapters import LoraAdapter
from lora_foundry.lora_core.files.metadata import (
    adapter_config_alphas,
    describe,
    diffusers_alphas,
    tag_frequency,
    trigger_words,
)

FREQ = json.dumps({"10_alice": {"alice": 20, " red hair": 12, "smile": 3}, "5_bg": {"smile": 15, "1girl": 2}})


def test_triggers_phrase_first_then_most_frequent_tags():
    meta = {"ss_tag_frequency": FREQ, "modelspec.trigger_phrase": "alicestyle, Alice"}
    assert trigger_words(meta) == ["alicestyle", "Alice", "smile", "red hair", "1girl"]
    assert trigger_words(meta, limit=2) == ["alicestyle", "Alice"]
    assert tag_frequency(meta)["smile"] == 18


@pytest.mark.parametrize(
    "bad",
    [
        "{not json",
        "[1, 2]",
        json.dumps({"d": [1, 2]}),
        json.dumps({"d": {"t": "x", "": 3, "u": True}}),
        "null",
    ],
)
def test_malformed_tag_frequency_gives_no_triggers(bad):
    assert trigger_words({"ss_tag_frequency": bad}) == []
    assert describe({"ss_tag_frequency": bad, "ss_network_dim": "oops"}).rank is None


def test_describe_prefers_module_ranks_and_alphas():
    mods = {
        "a": LoraAdapter(up=torch.zeros(4, 8), down=torch.zeros(8, 3), alpha=4.0),
        "b": LoraAdapter(up=torch.zeros(4, 8), down=torch.zeros(8, 3), alpha=4.0),
        "c": LoraAdapter(up=torch.zeros(4, 2), down=torch.zeros(2, 3), alpha=1.0),
    }
    meta = {
        "ss_output_name": "alice_v2",
        "ss_network_dim": "32",
        "ss_network_alpha": "16",
        "ss_network_module": "networks.lora",
        "ss_learning_rate": "0.0001",
        "ss_max_train_steps": "1500",
        "ss_resolution": "(512, 512)",
        "ss_optimizer": "None",
    }
    info = describe(meta, mods)
    assert (info.name, info.rank, info.alpha) == ("alice_v2", 8, 4.0)
    assert info.training == {
        "network_module": "networks.lora",
        "learning_rate": "0.0001",
        "max_train_steps": "1500",
        "resolution": "(512, 512)",
    }
    header_only = describe(meta)
    assert (header_only.rank, header_only.alpha) == (32, 16.0)


def test_diffusers_header_alphas_follow_peft_config():
    header = {
        "unet.lora_alpha": 8,
        # "[" is syntax beyond the subset the pack reads (lora_core.files.peft_patterns): not run, noted
        "unet.alpha_pattern": {"to_v": 2, "mid_block.*to_q": 6, "[": 1},
        "text_encoder.lora_alpha": 16,
        "text_encoder.use_rslora": True,
    }
    ranks = {
        "unet.down.attn1.to_q": 4,
        "unet.down.attn1.to_v": 4,
        "unet.mid_block.attn1.to_q": 4,
        "unet.down.attn1.not_to_v_x": 4,
        "text_encoder.layers.0.q_proj": 16,
        "transformer.x": 4,  # no config for this component
        "unet": 4,  # no path
    }
    read = diffusers_alphas({"lora_adapter_metadata": json.dumps(header)}, ranks)
    assert read.alphas == {
        "unet.down.attn1.to_q": 8.0,
        "unet.down.attn1.to_v": 2.0,
        "unet.mid_block.attn1.to_q": 6.0,
        "unet.down.attn1.not_to_v_x": 8.0,
        "text_encoder.layers.0.q_proj": 64.0,  # rsLoRA: 16 / sqrt(16) = 64 / 16
    }
    assert len(read.notes) == 1 and "unet alpha_pattern key '['" in read.notes[0]


@pytest.mark.parametrize("raw", [None, "", "{not json", "[1, 2]", json.dumps({"unet.lora_alpha": "x"})])
def test_diffusers_header_alphas_ignore_what_they_cannot_read(raw):
    metadata = {} if raw is None else {"lora_adapter_metadata": raw}
    assert diffusers_alphas(metadata, {"unet.a.to_q": 4}).alphas == {}


def test_adapter_config_alphas_name_the_raw_peft_modules():
    config = json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "alpha_pattern": {"to_v": 2}})
    ranks = {"base_model.model.a.to_q": 4, "base_model.model.a.to_v": 4, "unet.a.to_q": 4}
    assert adapter_config_alphas(config, ranks).alphas == {
        "base_model.model.a.to_q": 8.0,
        "base_model.model.a.to_v": 2.0,
    }
    assert adapter_config_alphas(json.dumps({"peft_type": "OFT", "lora_alpha": 8}), ranks).alphas == {}
    assert adapter_config_alphas("{broken", ranks).alphas == {}
