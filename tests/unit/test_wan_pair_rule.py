"""lora_core.apply.wan_pair: which Wan 2.2 expert a LoRA file is for, from its trained timestep range
(musubi-tuner's modelspec.timestep_range, ss_min/max_timestep) or its name; bad headers ignored."""

from __future__ import annotations

import pytest

from lora_foundry.lora_core.apply.wan_pair import HIGH, LOW, UNKNOWN, check_side, noise_side, trained_range


@pytest.mark.parametrize(
    "metadata, side",
    [
        ({"modelspec.timestep_range": "875,1000"}, HIGH),  # musubi-tuner's Wan 2.2 t2v guide, high-noise
        ({"modelspec.timestep_range": "900,1000"}, HIGH),  # i2v
        ({"modelspec.timestep_range": "0,875"}, LOW),
        ({"modelspec.timestep_range": "0,900"}, LOW),
        ({"ss_min_timestep": "875", "ss_max_timestep": "1000"}, HIGH),
        ({"ss_min_timestep": "0", "ss_max_timestep": "850"}, LOW),
        ({"modelspec.timestep_range": "0,1000"}, UNKNOWN),  # every timestep: fits either expert
        ({"modelspec.timestep_range": "850,900"}, UNKNOWN),  # inside the boundary region: says nothing
    ],
)
def test_trained_timesteps(metadata, side):
    assert noise_side("lora.safetensors", metadata).side == side


@pytest.mark.parametrize(
    "name, side",
    [
        ("wan22_style_high_noise.safetensors", HIGH),
        ("styleHighNoise_v2.safetensors", HIGH),
        ("style_HN.safetensors", HIGH),
        ("my-lora-high.safetensors", HIGH),
        ("wan2.2_t2v_low_noise_style.safetensors", LOW),
        ("styleLowNoise.safetensors", LOW),
        ("style_LN_e10.safetensors", LOW),
        ("highlights_below.safetensors", UNKNOWN),  # words containing 'high' / 'low' are not the words
        ("high_and_low.safetensors", UNKNOWN),
        ("style.safetensors", UNKNOWN),
    ],
)
def test_file_names(name, side):
    assert noise_side(name, {}).side == side


def test_metadata_outranks_the_name():
    found = noise_side("style_high_noise.safetensors", {"modelspec.timestep_range": "0,875"})
    assert found.side == LOW and "timesteps 0-875" in found.evidence


@pytest.mark.parametrize(
    "metadata",
    [
        {"modelspec.timestep_range": "nan,1000"},
        {"modelspec.timestep_range": "1000,0"},
        {"modelspec.timestep_range": "875,1000,3"},
        {"modelspec.timestep_range": "875" + "0" * 100 + ",1000"},
        {"ss_min_timestep": "-5", "ss_max_timestep": "1000"},
        {"ss_min_timestep": "875"},
        {"modelspec.timestep_range": 875},
    ],
)
def test_nonsense_headers_say_nothing(metadata):
    assert trained_range(metadata) is None
    assert noise_side("style_low.safetensors", metadata).side == LOW  # the name still counts


def test_check_side_refuses_the_other_expert_and_reports_the_rest():
    lines = check_side("lora_high", HIGH, [("a_high.safetensors", {}), ("plain.safetensors", {})])
    assert lines == ["a_high.safetensors: high-noise (its name says 'high')",
                     "plain.safetensors: unknown (neither its metadata nor its name tells)"]  # fmt: skip
    with pytest.raises(ValueError) as err:
        check_side("lora_high", HIGH, [("b_low_noise.safetensors", {})])
    text = str(err.value)
    assert text.startswith("lora_high: b_low_noise.safetensors is a low-noise LoRA") and "swapped" in text
