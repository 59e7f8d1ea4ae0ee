"""Hostile LoRA files (issue #14), at plan time: changes beyond what the model's weights hold are
named in the report, the parse cache stays within its byte budget, and every module's shape is
checked before a patch allocates anything."""

import pytest
import torch
from hostile_lora import kohya, write

from lora_foundry.lora_core.apply import loader
from lora_foundry.lora_core.apply.loader import LoraMismatchError, cache_budget_bytes, plan_lora
from lora_foundry.lora_core.apply.patching import Term, apply_terms
from lora_foundry.lora_core.files.detect import FamilyGuess

UNKNOWN = FamilyGuess("unknown", "test")


# --- 6. changes beyond what the model's weights hold -----------------------------------------


def plan(lora, dtype=None, strength=1.0, shape=(4, 3), target="diffusion_model.a.weight"):
    key_maps = {"unet": {"lora_unet_a": target}}
    shapes = {"unet": {"diffusion_model.a.weight": shape}}
    return plan_lora(lora, key_maps, {"unet": strength}, UNKNOWN, "", shapes, {"unet": dtype})


def test_fp16_factors_of_60000_are_named_in_the_report(tmp_path):
    sd = kohya(rank=2, dtype=torch.float16, value=60000.0)
    p = write(tmp_path / "hot.safetensors", sd)
    report = plan(loader._load(str(p)), torch.float16).report.text()
    peak = (sd["lora_unet_a.lora_up.weight"].float() @ sd["lora_unet_a.lora_down.weight"].float()).abs().max()
    assert f"lora_unet_a by up to {float(peak):.3g}" in report and "65504" in report
    patched = apply_terms(
        [Term(loader._load(str(p)).parsed.modules["lora_unet_a"], 1.0)], torch.zeros(4, 3).half()
    )
    assert not torch.isfinite(patched).all()  # what the note warns of: the fp16 weight overflows


def test_limit_follows_the_dtype_and_the_strength(tmp_path):
    p = write(tmp_path / "warm.safetensors", kohya(rank=1, value=20.0))  # change 400 per entry
    lora = loader._load(str(p))
    assert "overflow" not in plan(lora, torch.float16).report.text()
    assert "float8_e4m3fn weights hold at most 448" in plan(lora, torch.float8_e4m3fn, 1.2).report.text()
    assert "overflow" not in plan(lora, torch.float8_e4m3fn, 1.0).report.text()
    assert "by up to 8e+04" in plan(lora, None, 200.0).report.text()


def test_the_cheap_bound_is_checked_exactly_before_a_module_is_named(tmp_path):
    # Row and column norms bound the change by 2 * 1e5 * 1e5, but the product is exactly zero.
    sd = {
        "lora_unet_a.lora_up.weight": torch.tensor([[1e5, 1e5]] * 4),
        "lora_unet_a.lora_down.weight": torch.tensor([[1e5, 1e5, 1e5], [-1e5, -1e5, -1e5]]),
    }
    lora = loader._load(str(write(tmp_path / "cancel.safetensors", sd)))
    assert "overflow" not in plan(lora, torch.float16).report.text()


# --- 7. the parse cache is bounded in bytes --------------------------------------------------


def test_cache_keeps_within_its_byte_budget(tmp_path):
    files = [write(tmp_path / f"c{i}.safetensors", kohya(out=64, inp=64, rank=4)) for i in range(3)]
    size = sum(t.numel() * t.element_size() for t in kohya(out=64, inp=64, rank=4).values())
    cache = loader._LoraCache(max_entries=16, max_bytes=2 * size + 10)
    for f in files:
        cache.get(str(f))
    assert cache.reads == 3 and cache.nbytes == 2 * size  # the oldest was dropped
    cache.get(str(files[2]))
    assert cache.reads == 3
    cache.get(str(files[0]))
    assert cache.reads == 4


def test_a_file_over_the_budget_is_not_cached(tmp_path):
    f = write(tmp_path / "big.safetensors", kohya(out=64, inp=64, rank=4))
    cache = loader._LoraCache(max_bytes=1000)
    cache.get(str(f))
    cache.get(str(f))
    assert cache.reads == 2 and cache.nbytes == 0


def test_cache_budget_from_the_environment():
    assert cache_budget_bytes({}) == 1024 * 2**20
    assert cache_budget_bytes({"LORA_FOUNDRY_PARSE_CACHE_MB": "1.5"}) == int(1.5 * 2**20)
    assert cache_budget_bytes({"LORA_FOUNDRY_PARSE_CACHE_MB": "0"}) == 0
    for bad in ("lots", "-3", "nan"):
        assert cache_budget_bytes({"LORA_FOUNDRY_PARSE_CACHE_MB": bad}) == 1024 * 2**20


# --- shapes: every module is checked before a patch allocates anything -------------------------


def test_fused_slice_targets_are_shape_checked(tmp_path):
    lora = loader._load(str(write(tmp_path / "slice.safetensors", kohya(out=5))))
    target = ("diffusion_model.qkv.weight", (0, 4, 4))
    key_maps = {"unet": {"lora_unet_a": target}}
    shapes = {"unet": {"diffusion_model.qkv.weight": (12, 3)}}
    # old code: not checked (slices were left to ComfyUI), failing later inside sampling
    with pytest.raises(
        LoraMismatchError, match=r"lora_unet_a does not fit diffusion_model\.qkv\.weight: LoRA up \(5, 2\)"
    ):
        plan_lora(lora, key_maps, {"unet": 1.0}, UNKNOWN, "", shapes)
    fits = loader._load(str(write(tmp_path / "slice4.safetensors", kohya(out=4))))
    assert plan_lora(fits, key_maps, {"unet": 1.0}, UNKNOWN, "", shapes).report.total_matched == 1


def test_a_reshape_may_not_blow_the_weight_up(tmp_path):
    sd = {"x.lora_up.weight": torch.ones(4, 1), "x.lora_down.weight": torch.ones(1, 3 * 100),
          "x.reshape_weight": torch.tensor([4, 300])}  # fmt: skip
    lora = loader._load(str(write(tmp_path / "grow.safetensors", sd)))
    key_maps = {"unet": {"x": "w.weight"}}
    with pytest.raises(LoraMismatchError, match=r"more than 16 times larger"):
        plan_lora(lora, key_maps, {"unet": 1.0}, UNKNOWN, "", {"unet": {"w.weight": (4, 3)}})
    ok = plan_lora(lora, key_maps, {"unet": 1.0}, UNKNOWN, "", {"unet": {"w.weight": (4, 30)}})
    assert ok.report.total_matched == 1


def test_a_dora_scale_that_does_not_broadcast_is_a_mismatch(tmp_path):
    sd = {"x.lokr_w1": torch.ones(2, 2), "x.lokr_w2_a": torch.ones(2, 1), "x.lokr_w2_b": torch.ones(1, 3),
          "x.dora_scale": torch.ones(4)}  # fmt: skip
    lora = loader._load(str(write(tmp_path / "dora.safetensors", sd)))
    key_maps, shapes = {"unet": {"x": "w.weight"}}, {"unet": {"w.weight": (4, 6)}}
    # old code: planned, then a broadcast RuntimeError when ComfyUI applied the patch (as core's own)
    with pytest.raises(LoraMismatchError, match=r"dora_scale \(4,\) does not fit the weight \(4, 6\)"):
        plan_lora(lora, key_maps, {"unet": 1.0}, UNKNOWN, "", shapes)
    sd["x.dora_scale"] = torch.ones(4, 1)
    lora = loader._load(str(write(tmp_path / "dora_ok.safetensors", sd)))
    assert plan_lora(lora, key_maps, {"unet": 1.0}, UNKNOWN, "", shapes).report.total_matched == 1
