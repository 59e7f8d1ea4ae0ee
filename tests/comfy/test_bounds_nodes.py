"""Issue #14 through the nodes on tiny in-process models: block specs refused against the model's
real blocks before anything loads, memory estimates that refuse only what cannot fit (and match
what is really allocated), output names, a re-queued Merge / Resize whose file is gone runs again,
and Train LoRA's damaged-state fallback and cancel inside gradient accumulation."""

from __future__ import annotations

import json
import os

import comfy.model_management
import lora_factory as lf
import pytest
import safetensors.torch
import torch
from patch_compare import modules, write
from train_run import make_dataset, train

from lora_foundry.lora_core import budget
from lora_foundry.lora_core.merge import bake
from lora_foundry.nodes import comfy_bridge as bridge
from lora_foundry.nodes import comfy_bridge_train as train_bridge
from lora_foundry.nodes import merge as merge_nodes
from lora_foundry.nodes.load_lora import LoadLora
from lora_foundry.nodes.merge import MergeLoras, ResizeLora
from lora_foundry.nodes.stack import ApplyLoraStack, LoraStack
from lora_foundry.nodes.train import model_targets

LORA = "bounds_a.safetensors"


# one torch thread: these tiny models train in reproducible order and leave the cores to others
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lora(sd15, loras_dir):
    write(loras_dir, LORA, lf.kohya_lora(lf.random_factors(modules(sd15), rank=4, seed=5)))
    return LORA


def merge(sd15, name, method="svd", rank=8, overwrite=False):
    args = dict(conv_rank=0, density=0.5, seed=0, save_dtype="fp32", output_name=name, overwrite=overwrite)
    return MergeLoras().execute(sd15.model, [(LORA, 0.7, 0.5)], method, rank, clip=sd15.clip, **args)


# --- block specs --------------------------------------------------------------------------


def test_block_counts_are_the_models_own(sd15, sdxl):
    assert bridge.unet_block_counts(sd15.model) == budget_counts(12, 3, 12)
    assert bridge.unet_block_counts(sdxl.model) == budget_counts(9, 3, 9)


def budget_counts(i, m, o):
    from lora_foundry.lora_core.apply.block_weights import BlockCounts

    return BlockCounts(i, m, o)


@pytest.mark.timeout(60)
def test_train_blocks_out_of_range_fails_before_the_model_loads(sd15, dataset_dir, monkeypatch):
    dataset, _ = make_dataset(sd15)

    def no_load(*_args, **_kw):
        raise AssertionError("the model was loaded before the blocks were checked")

    monkeypatch.setattr(train_bridge, "prepare_for_training", no_load)
    with pytest.raises(
        RuntimeError, match=r"\[Train LoRA\] `blocks` entry 'IN0-99999999999': .*input blocks are IN00-IN11"
    ):
        train(sd15, dataset, output_name="huge_blocks", blocks="in0-99999999999")


@pytest.mark.timeout(60)
def test_sdxl_train_blocks_use_sdxls_count(sdxl, dataset_dir, monkeypatch):
    dataset, _ = make_dataset(sdxl)
    with pytest.raises(RuntimeError, match=r"\[Train LoRA\] `blocks` entry 'OUT9': .*OUT00-OUT08"):
        train(sdxl, dataset, output_name="sdxl_blocks", blocks="out9")


@pytest.mark.parametrize(
    "node", [lambda m, c, bw: LoadLora().execute(m, LORA, 1.0, 1.0, clip=c, block_weights=bw),
             lambda m, c, bw: ApplyLoraStack().execute(m, [_item(bw)], clip=c)],
)  # fmt: skip
def test_block_weights_outside_the_model_are_named(sd15, lora, node):
    with pytest.raises(
        RuntimeError, match=rf"{LORA}: `block_weights` entry 'IN99999999999=1': .*input blocks are IN00-IN11"
    ):
        node(sd15.model, sd15.clip, "IN99999999999=1")
    node(sd15.model, sd15.clip, "in=0.5, IN11=0, MID02=1, OUT11=1")  # the real last blocks are fine


def _item(bw):
    from lora_foundry.lora_core.apply.stack import StackItem

    return StackItem(LORA, 1.0, 1.0, bw)


def test_lora_stack_rows_are_capped(lora):
    rows = json.dumps([{"lora": LORA, "on": True}] * 65)
    with pytest.raises(RuntimeError, match=r"\[LoRA Stack\] rows_json has 65 rows; at most 64"):
        LoraStack().execute(rows_json=rows)
    (stack,) = LoraStack().execute(rows_json=json.dumps([{"lora": LORA}] * 64))
    assert len(stack) == 64


# --- memory estimates ---------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_skip_floor_equals_the_real_unets_kept_outputs(request, family):
    """unet_skip_values from the config equals the input blocks' outputs of a real forward."""
    models = request.getfixturevalue(family)
    base = models.model.model
    unet = base.diffusion_model
    seen = []
    # ComfyUI runs a block's layers one by one: a block's output is its last layer's
    handles = [
        b[-1].register_forward_hook(lambda _m, _a, out: seen.append(out[0].numel()))
        for b in unet.input_blocks
    ]
    x = torch.randn(1, 4, 12, 20)
    extra = {"y": torch.zeros(1, base.adm_channels)} if base.adm_channels else {}
    try:
        with torch.no_grad():
            ctx = torch.zeros(1, 77, bridge.model_unet_config(models.model)["context_dim"])
            unet(x, torch.tensor([10.0]), context=ctx, **extra)
    finally:
        for h in handles:
            h.remove()
    assert sum(seen) == budget.unet_skip_values(bridge.model_unet_config(models.model), 12, 20)


def test_train_refuses_only_above_the_estimate(sd15, dataset_dir, monkeypatch):
    dataset, _ = make_dataset(sd15)
    needs = []
    real_need = budget.train_need

    def spy(*args, **kw):
        needs.append(real_need(*args, **kw))
        return needs[-1]

    from lora_foundry.nodes import train as train_nodes

    monkeypatch.setattr(train_nodes, "train_need", spy)
    monkeypatch.setattr(bridge, "available_memory", lambda *_a, **_k: 10**15)
    train(sd15, dataset, output_name="fits", steps=1)
    need = needs[0].total
    monkeypatch.setattr(bridge, "available_memory", lambda *_a, **_k: need)  # exactly enough: runs
    train(sd15, dataset, output_name="fits_exactly", steps=1)
    monkeypatch.setattr(bridge, "available_memory", lambda *_a, **_k: need - 1)
    with pytest.raises(
        RuntimeError,
        match=r"\[Train LoRA\] `rank` 4 on \d+ layers \(`targets` attention\) with `batch_size` 1 at resolution "
        r"64 need at least .* is available on cpu: lower `rank`",
    ):
        train(sd15, dataset, output_name="does_not_fit", steps=1)
    assert not (bridge_loras() / "does_not_fit" / "does_not_fit.safetensors").exists()


def bridge_loras():
    from pathlib import Path

    return Path(bridge.loras_dir())


def test_lora_estimate_counts_what_the_network_allocates(sd15):
    from lora_foundry.lora_core.train.network import LoraNetwork, select_targets

    targets = select_targets(model_targets(sd15.model), "all_linear_conv", "in4-8, mid")
    net = LoraNetwork(targets, rank=6, alpha=6, dora=True)
    counted = sum(p.numel() for p in net.parameters())
    shapes = [tuple(t.module.weight.shape) for t in targets]
    assert budget.lora_value_count(shapes, 6, dora=True) == counted


def test_merge_estimate_matches_the_file_and_refuses_below_it(sd15, lora, loras_dir, monkeypatch):
    needs = []
    real = bake.merge_need

    def spy(*args, **kw):
        needs.append(real(*args, **kw))
        return needs[-1]

    monkeypatch.setattr(bake, "merge_need", spy)
    merge(sd15, "est_svd", method="svd", rank=3)
    sd = safetensors.torch.load_file(str(loras_dir / "est_svd.safetensors"))
    factor_values = sum(
        v.numel() for k, v in sd.items() if k.endswith((".lora_up.weight", ".lora_down.weight"))
    )
    parts = dict(needs[0].parts)
    assert parts["output factors"] == factor_values * 4  # fp32: the factors themselves, no copy
    monkeypatch.setattr(bridge, "available_memory", lambda *_a, **_k: needs[0].total - 1)
    with pytest.raises(
        RuntimeError,
        match=r"\[Merge LoRAs\] merging \d+ modules with method svd at `rank` 3 need at least .*lower `rank`",
    ):
        merge(sd15, "est_refused", method="svd", rank=3)
    assert not (loras_dir / "est_refused.safetensors").exists()


def test_resize_refuses_a_rank_that_cannot_fit(sd15, lora, loras_dir, monkeypatch):
    monkeypatch.setattr(bridge, "available_memory", lambda *_a, **_k: 1024)
    with pytest.raises(RuntimeError, match=r"\[Resize LoRA\] resizing \d+ modules to `rank` 2 need at least"):
        ResizeLora().execute(LORA, "fixed", 2, 0.9, "fp16", "resized_refused", False)
    assert not (loras_dir / "resized_refused.safetensors").exists()


# --- names and files ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, message",
    [
        ("x" * 300, r"`output_name` is 300 bytes long"),
        ("two\nlines", r"`output_name` .two.nlines. contains the control character U\+000A"),
    ],
)
def test_bad_output_names_are_named_before_work(sd15, lora, name, message):
    with pytest.raises(RuntimeError, match=rf"\[Merge LoRAs\] {message}"):
        merge(sd15, name)
    with pytest.raises(RuntimeError, match=rf"\[Resize LoRA\] {message}"):
        ResizeLora().execute(LORA, "fixed", 2, 0.9, "fp16", name, False)


def test_train_name_leaves_room_for_its_step_files(sd15, dataset_dir):
    dataset, _ = make_dataset(sd15)
    with pytest.raises(
        RuntimeError, match=r"\[Train LoRA\] `output_name` is 210 bytes long.*-step0000000000"
    ):
        train(sd15, dataset, output_name="t" * 210)


def test_merged_file_has_the_umask_mode(sd15, lora, loras_dir):
    mask = os.umask(0o022)
    os.umask(mask)
    merge(sd15, "mode_check")
    assert (loras_dir / "mode_check.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask


@pytest.mark.parametrize("node", ["merge", "resize"])
def test_requeued_node_runs_again_only_when_its_file_is_gone(sd15, lora, loras_dir, node):
    name = f"requeue_{node}"
    path = loras_dir / f"{name}.safetensors"
    cls = MergeLoras if node == "merge" else ResizeLora

    def run():
        if node == "merge":
            return merge(sd15, name)
        return ResizeLora().execute(LORA, "fixed", 2, 0.9, "fp16", name, False)

    first = cls.IS_CHANGED(output_name=name)
    run()
    assert cls.IS_CHANGED(output_name=name) == first, "an intact file must keep the cached result"
    path.unlink()
    second = cls.IS_CHANGED(output_name=name)
    assert second != first
    run()
    assert path.exists() and cls.IS_CHANGED(output_name=name) == second
    assert cls.IS_CHANGED(output_name="bad/name") == "invalid name"
    merge_nodes.WRITTEN.written.pop(str(path), None)


# --- training faults ----------------------------------------------------------------------


def test_damaged_final_state_resumes_from_the_step_before_with_a_note(sd15, dataset_dir, loras_dir):
    dataset, _ = make_dataset(sd15)
    train(sd15, dataset, output_name="damaged", steps=4, save_every=2, keep_last=0)
    state = loras_dir / "damaged" / "damaged.trainstate"
    state.write_bytes(state.read_bytes()[:100])
    out = train(sd15, dataset, output_name="damaged", steps=6, save_every=2, keep_last=0, existing="resume")
    text = out["ui"]["text"][0]
    assert "6 steps" in text
    assert "note: training state damaged.trainstate is damaged (SafetensorError" in text
    assert "resumed from damaged-step000002.trainstate.json (step 2) instead" in text


@pytest.mark.timeout(300)
def test_cancel_inside_gradient_accumulation_stops_within_the_micro_step(
    sd15, dataset_dir, loras_dir, monkeypatch
):
    dataset, _ = make_dataset(sd15)
    calls = {"n": 0}
    real = train_bridge.noise_predictor

    def predictor(model):
        inner = real(model)

        def predict(x, t, cond):
            calls["n"] += 1
            if calls["n"] == 6:  # step 2, second of its 4 micro-steps: Cancel pressed now
                comfy.model_management.interrupt_current_processing(True)
            return inner(x, t, cond)

        return predict

    monkeypatch.setattr(train_bridge, "noise_predictor", predictor)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            train(sd15, dataset, output_name="cancel_accum", steps=3, grad_accum=4)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert calls["n"] == 6, "micro-steps ran after Cancel"
    folder = loras_dir / "cancel_accum"
    assert json.loads((folder / "cancel_accum-step000001.trainstate.json").read_text())["step"] == 1
    assert not (folder / "cancel_accum.safetensors").exists()


def test_prepare_images_refuses_a_size_that_cannot_fit_in_ram(comfy_base, monkeypatch):
    """Prepare Images checks its target size against free RAM before reading any image: refused below
    the estimate (naming width and height), run at exactly the estimate."""
    from PIL import Image

    from lora_foundry.nodes.prepare import PrepareImages

    source = comfy_base / "input" / "bounds_prepare_src"
    source.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (80, 64), (200, 30, 30)).save(source / "a.png")
    need = budget.image_need(2048, 1024).total

    def run(output: str):
        return PrepareImages().execute(str(source), output, "fixed", 1024, 2048, 1024, "crop")

    monkeypatch.setattr(bridge, "available_memory", lambda *_a, **_k: need - 1)
    with pytest.raises(
        RuntimeError, match=r"\[Prepare Images\] `width` x `height` 2048 x 1024 need at least .*lower"
    ):
        run("bounds_prepare_refused")
    assert not (comfy_base / "input" / "bounds_prepare_refused").exists()
    monkeypatch.setattr(bridge, "available_memory", lambda *_a, **_k: need)
    run("bounds_prepare_fits")
    with Image.open(comfy_base / "input" / "bounds_prepare_fits" / "a.png") as done:
        assert done.size == (2048, 1024)
