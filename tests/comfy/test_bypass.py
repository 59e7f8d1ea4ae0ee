"""Bypass mode (apply_mode on Load LoRA / Apply LoRA Stack): LoRAs run on activations through hooks the
ModelPatcher injects, and a sampled latent equals patch mode's within fp32 tolerance, on the tiny SD1.5
(LoRA, LoCon 3x3, LoHa, LoKr, (IA)3, CLIP) and Flux (slices of fused qkv, norm_out's function) models."""

from __future__ import annotations

import comfy.model_management
import lora_factory as lf
import pytest
import torch
from patch_compare import modules, write
from sampling import assert_close, encode, flux_conds, sample, sd15_conds

from lora_foundry.nodes import comfy_bridge_bypass as cbb
from lora_foundry.nodes.load_lora import LoadLora, LoadLoraModelOnly
from lora_foundry.nodes.lora_apply import BYPASS, BYPASS_OR_PATCH, PATCH
from lora_foundry.nodes.stack import ApplyLoraStack

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def sd15_files(sd15, loras_dir):
    """LoRA files on the tiny SD1.5: kohya LoRA / LoCon with 3x3 convs (UNet and CLIP), LoHa, LoKr, (IA)3, DoRA."""
    mods = modules(sd15, convs=True)
    linear = modules(sd15)
    files = {
        "locon": lf.kohya_lora(lf.random_factors(mods, rank=4, seed=11)),
        "lora_b": lf.kohya_lora(lf.random_factors(mods, rank=8, seed=12)),
        "loha": lf.loha_lora(linear, seed=13),
        "lokr": lf.lokr_lora(linear, seed=14),
        "ia3": lf.ia3_lora(linear, seed=15),
        "dora": lf.with_dora(lf.kohya_lora(lf.random_factors(linear, rank=4, seed=16)), linear, seed=17),
    }
    return {k: write(loras_dir, f"bypass_{k}.safetensors", sd) for k, sd in files.items()}


def _load(name, mode, model, clip, sm=0.8, sc=0.6):
    out = LoadLora().execute(model, name, sm, sc, clip=clip, apply_mode=mode)
    return out["result"]


@pytest.fixture(scope="module")
def sd15_base(sd15):
    """The tiny SD1.5's sampled latent and CLIP encoding without any LoRA (conditions of sd15_conds(0))."""
    comfy.model_management.unload_all_models()
    return sample(sd15.model, *sd15_conds()), encode(sd15.clip)


@pytest.mark.parametrize("kind", ["locon", "loha", "lokr", "ia3"])
def test_sd15_sample_equals_patch_mode(sd15, sd15_files, sd15_base, kind):
    conds = sd15_conds()
    bm, bc, _, report = _load(sd15_files[kind], BYPASS, sd15.model, sd15.clip)
    pm, pc, *_ = _load(sd15_files[kind], PATCH, sd15.model, sd15.clip)
    assert not bm.patches and not bc.patcher.patches, "bypass mode patched weights"
    assert cbb.bypass_injection_count(bm) == 1 and "on activations" in report, report
    assert_close(sample(bm, *conds), sample(pm, *conds), sd15_base[0], f"{kind} unet")
    assert_close(encode(bc), encode(pc), sd15_base[1], f"{kind} clip")


def test_stack_of_several_loras_strength_changes_and_removal(sd15, sd15_files, sd15_base):
    conds = sd15_conds()
    names = [sd15_files[k] for k in ("locon", "lora_b", "loha", "lokr")]
    node = ApplyLoraStack()

    def stack(strengths, mode):
        return node.execute(sd15.model, [(n, s, s) for n, s in zip(names, strengths, strict=True)], clip=sd15.clip,
                            apply_mode=mode)["result"]  # fmt: skip

    base = sd15_base[0]
    for strengths in ((0.5, -0.3, 0.7, 0.4), (1.0, 0.2, -0.5, 0.0)):
        bm, bc, *_ = stack(strengths, BYPASS)
        pm, pc, *_ = ApplyLoraStack().execute(
            sd15.model, [(n, s, s) for n, s in zip(names, strengths, strict=True)], clip=sd15.clip
        )["result"]
        assert_close(sample(bm, *conds), sample(pm, *conds), base, f"stack at {strengths}")
        assert_close(encode(bc), encode(pc), sd15_base[1], f"clip stack at {strengths}")
    # removal: the source MODEL (and any clone without the hooks) samples as if no LoRA was ever applied
    again = sample(sd15.model, *conds)
    assert torch.equal(again, base), "the bypass hooks outlived their model"
    assert all(not m._forward_hooks for m in sd15.model.model.modules()), "a hook was left on the base model"


def test_chained_bypass_nodes_compose(sd15, sd15_files, sd15_base):
    """Two Load LoRA nodes in bypass mode, one after the other, equal both applied by patching."""
    conds = sd15_conds()
    a, b = sd15_files["locon"], sd15_files["lora_b"]
    m1 = LoadLoraModelOnly().execute(sd15.model, a, 0.6, apply_mode=BYPASS)["result"][0]
    m2 = LoadLoraModelOnly().execute(m1, b, -0.4, apply_mode=BYPASS)["result"][0]
    p1 = LoadLoraModelOnly().execute(sd15.model, a, 0.6)["result"][0]
    p2 = LoadLoraModelOnly().execute(p1, b, -0.4)["result"][0]
    assert cbb.bypass_injection_count(m2) == 2
    base = sd15_base[0]
    first = sample(m1, *conds)  # m1 loaded first, then its clone m2: the hooks must switch over
    assert_close(sample(m2, *conds), sample(p2, *conds), base, "chained")
    assert_close(sample(m1, *conds), first, base, "first node again")


def test_weight_dependent_kinds_are_refused_or_patched(sd15, sd15_files, sd15_base):
    name = sd15_files["dora"]
    with pytest.raises(RuntimeError) as err:
        _load(name, BYPASS, sd15.model, None)
    text = str(err.value)
    assert text.startswith("[Load LoRA]") and "DoRA" in text and BYPASS_OR_PATCH in text, text
    conds = sd15_conds()
    fm, _, _, report = _load(name, BYPASS_OR_PATCH, sd15.model, None)
    pm, *_ = _load(name, PATCH, sd15.model, None)
    dora = {k for k, p in fm.patches.items() if any(t.adapter.dora_scale is not None for t in p[0][1].terms)}
    assert dora and dora == set(fm.patches) and dora < set(pm.patches), "the fallback did not patch only DoRA"
    assert "patched instead" in report and "DoRA" in report, report
    assert_close(sample(fm, *conds), sample(pm, *conds), sd15_base[0], "dora fallback")


def test_unknown_mode_is_a_clear_error(sd15, sd15_files):
    with pytest.raises(RuntimeError, match=r"\[Load LoRA\] apply_mode 'sideways' is not one of"):
        _load(sd15_files["locon"], "sideways", sd15.model, sd15.clip)


def _flux_lora(model, seed: int) -> dict:
    """Diffusers names over the whole Flux key map: q, k, v as slices of fused qkv weights, norm_out
    through its function (scale and shift swapped)."""
    import comfy.lora

    g = torch.Generator().manual_seed(seed)
    sd = model.model.state_dict()
    out = {}
    for name, target in comfy.lora.model_lora_keys_unet(model.model, {}).items():
        key, offset = (target, None) if isinstance(target, str) else target[:2]
        if not name.startswith("transformer.") or key not in sd or sd[key].ndim != 2:
            continue
        rows = offset[2] if offset is not None else sd[key].shape[0]
        out[f"{name}.lora_A.weight"] = torch.randn(4, sd[key].shape[1], generator=g) * 0.1
        out[f"{name}.lora_B.weight"] = torch.randn(rows, 4, generator=g) * 0.1
    return out


def test_flux_sample_equals_patch_mode(flux, loras_dir):
    import comfy.lora

    targets = comfy.lora.model_lora_keys_unet(flux.model, {})
    assert any(not isinstance(t, str) and t[1] is not None for t in targets.values()), "no slices: moot"
    a = write(loras_dir, "bypass_flux_a.safetensors", _flux_lora(flux, 21))
    b = write(loras_dir, "bypass_flux_b.safetensors", _flux_lora(flux, 22))
    comfy.model_management.unload_all_models()
    conds = flux_conds()
    entries = [(a, 0.7, 1.0), (b, -0.5, 1.0)]
    bm, _, _, report = ApplyLoraStack().execute(flux, entries, apply_mode=BYPASS)["result"]
    pm = ApplyLoraStack().execute(flux, entries)["result"][0]
    assert not bm.patches and "0 patched" not in report
    assert_close(sample(bm, *conds), sample(pm, *conds), sample(flux, *conds), "flux stack")
