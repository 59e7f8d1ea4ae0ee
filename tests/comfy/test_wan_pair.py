"""Wan 2.2 LoRA Pair on two tiny Wan experts: each side gets its own LoRA (or stack) at its own strength,
exactly as one Load LoRA per model would; a swapped pair, one model on both sides or a non-Wan model is
refused with the node's name; bypass mode works on both sides through a sampler step."""

from __future__ import annotations

import shutil

import comfy.model_management
import model_factory
import pytest
import torch
from patch_compare import assert_same, patched
from sampling import assert_close, sample, wan_conds
from wan_loras import write_pair

from lora_foundry.nodes.load_lora import LoadLoraModelOnly
from lora_foundry.nodes.lora_apply import BYPASS
from lora_foundry.nodes.stack import LoraStack
from lora_foundry.nodes.wan_pair import WanLoraPair

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def experts():
    """Two tiny Wan models standing for the high-noise and the low-noise expert (different weights)."""
    return model_factory.wan_model(seed=0), model_factory.wan_model(seed=1)


@pytest.fixture(scope="module")
def pair(experts, loras_dir):
    """Files told apart by name and by musubi-tuner's timestep range, and by name only."""
    return {
        "meta": write_pair(loras_dir, experts[0], "wanstyle", seed=30, ranges=("875,1000", "0,875")),
        "name": write_pair(loras_dir, experts[0], "wanchar", seed=40),
    }


def run(experts, high, sh, low, sl, **kw):
    return WanLoraPair().execute(experts[0], experts[1], high, sh, low, sl, **kw)["result"]


def test_each_expert_gets_its_own_lora_and_strength(experts, pair):
    high, low = pair["meta"]
    mh, ml, report = run(experts, high, 0.8, low, 0.3)
    assert_same(patched(mh), patched(LoadLoraModelOnly().execute(experts[0], high, 0.8)["result"][0]))
    assert_same(patched(ml), patched(LoadLoraModelOnly().execute(experts[1], low, 0.3)["result"][0]))
    assert f"{high}: high-noise (trained on timesteps 875-1000)" in report, report
    assert f"{low}: low-noise (trained on timesteps 0-875)" in report, report


def test_stacks_join_each_side(experts, pair):
    (high, low), (high2, low2) = pair["meta"], pair["name"]
    (stack_high,) = LoraStack().execute(lora_1=high2, strength_model_1=-0.5)
    (stack_low,) = LoraStack().execute(lora_1=low2, strength_model_1=0.7)
    mh, ml, report = run(experts, high, 0.8, low, 0.3, stack_high=stack_high, stack_low=stack_low)
    chain_h = LoadLoraModelOnly().execute(
        LoadLoraModelOnly().execute(experts[0], high, 0.8)["result"][0], high2, -0.5
    )
    chain_l = LoadLoraModelOnly().execute(
        LoadLoraModelOnly().execute(experts[1], low, 0.3)["result"][0], low2, 0.7
    )
    assert_same(patched(mh), patched(chain_h["result"][0]))
    assert_same(patched(ml), patched(chain_l["result"][0]))
    assert f"{high2}: high-noise (its name says 'high')" in report, report


@pytest.mark.parametrize("by", ["meta", "name"])
def test_a_swapped_pair_is_refused(experts, pair, by):
    high, low = pair[by]
    with pytest.raises(RuntimeError) as err:
        run(experts, low, 1.0, high, 1.0)
    text = str(err.value)
    assert (
        text.startswith("[Wan 2.2 LoRA Pair] lora_high / stack_high:") and low in text and "swapped" in text
    )


def test_metadata_outranks_the_name(experts, pair, loras_dir):
    """A high-noise file renamed 'low' is still read as high-noise from its header, and refused on the low side."""
    shutil.copy(loras_dir / pair["meta"][0], loras_dir / "renamed_low.safetensors")
    with pytest.raises(
        RuntimeError, match=r"renamed_low.safetensors is a high-noise LoRA \(trained on timesteps"
    ):
        run(experts, "None", 1.0, "renamed_low.safetensors", 1.0)


def test_wrong_models_are_refused(experts, pair, sd15):
    high, low = pair["meta"]
    with pytest.raises(
        RuntimeError, match=r"\[Wan 2.2 LoRA Pair\] model_high and model_low are the same model"
    ):
        WanLoraPair().execute(experts[0], experts[0].clone(), high, 1.0, low, 1.0)
    with pytest.raises(RuntimeError, match=r"\[Wan 2.2 LoRA Pair\] model_low is a SD15 model, not Wan"):
        WanLoraPair().execute(experts[0], sd15.model, high, 1.0, low, 1.0)


def test_bypass_mode_on_both_experts_equals_patch_mode(experts, pair):
    high, low = pair["meta"]
    comfy.model_management.unload_all_models()
    conds = wan_conds()
    bh, bl, report = run(experts, high, 0.8, low, 0.6, apply_mode=BYPASS)
    ph, pl, _ = run(experts, high, 0.8, low, 0.6)
    assert not bh.patches and not bl.patches and "on activations" in report
    for got, expected, base, what in ((bh, ph, experts[0], "high"), (bl, pl, experts[1], "low")):
        with torch.no_grad():
            assert_close(sample(got, *conds), sample(expected, *conds), sample(base, *conds), what)
