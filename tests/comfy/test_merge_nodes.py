"""Merge LoRAs and Resize LoRA nodes: files that load everywhere and match the stack they came from."""

from __future__ import annotations

import json
import logging

import comfy.lora
import lora_factory as lf
import pytest
import torch
from patch_compare import modules, patched, write
from safetensors import safe_open
from safetensors.torch import load_file

from lora_foundry.nodes.comfy_bridge import clip_key_map, unet_key_map
from lora_foundry.nodes.load_lora import LoadLora
from lora_foundry.nodes.merge import MergeLoras, ResizeLora
from lora_foundry.nodes.stack import ApplyLoraStack

ENTRIES = [("m_a.safetensors", 0.8, 0.5), ("m_b.safetensors", -0.4, 1.0), ("m_c.safetensors", 1.2, 0.3)]


@pytest.fixture(scope="module")
def sources(sd15, loras_dir):
    mods = modules(sd15)
    meta = {"ss_tag_frequency": json.dumps({"set": {"zxq style": 5}})}
    for (name, *_), rank, seed in zip(ENTRIES, (4, 8, 2), (31, 32, 33), strict=True):
        write(
            loras_dir,
            name,
            lf.kohya_lora(lf.random_factors(mods, rank=rank, seed=seed)),
            meta if seed == 31 else None,
        )
    write(loras_dir, "m_loha.safetensors", lf.loha_lora(mods, seed=34))
    write(
        loras_dir, "m_dora.safetensors", lf.with_dora(lf.kohya_lora(lf.random_factors(mods, seed=35)), mods)
    )
    write(loras_dir, "m_oft.safetensors", lf.oft_lora(mods, seed=36))
    write(loras_dir, "m_boft.safetensors", lf.boft_lora(mods, seed=37))
    write(loras_dir, "m_glora.safetensors", lf.glora_lora(mods, seed=38))
    write(loras_dir, "m_ia3.safetensors", lf.ia3_lora(mods, seed=39))
    write(loras_dir, "m_oftv2.safetensors", lf.oftv2_lora(mods, seed=40))
    return loras_dir


def merge(sd15, entries, method="concat", rank=32, name="merged", dtype="fp32", overwrite=False, **kw):
    args = dict(conv_rank=0, density=0.5, seed=0, save_dtype=dtype, output_name=name, overwrite=overwrite)
    args.update(kw)
    out = MergeLoras().execute(sd15.model, list(entries), method, rank, clip=sd15.clip, **args)["result"]
    return out


def deltas(models, patcher_model, patcher_clip):
    base = {**models.model.model.state_dict(), **models.clip.patcher.model.state_dict()}
    weights = {**patched(patcher_model), **patched(patcher_clip)}
    return {k: w - base[k].float() for k, w in weights.items()}


def stack_and_file(sd15, entries, file_name):
    sm, sc, *_ = ApplyLoraStack().execute(sd15.model, list(entries), clip=sd15.clip)["result"]
    fm, fc, *_ = LoadLora().execute(sd15.model, file_name, 1.0, 1.0, clip=sd15.clip)["result"]
    return deltas(sd15, sm, sc), deltas(sd15, fm, fc)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_concat_is_exact_and_loads_in_core_with_no_unmatched_key(sd15, sources, caplog):
    name, report = merge(sd15, ENTRIES, "concat", name="concat_exact")
    assert name == "concat_exact.safetensors" and "exact" in report
    stack, merged = stack_and_file(sd15, ENTRIES, name)
    assert set(stack) == set(merged)
    for k in stack:
        assert rel_err(merged[k], stack[k]) < 1e-5, k
    sd = load_file(str(sources / name))
    key_map = clip_key_map(sd15.clip) | unet_key_map(sd15.model)
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(sd, key_map)
    assert not [r for r in caplog.records if "not loaded" in r.getMessage()]
    assert len(patches) == len(stack)


def test_svd_full_rank_equals_stack_and_low_rank_reports_its_error(sd15, sources):
    name, _ = merge(sd15, ENTRIES, "svd", rank=14, name="svd_full")
    stack, merged = stack_and_file(sd15, ENTRIES, name)
    assert max(rel_err(merged[k], stack[k]) for k in stack) < 1e-4
    name, report = merge(sd15, ENTRIES, "svd", rank=3, name="svd_low")
    stack, merged = stack_and_file(sd15, ENTRIES, name)
    errors = [rel_err(merged[k].flatten(1), stack[k].flatten(1)) for k in stack]
    worst = float(report.split("worst ")[1].split(" ")[0])
    assert max(errors) == pytest.approx(worst, rel=1e-2)
    # Eckart-Young: no rank-3 matrix is closer than the truncated dense SVD of the stack's delta.
    k = next(iter(stack))
    d = stack[k].flatten(1)
    s = torch.linalg.svdvals(d)
    optimum = (s[3:].square().sum().sqrt() / s.square().sum().sqrt()).item()
    assert rel_err(merged[k].flatten(1), d) == pytest.approx(optimum, rel=1e-3)


def test_metadata_names_sources_method_and_triggers(sd15, sources):
    name, _ = merge(sd15, ENTRIES, "svd", rank=8, name="with_meta", dtype="fp16")
    with safe_open(str(sources / name), "pt") as f:
        meta = f.metadata()
        assert {f.get_tensor(k).dtype for k in f.keys() if not k.endswith(".alpha")} == {torch.float16}  # noqa: SIM118
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "8"
    assert meta["ss_base_model_version"] == "sd_v1"
    record = json.loads(meta["lora_foundry.merge"])
    assert record["method"] == "svd" and [s["name"] for s in record["sources"]] == [e[0] for e in ENTRIES]
    assert [s["weight"] for s in record["sources"]] == [e[1] for e in ENTRIES]
    *_, triggers, _ = LoadLora().execute(sd15.model, name, 1.0, 1.0, clip=sd15.clip)["result"]
    assert "zxq style" in triggers


def test_lycoris_entries_merge_through_their_dense_delta(sd15, sources):
    entries = [ENTRIES[0], ("m_loha.safetensors", 0.7, 0.7)]
    name, _ = merge(sd15, entries, "svd", rank=64, name="with_loha")
    stack, merged = stack_and_file(sd15, entries, name)
    assert max(rel_err(merged[k], stack[k]) for k in stack) < 1e-4
    with pytest.raises(RuntimeError, match=r"\[Merge LoRAs\].*concat"):
        merge(sd15, entries, "concat", name="loha_concat")


@pytest.mark.parametrize("kind", ["dora", "oft", "boft", "glora", "ia3", "oftv2"])
def test_weight_dependent_entries_are_refused(sd15, sources, kind):
    with pytest.raises(
        RuntimeError, match=rf"m_{kind}\.safetensors uses DoRA, OFT \(LyCORIS or PEFT\), BOFT"
    ):
        merge(sd15, [(f"m_{kind}.safetensors", 1.0, 1.0)], "svd", rank=8, name=f"{kind}_merge")
    assert not (sources / f"{kind}_merge.safetensors").exists()


def test_existing_file_kept_unless_overwrite(sd15, sources):
    merge(sd15, ENTRIES[:1], "concat", name="keep_me")
    before = (sources / "keep_me.safetensors").read_bytes()
    with pytest.raises(RuntimeError, match="exists"):
        merge(sd15, ENTRIES[1:2], "concat", name="keep_me")
    assert (sources / "keep_me.safetensors").read_bytes() == before
    merge(sd15, ENTRIES[1:2], "concat", name="keep_me", overwrite=True)
    assert (sources / "keep_me.safetensors").read_bytes() != before
    assert not [p for p in sources.iterdir() if p.name.endswith(".tmp")]


def test_merge_names_the_written_file_for_the_frontend(sd15, sources):
    # The browser refreshes its LoRA lists when a node's ui names a written file (tests/browser).
    args = dict(conv_rank=0, density=0.5, seed=0, save_dtype="fp16", output_name="named", overwrite=False)
    out = MergeLoras().execute(sd15.model, list(ENTRIES[:2]), "concat", 64, clip=sd15.clip, **args)
    assert out["ui"]["lora_written"] == [out["result"][0]] == ["named.safetensors"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "../escape"}, "output_name|path|\\.\\."),
        ({"name": "sub/dir"}, "output_name|path|separator"),
        ({"method": "svd", "rank": 0}, "rank"),
        ({"method": "ties", "density": 0.0}, "density"),
        ({"method": "dare_linear", "density": 1.5}, "density"),
    ],
)
def test_bad_arguments_are_named(sd15, sources, kwargs, message):
    kw = {"method": "svd", "rank": 8, "name": "bad_args"} | kwargs
    with pytest.raises(RuntimeError, match=message):
        merge(sd15, ENTRIES, kw.pop("method"), kw.pop("rank"), kw.pop("name"), **kw)


def test_empty_stack_is_an_error(sd15, sources):
    with pytest.raises(RuntimeError, match="no enabled entry"):
        merge(sd15, [], "concat", name="nothing")


def test_resize_fixed_and_energy(sd15, sources):
    merge(sd15, ENTRIES, "concat", name="to_resize")  # rank 14
    src_bytes = (sources / "to_resize.safetensors").read_bytes()
    name, report = ResizeLora().execute("to_resize.safetensors", "fixed", 4, 0.9, "fp32", "resized4", False)[
        "result"
    ]
    assert "14 -> 4" in report and "energy kept" in report
    sd = load_file(str(sources / name))
    assert {v.shape[0] for k, v in sd.items() if k.endswith("lora_down.weight")} == {4}
    _, merged = stack_and_file(sd15, ENTRIES, name)
    assert merged
    name, report = ResizeLora().execute(
        "to_resize.safetensors", "energy", 4, 0.999999, "fp32", "resized_e", False
    )["result"]
    stack, merged = stack_and_file(sd15, ENTRIES, name)
    assert max(rel_err(merged[k], stack[k]) for k in stack) < 1e-2
    assert (sources / "to_resize.safetensors").read_bytes() == src_bytes


def test_sdxl_merge_uses_te1_te2_names_and_loads_in_core(sdxl, loras_dir, caplog):
    sd = lf.kohya_lora(lf.random_factors(modules(sdxl), seed=41), sdxl=True)
    write(loras_dir, "xl_src.safetensors", sd, {"ss_base_model_version": "sdxl_base_v1-0"})
    args = dict(conv_rank=0, density=0.5, seed=0, save_dtype="fp32", output_name="xl_merged", overwrite=True)
    name, _ = MergeLoras().execute(
        sdxl.model, [("xl_src.safetensors", 1.0, 1.0)], "concat", 8, clip=sdxl.clip, **args
    )["result"]
    merged = load_file(str(loras_dir / name))
    prefixes = {k.split("text_model")[0] for k in merged if k.startswith("lora_te")}
    assert prefixes == {"lora_te1_", "lora_te2_"}
    key_map = clip_key_map(sdxl.clip) | unet_key_map(sdxl.model)
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(merged, key_map)
    assert not [r for r in caplog.records if "not loaded" in r.getMessage()]
    assert len(patches) == sum(1 for k in merged if k.endswith(".alpha"))


def test_sdxl_merge_uses_the_names_kohya_writes_and_loads_in_core(sdxl, loras_dir, caplog):
    """SDXL: UNet modules by the SGM paths sd-scripts trains SDXL on, text encoders as lora_te1_ /
    lora_te2_; core takes every module, with the stack's weights."""
    mods = modules(sdxl)
    for name, seed in (("xl_a.safetensors", 41), ("xl_b.safetensors", 42)):
        write(loras_dir, name, lf.kohya_lora(lf.random_factors(mods, seed=seed), sdxl=True))
    entries = [("xl_a.safetensors", 0.7, 0.4), ("xl_b.safetensors", -0.5, 0.9)]
    name, _ = merge(sdxl, entries, "concat", name="xl_concat")
    sd = load_file(str(loras_dir / name))
    modules_written = {k.split(".", 1)[0] for k in sd}
    unet = {m for m in modules_written if m.startswith("lora_unet_")}
    assert unet and all(
        m.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
        for m in unet
    )
    te = modules_written - unet
    assert te and all(m.startswith(("lora_te1_", "lora_te2_")) for m in te)
    assert any(m.startswith("lora_te2_") for m in te)
    key_map = clip_key_map(sdxl.clip) | unet_key_map(sdxl.model)
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(sd, key_map)
    assert not [r for r in caplog.records if "not loaded" in r.getMessage()]
    stack, merged = stack_and_file(sdxl, entries, name)
    assert len(patches) == len(stack) and set(stack) == set(merged)
    for k in stack:
        assert rel_err(merged[k], stack[k]) < 1e-5, k
