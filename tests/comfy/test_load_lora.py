"""Load LoRA against ComfyUI core's LoraLoader on tiny SD1.5 and SDXL models, in-process.

Weights after patching are compared key by key: same set of patched weights, same values
(fp32, 1e-5). Where core cannot read a layout, ours on that layout is compared with core on
the same factors written with kohya names.
"""

from __future__ import annotations

import comfy.lora
import comfy.sd
import lora_factory as lf
import pytest
import torch
from patch_compare import assert_same, modules, patched, write

from lora_foundry.lora_core.apply import loader
from lora_foundry.nodes.load_lora import LoadLora, LoadLoraModelOnly


def run_ours(models, name, sm=0.8, sc=-0.6, block_weights=""):
    model, clip, triggers, report = LoadLora().execute(
        models.model, name, sm, sc, clip=models.clip, block_weights=block_weights
    )["result"]
    return model, clip, triggers, report


def run_core(models, sd, sm=0.8, sc=-0.6):
    return comfy.sd.load_lora_for_models(models.model, models.clip, sd, sm, sc)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_kohya_lora_and_locon_equal_core(request, loras_dir, family):
    models = request.getfixturevalue(family)
    sd = lf.kohya_lora(lf.random_factors(modules(models, convs=True), seed=1), sdxl=family == "sdxl")
    name = write(loras_dir, f"kohya_{family}.safetensors", sd)
    m, c, _, report = run_ours(models, name)
    cm, cc = run_core(models, sd)
    assert_same(patched(m), patched(cm))
    assert_same(patched(c), patched(cc))
    assert "NOT applied" not in report


@pytest.mark.parametrize("style", ["AB", "dotted"])
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_diffusers_layouts_equal_core_on_kohya_names(request, loras_dir, family, style):
    models = request.getfixturevalue(family)
    factors = lf.random_factors(modules(models), seed=2)
    name = write(loras_dir, f"diffusers_{style}_{family}.safetensors", lf.diffusers_lora(factors, style))
    m, c, _, report = run_ours(models, name)
    cm, cc = run_core(models, lf.kohya_lora(factors, sdxl=family == "sdxl"))
    assert_same(patched(m), patched(cm))
    assert_same(patched(c), patched(cc))


def test_peft_unet_lora_is_not_dropped(sd15, loras_dir):
    """Core 0.3.75 silently drops the UNet attention layers of a PEFT-named LoRA; we apply them."""
    factors = {m: f for m, f in lf.random_factors(lf.unet_modules(sd15), seed=3).items()}
    peft = lf.diffusers_lora(factors, "peft")
    name = write(loras_dir, "peft_sd15.safetensors", peft)
    m, _, _, report = run_ours(sd15, name)
    cm, _ = run_core(sd15, lf.kohya_lora(factors))
    assert_same(patched(m), patched(cm))
    assert len(m.patches) == len(factors)
    core_on_peft, _ = run_core(sd15, peft)
    assert len(core_on_peft.patches) < len(factors)  # the gap this pack closes


@pytest.mark.parametrize(
    "kind",
    [
        "loha",
        "lokr",
        "dora",
        "oft",
        "oft_bounded",
        "oft_dora",
        "boft",
        "boft_bounded",
        "boft_dora",
        "glora",
        "glora_dora",
    ],
)
def test_lycoris_kinds_equal_core(sd15, loras_dir, kind):
    mods = modules(sd15)
    if kind == "loha":
        sd = lf.loha_lora(mods, seed=4)
    elif kind == "lokr":
        sd = lf.lokr_lora(mods, seed=5)
    elif kind == "oft":
        sd = lf.oft_lora(mods, seed=9)
    elif kind == "oft_bounded":  # alpha bounds the norm of the skew part
        sd = lf.oft_lora(mods, seed=10, alpha=0.5)
    elif kind == "oft_dora":
        sd = lf.with_dora(lf.oft_lora(mods, seed=11, alpha=2.0), mods, seed=12)
    elif kind == "boft":
        sd = lf.boft_lora(mods, seed=16, alpha=0.0)  # alpha 0: no bound
    elif kind == "boft_bounded":
        sd = lf.boft_lora(mods, seed=17, alpha=0.5)
    elif kind == "boft_dora":
        sd = lf.with_dora(lf.boft_lora(mods, seed=18, alpha=2.0), mods, seed=19)
    elif kind == "glora":
        sd = lf.glora_lora(mods, seed=13)
    elif kind == "glora_dora":
        sd = lf.with_dora(lf.glora_lora(mods, seed=14), mods, seed=15)
    else:
        sd = lf.with_dora(lf.kohya_lora(lf.random_factors(mods, seed=6)), mods, seed=7)
    if kind.startswith("boft"):  # butterflies of several levels are among them
        assert max(v.shape[0] for k, v in sd.items() if k.endswith(".oft_blocks")) == 3
    name = write(loras_dir, f"{kind}.safetensors", sd)
    m, c, _, report = run_ours(sd15, name)
    cm, cc = run_core(sd15, sd)
    ours = patched(m)
    assert_same(ours, patched(cm))
    assert_same(patched(c), patched(cc))
    base = sd15.model.model.state_dict()
    changed = [k for k, w in ours.items() if not torch.allclose(w, base[k].float(), atol=1e-4)]
    assert len(changed) == len(ours)  # every module was really patched, on both sides
    if kind.startswith("boft"):
        assert "LyCORIS BOFT" in report and "NOT applied" not in report and "unknown keys" not in report


def test_model_only_node_patches_the_unet_only(sd15, loras_dir):
    sd = lf.kohya_lora(lf.random_factors(modules(sd15), seed=8))
    name = write(loras_dir, "model_only.safetensors", sd)
    m, triggers, report = LoadLoraModelOnly().execute(sd15.model, name, 0.5)["result"]
    cm, _ = comfy.sd.load_lora_for_models(sd15.model, None, sd, 0.5, 0)
    assert_same(patched(m), patched(cm))
    assert "clip" not in report.split("matched:")[1].splitlines()[0]


def test_base_model_is_not_edited(sd15, loras_dir):
    before = {k: v.clone() for k, v in sd15.model.model.state_dict().items()}
    sd = lf.kohya_lora(lf.random_factors(modules(sd15), seed=9))
    m, *_ = run_ours(sd15, write(loras_dir, "no_edit.safetensors", sd))
    assert m is not sd15.model and not sd15.model.patches
    for k, v in sd15.model.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_strength_change_reads_nothing_from_disk(sd15, loras_dir):
    name = write(loras_dir, "cached.safetensors", lf.kohya_lora(lf.random_factors(modules(sd15), seed=10)))
    run_ours(sd15, name, 1.0, 1.0)
    reads = loader.CACHE.reads
    m, *_ = run_ours(sd15, name, 0.3, 0.2)
    assert loader.CACHE.reads == reads
    cm, _ = run_core(sd15, lf.kohya_lora(lf.random_factors(modules(sd15), seed=10)), 0.3, 0.2)
    assert_same(patched(m), patched(cm))


def test_trigger_words_and_report(sd15, loras_dir):
    meta = {"ss_tag_frequency": '{"set": {"zxq style": 9, "cat": 3}}', "ss_base_model_version": "sd_v1"}
    name = write(
        loras_dir, "triggers.safetensors", lf.kohya_lora(lf.random_factors(modules(sd15), seed=11)), meta
    )
    _, _, triggers, report = run_ours(sd15, name)
    assert triggers.split(", ")[0] == "zxq style"
    assert "kohya" in report.lower() and "unet" in report and "clip" in report


def test_partial_match_is_summarised_not_listed(sd15, loras_dir, caplog):
    sd = lf.kohya_lora(lf.random_factors(lf.unet_modules(sd15), seed=12))
    for i in range(30):  # modules no SD1.5 model has
        sd[f"lora_unet_extra_blocks_{i}_attn_to_q.lora_up.weight"] = torch.zeros(4, 2)
        sd[f"lora_unet_extra_blocks_{i}_attn_to_q.lora_down.weight"] = torch.zeros(2, 4)
    name = write(loras_dir, "partial.safetensors", sd)
    with caplog.at_level("WARNING"):
        _, _, _, report = run_ours(sd15, name)
    assert "NOT applied: 30 modules" in report
    assert len(report.splitlines()) < 12
    warnings = [r for r in caplog.records if "partial.safetensors" in r.getMessage()]
    assert len(warnings) == 1


def test_lora_for_another_family_is_refused(sd15, sdxl, loras_dir):
    sd = lf.kohya_lora(lf.random_factors(modules(sdxl), seed=13), sdxl=True)
    name = write(loras_dir, "xl_on_15.safetensors", sd, {"ss_base_model_version": "sdxl_base_v1-0"})
    with pytest.raises(RuntimeError) as e:
        run_ours(sd15, name)
    assert "SDXL" in str(e.value) and "SD1" in str(e.value) and "xl_on_15.safetensors" in str(e.value)


def test_flux_lora_on_sd15_is_refused(sd15, loras_dir):
    sd = {}
    for i in range(2):
        n = f"lora_unet_double_blocks_{i}_img_attn_qkv"
        sd[f"{n}.lora_up.weight"], sd[f"{n}.lora_down.weight"] = torch.randn(9216, 4), torch.randn(4, 3072)
    name = write(loras_dir, "flux_on_15.safetensors", sd)
    with pytest.raises(RuntimeError, match="flux_on_15.safetensors"):
        run_ours(sd15, name)
    core, _ = run_core(sd15, sd)  # core goes ahead without a word
    assert not core.patches


def test_block_weights_zero_blocks_leave_them_unpatched(sd15, loras_dir):
    sd = lf.kohya_lora(lf.random_factors(lf.unet_modules(sd15), seed=14))
    name = write(loras_dir, "blocks.safetensors", sd)
    m, *_ = run_ours(sd15, name, 1.0, 1.0, block_weights="in=0, mid=1, out=0")
    base = sd15.model.model.state_dict()
    for k, w in patched(m).items():
        changed = not torch.allclose(w, base[k].float())
        assert changed == (".middle_block." in k), k


def test_broken_file_gives_clear_error(loras_dir, sd15):
    (loras_dir / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(RuntimeError) as e:
        run_ours(sd15, "broken.safetensors")
    assert "broken.safetensors" in str(e.value) and str(e.value).startswith("[Load LoRA]")
