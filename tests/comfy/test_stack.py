"""LoRA Stack and Apply LoRA Stack: one fused patch per weight, equal to chaining core's loader."""

from __future__ import annotations

import os

import comfy.model_management
import comfy.sd
import lora_factory as lf
import pytest
from patch_compare import assert_same, modules, patched, write

from lora_foundry.lora_core.adapters import LoraAdapter
from lora_foundry.nodes.comfy_bridge import FoundryPatch
from lora_foundry.nodes.load_lora import LoadLora
from lora_foundry.nodes.stack import ApplyLoraStack, LoraStack


@pytest.fixture(scope="module")
def three_loras(sd15, loras_dir):
    mods = modules(sd15)
    files = {
        "stack_a.safetensors": lf.kohya_lora(lf.random_factors(mods, rank=4, seed=21)),
        "stack_b.safetensors": lf.loha_lora(mods, seed=22),
        "stack_c.safetensors": lf.with_dora(
            lf.kohya_lora(lf.random_factors(mods, rank=2, seed=23)), mods, seed=24
        ),
        "stack_d.safetensors": lf.kohya_lora(lf.random_factors(mods, rank=8, seed=25)),
    }
    for name, sd in files.items():
        write(loras_dir, name, sd)
    return files


def slots(*entries):
    kw = {}
    for i, (name, sm, sc, on) in enumerate(entries, start=1):
        kw.update({f"lora_{i}": name, f"strength_model_{i}": sm, f"strength_clip_{i}": sc, f"on_{i}": on})
    return kw


def core_chain(models, files, entries):
    m, c = models.model, models.clip
    for name, sm, sc in entries:
        m, c = comfy.sd.load_lora_for_models(m, c, files[name], sm, sc)
    return m, c


def test_stack_equals_chained_core_loaders(sd15, three_loras):
    entries = [("stack_a.safetensors", 0.8, 0.5), ("stack_b.safetensors", -0.4, 1.0), ("stack_c.safetensors", 0.6, 0.3),
               ("stack_d.safetensors", 1.2, -0.7)]  # fmt: skip
    (stack,) = LoraStack().execute(**slots(*[(*e, True) for e in entries[:3]]))
    (stack,) = LoraStack().execute(lora_stack=stack, **slots((*entries[3], True)))
    m, c, _, report = ApplyLoraStack().execute(sd15.model, stack, clip=sd15.clip)["result"]
    cm, cc = core_chain(sd15, three_loras, entries)
    assert_same(patched(m), patched(cm))
    assert_same(patched(c), patched(cc))
    assert report.count("matched:") == 4


def test_weight_dependent_entries_keep_their_place_in_the_stack(sd15, three_loras, loras_dir):
    """A rotation (OFT, BOFT) or GLoRA acts on the weight as the entries before it left it, so the
    plain LoRAs around it must not be fused across it: equal to core's chain in that order."""
    mods = modules(sd15)
    files = dict(three_loras)
    files["stack_boft.safetensors"] = lf.boft_lora(mods, seed=26, alpha=0.0)
    files["stack_oft.safetensors"] = lf.oft_lora(mods, seed=27)
    for name in ("stack_boft.safetensors", "stack_oft.safetensors"):
        write(loras_dir, name, files[name])
    entries = [("stack_a.safetensors", 0.8, 0.5), ("stack_boft.safetensors", 0.7, 1.0),
               ("stack_d.safetensors", 1.2, -0.7), ("stack_oft.safetensors", 1.0, 0.6)]  # fmt: skip
    m, c, *_ = ApplyLoraStack().execute(sd15.model, entries, clip=sd15.clip)["result"]
    cm, cc = core_chain(sd15, files, entries)
    assert_same(patched(m), patched(cm))
    assert_same(patched(c), patched(cc))


def test_peft_oft_entry_keeps_its_place_in_the_stack(sd15, three_loras, loras_dir):
    """A PEFT OFT (which core does not read) between plain LoRAs: the stack equals Load LoRA
    nodes chained in the same order."""
    write(loras_dir, "stack_oftv2.safetensors", lf.oftv2_lora(modules(sd15), seed=28))
    entries = [("stack_a.safetensors", 0.8, 0.5), ("stack_oftv2.safetensors", 0.7, 1.0),
               ("stack_d.safetensors", 1.2, -0.7)]  # fmt: skip
    m, c, _, report = ApplyLoraStack().execute(sd15.model, entries, clip=sd15.clip)["result"]
    assert "PEFT OFT" in report, report
    cm, cc = sd15.model, sd15.clip
    for name, sm, sc in entries:
        cm, cc, *_ = LoadLora().execute(cm, name, sm, sc, clip=cc)["result"]
    assert_same(patched(m), patched(cm))
    assert_same(patched(c), patched(cc))
    before = patched(
        ApplyLoraStack().execute(sd15.model, [entries[0], entries[2]], clip=sd15.clip)["result"][0]
    )
    assert any((patched(m)[k] - before[k]).abs().max() > 1e-3 for k in before), "the OFT changed nothing"


def test_low_vram_loading_gives_the_full_load_output(sd15, three_loras):
    """Partially loaded (weights patched on the fly at each forward, LowVramPatch), the stack's
    UNet output equals its fully loaded output and core's chain's."""
    import torch

    entries = [
        ("stack_a.safetensors", 0.8, 0.5),
        ("stack_b.safetensors", -0.4, 1.0),
        ("stack_c.safetensors", 0.6, 0.3),
    ]
    ours = ApplyLoraStack().execute(sd15.model, list(entries), clip=sd15.clip)["result"][0]
    core = core_chain(sd15, three_loras, entries)[0]
    g = torch.Generator().manual_seed(3)
    x, t, ctx = (
        torch.randn(1, 4, 8, 8, generator=g),
        torch.tensor([500.0]),
        torch.randn(1, 77, 64, generator=g),
    )

    comfy.model_management.unload_all_models()  # no other patcher of this model may hold it loaded

    def forward(patcher, low_vram: bool):
        patcher.patch_model(lowvram_model_memory=1 if low_vram else 0)  # 1 byte: every layer on the fly
        on_the_fly = sum(1 for m in patcher.model.modules() if getattr(m, "weight_function", None))
        with torch.no_grad():
            out = patcher.model.diffusion_model(x, t, context=ctx)
        patcher.unpatch_model()
        return out, on_the_fly

    full, _ = forward(ours, False)
    partial, on_the_fly = forward(ours, True)
    assert on_the_fly > 50, "the model was not loaded in low-VRAM mode: test is moot"
    assert torch.allclose(partial, full, atol=1e-5)
    assert torch.allclose(partial, forward(core, True)[0], atol=1e-4)
    assert not torch.allclose(full, forward(sd15.model, False)[0], atol=1e-2), "the LoRAs changed nothing"


def test_one_patch_per_weight_with_fused_lora_terms(sd15, three_loras):
    entries = [("stack_a.safetensors", 1.0, 1.0, True), ("stack_d.safetensors", 0.5, 0.5, True)]
    (stack,) = LoraStack().execute(**slots(*entries))
    m, *_ = ApplyLoraStack().execute(sd15.model, stack, clip=sd15.clip)["result"]
    for key, patches in m.patches.items():
        assert len(patches) == 1, key
        patch = patches[0][1]
        assert isinstance(patch, FoundryPatch) and len(patch.terms) == 2
        assert all(isinstance(t.adapter, LoraAdapter) for t in patch.terms)


def test_switched_off_entries_are_left_out(sd15, three_loras):
    (stack,) = LoraStack().execute(
        **slots(("stack_a.safetensors", 1.0, 1.0, False), ("stack_d.safetensors", 0.5, 0.2, True))
    )
    assert [tuple(e) for e in stack] == [("stack_d.safetensors", 0.5, 0.2)]
    m, c, *_ = ApplyLoraStack().execute(sd15.model, stack, clip=sd15.clip)["result"]
    cm, cc = core_chain(sd15, three_loras, [("stack_d.safetensors", 0.5, 0.2)])
    assert_same(patched(m), patched(cm))


def test_all_off_is_a_documented_no_op(sd15, three_loras):
    (stack,) = LoraStack().execute(**slots(("stack_a.safetensors", 1.0, 1.0, False)))
    assert stack == []
    m, c, triggers, report = ApplyLoraStack().execute(sd15.model, stack, clip=sd15.clip)["result"]
    assert m is sd15.model and c is sd15.clip and triggers == ""
    assert "unchanged" in report


def test_other_packs_stacks_in_and_out(sd15, three_loras):
    foreign = [("stack_a.safetensors", 0.7, 0.1), ("None", 1.0, 1.0)]  # as Efficiency / Comfyroll pass them
    (stack,) = LoraStack().execute(lora_stack=foreign, **slots(("stack_d.safetensors", 0.3, 0.3, True)))
    for name, sm, sc in stack:  # how other packs read it
        assert isinstance(name, str) and isinstance(sm, float) and isinstance(sc, float)
    m, *_ = ApplyLoraStack().execute(sd15.model, foreign, clip=sd15.clip)["result"]
    cm, _ = core_chain(sd15, three_loras, [("stack_a.safetensors", 0.7, 0.1)])
    assert_same(patched(m), patched(cm))


def test_bad_stack_entry_is_named(sd15):
    with pytest.raises(RuntimeError, match=r"\[Apply LoRA Stack\] LORA_STACK entry 0"):
        ApplyLoraStack().execute(sd15.model, [("only-a-name",)], clip=sd15.clip)


def test_stack_keeps_block_weights_through_copies(three_loras):
    import copy

    (stack,) = LoraStack().execute(
        **{**slots(("stack_a.safetensors", 1.0, 1.0, True)), "block_weights_1": "MIDD"}
    )
    assert copy.deepcopy(stack)[0].block_weights == "MIDD"


def test_rows_json_entries_follow_the_slots(three_loras):
    rows = '[{"lora": "stack_d.safetensors", "on": true, "strength_model": 0.25, "strength_clip": 0.5}, {"lora": "stack_a.safetensors", "on": false}]'
    (stack,) = LoraStack().execute(rows_json=rows, **slots(("stack_a.safetensors", 1.0, 1.0, True)))
    assert [tuple(e) for e in stack] == [
        ("stack_a.safetensors", 1.0, 1.0),
        ("stack_d.safetensors", 0.25, 0.5),
    ]


@pytest.mark.parametrize(
    ("rows", "message"),
    [("{", "not valid JSON"), ('{"lora": "a"}', "must be a JSON list"), ('[{"strength_model": 1}]', "row 0"),
     ('[{"lora": "a", "weight": 1}]', "unknown fields"), ('[{"lora": "a", "strength_model": "x"}]', "numbers")],
)  # fmt: skip
def test_bad_rows_json_is_named(rows, message):
    with pytest.raises(RuntimeError, match=rf"\[LoRA Stack\] rows_json.*{message}|{message}"):
        LoraStack().execute(rows_json=rows)


def test_a_change_on_one_side_repatches_only_that_side(sd15, three_loras, loras_dir):
    """The node hands out its last MODEL (or CLIP) again when only the other side changed, so
    ComfyUI, finding it loaded with the same patches, does not patch it again."""
    node = ApplyLoraStack()

    def run(sm, sc, model=sd15.model, clip=sd15.clip):
        stack = [("stack_a.safetensors", sm, sc), ("stack_d.safetensors", 0.5, 0.5)]
        return node.execute(model, stack, clip=clip)["result"][:2]

    m1, c1 = run(0.5, 0.5)
    m2, c2 = run(0.9, 0.5)  # strength_model only
    assert m2 is not m1 and c2 is c1
    assert_same(
        patched(m2),
        patched(
            ApplyLoraStack().execute(
                sd15.model, [("stack_a.safetensors", 0.9, 0.5), ("stack_d.safetensors", 0.5, 0.5)]
            )["result"][0]
        ),
    )
    m3, c3 = run(0.9, -0.2)  # strength_clip only
    assert m3 is m2 and c3 is not c2
    assert run(0.9, -0.2) == (m3, c3)  # nothing changed: both kept
    other = sd15.model.clone()  # another source model (an upstream node ran again)
    m4, c4 = run(0.9, -0.2, model=other)
    assert m4 is not m3 and c4 is c3

    path = loras_dir / "stack_a.safetensors"  # the file changed on disk: both sides again
    path.write_bytes(path.read_bytes())
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    m5, c5 = run(0.9, -0.2, model=other)
    assert m5 is not m4 and c5 is not c4
