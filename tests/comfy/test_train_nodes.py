"""Train LoRA and LoRA Training Dataset on tiny in-process SD1.5 / SDXL models, run as ComfyUI runs
nodes (inside torch.inference_mode): the saved file loads in our Load LoRA and in core's loader
with zero unmatched keys and equal weights, the outputs carry the LoRA, interrupt and NaN stop."""

from __future__ import annotations

import json

import comfy.lora
import comfy.model_management
import comfy.sd
import pytest
import safetensors
import safetensors.torch
import torch
from patch_compare import assert_same, patched
from PIL import Image
from train_run import DATASET_ARGS, make_dataset, train

from lora_foundry.nodes import comfy_bridge as bridge
from lora_foundry.nodes import comfy_bridge_train as train_bridge
from lora_foundry.nodes.train import LoraTrainingDataset, TrainLora, model_targets

# one torch thread: these tiny models train in reproducible order and leave the cores to others
pytestmark = pytest.mark.usefixtures("one_thread")


def test_dataset_node_reads_folder_and_repeat_subfolder(sd15, dataset_dir):
    dataset, summary = make_dataset(sd15)
    assert dataset.num_images == 3
    assert sorted(s.repeats for s in dataset.samples) == [1, 1, 3]
    assert {s.bucket for s in dataset.samples} == {(64, 64)}  # 64 px: only the square bucket fits
    assert "notes" in summary and "N_name" in summary
    assert set(dataset.conds) == {"zkw, red, square, outdoors", "zkw, blue, circle", "zkw, green, tall"}
    assert dataset.dataset_dirs() == {
        "train_set": {"n_repeats": 1, "img_count": 2},
        "3_extra": {"n_repeats": 3, "img_count": 1},
    }
    assert all(not s.latent.is_inference() for s in dataset.samples)


def test_dataset_folder_is_left_unchanged_and_disk_cache_reused(sd15, dataset_dir, comfy_base):
    before = {p: p.stat().st_mtime_ns for p in dataset_dir.rglob("*")}
    first, _ = make_dataset(sd15, cache="disk", flip=True, crop="random")
    cache = comfy_base / "output" / "lora_foundry_cache"
    files = sorted(cache.glob("*.safetensors"))
    assert len(files) == 3 + 3  # one per image, one per caption
    mtimes = [f.stat().st_mtime_ns for f in files]
    second, _ = make_dataset(sd15, cache="disk", flip=True, crop="random")
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    for a, b in zip(first.samples, second.samples, strict=True):
        assert torch.equal(a.latent, b.latent) and torch.equal(a.latent_flipped, b.latent_flipped)
    assert {p: p.stat().st_mtime_ns for p in dataset_dir.rglob("*")} == before


def test_missing_folder_error_names_node_and_field(sd15, comfy_base):
    with pytest.raises(RuntimeError, match=r"\[LoRA Training Dataset\] `folder` .*nope.* is not a folder"):
        make_dataset(sd15, folder="nope")


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_trained_file_loads_in_ours_and_core_with_equal_weights(
    request, family, dataset_dir, loras_dir, caplog
):
    models = request.getfixturevalue(family)
    dataset, _ = make_dataset(models)
    out = train(models, dataset, output_name=f"tiny_{family}", te_lr=1e-3, targets="attention_ff")
    model, clip, lora_name, curve = out["result"]
    assert lora_name == f"tiny_{family}/tiny_{family}.safetensors"
    path = loras_dir / lora_name
    assert curve.shape[0] == 1 and curve.shape[-1] == 3 and curve.dtype == torch.float32
    with safetensors.safe_open(str(path), "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    te_prefix = ("lora_te1_", "lora_te2_") if family == "sdxl" else ("lora_te_",)
    # kohya's names: diffusers-style paths for SD1.5, the SGM paths sd-scripts trains SDXL on
    unet_prefix = "lora_unet_input_blocks_" if family == "sdxl" else "lora_unet_down_blocks_"
    assert any(k.startswith(unet_prefix) for k in keys)
    assert not any(
        k.startswith(("lora_unet_down_blocks_", "lora_unet_input_blocks_")) and not k.startswith(unet_prefix)
        for k in keys
    )
    assert any(k.startswith(te_prefix) for k in keys)
    assert json.loads(meta["ss_tag_frequency"])["train_set"]["zkw"] == 2
    assert meta["ss_base_model_version"] == ("sdxl_base_v1-0" if family == "sdxl" else "sd_v1")
    assert meta["ss_steps"] == "3" and meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    sd = safetensors.torch.load_file(str(path))
    assert any(v.abs().max() > 0 for k, v in sd.items() if "lora_up" in k)
    key_map = {**comfy.lora.model_lora_keys_unet(models.model.model, {}),
               **comfy.lora.model_lora_keys_clip(models.clip.cond_stage_model, {})}  # fmt: skip
    with caplog.at_level("WARNING"):
        loaded = comfy.lora.load_lora(sd, key_map)
    assert not [r for r in caplog.records if "not loaded" in r.getMessage()]
    assert len(loaded) == len([k for k in keys if k.endswith(".lora_up.weight")])
    core_model, core_clip = comfy.sd.load_lora_for_models(models.model, models.clip, sd, 1.0, 1.0)
    assert_same(patched(model), patched(core_model))
    assert_same(patched(clip), patched(core_clip))
    assert "NOT applied" not in out["ui"]["text"][0]


def test_output_model_predicts_what_training_saw(sd15, dataset_dir):
    """The trained hooks and the saved, loaded file give the same noise prediction."""
    dataset, _ = make_dataset(sd15)
    model, _, lora_name, _ = train(
        sd15, dataset, output_name="same_effect", dora=True, targets="all_linear_conv"
    )["result"]
    from lora_foundry.lora_core.train.network import LoraNetwork, select_targets

    sd = safetensors.torch.load_file(str(bridge.lora_path(lora_name)))
    assert any(k.endswith(".dora_scale") for k in sd)
    targets = select_targets(model_targets(sd15.model), "all_linear_conv")
    net = LoraNetwork(targets, rank=4, alpha=2.0, dora=True)
    with torch.no_grad():
        for name, b in net.branches.items():
            b.up.copy_(sd[f"{name}.lora_up.weight"])
            b.down.copy_(sd[f"{name}.lora_down.weight"])
            b.magnitude.copy_(sd[f"{name}.dora_scale"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    t = torch.tensor([500])
    cond = {"context": torch.randn(1, 77, 64, generator=g)}
    predict = train_bridge.noise_predictor(sd15.model)
    with torch.no_grad():
        net.attach()
        hooked = predict(x, t, cond)
        net.detach()
        comfy.model_management.load_models_gpu([model], force_full_load=True)
        loaded = train_bridge.noise_predictor(model)(x, t, cond)
        comfy.model_management.unload_all_models()
    torch.testing.assert_close(loaded, hooked, atol=1e-4, rtol=1e-4)


def test_base_model_untouched_and_step_zero_identity(sd15, dataset_dir):
    before = {k: v.clone() for k, v in sd15.model.model.state_dict().items()}
    dataset, _ = make_dataset(sd15)
    train(sd15, dataset, output_name="untouched", steps=1)
    comfy.model_management.unload_all_models()
    after = sd15.model.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m._forward_hooks for m in sd15.model.model.modules())
    assert not any("forward" in m.__dict__ for m in sd15.model.model.modules())


def test_events_progress_and_interrupt_saves_checkpoint(sd15, dataset_dir, loras_dir, monkeypatch):
    events = []
    monkeypatch.setattr(train_bridge, "send_event", events.append)
    dataset, _ = make_dataset(sd15)
    real = bridge.progress

    def progress(total):
        step = real(total)

        def on(done, _total=None):
            if done == 2:
                comfy.model_management.interrupt_current_processing(True)
            step(done)

        return on

    monkeypatch.setattr(bridge, "progress", progress)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        train(sd15, dataset, output_name="cancelled", steps=10)
    comfy.model_management.interrupt_current_processing(False)
    assert [e["step"] for e in events] == [1, 2]
    assert set(events[0]) == {"node", "step", "total", "loss", "lr", "eta_s"} and events[0]["node"] == "7"
    folder = loras_dir / "cancelled"
    assert (folder / "cancelled-step000002.safetensors").exists()
    monkeypatch.setattr(bridge, "progress", real)
    out = train(sd15, dataset, output_name="cancelled", steps=3, existing="resume")
    assert "3 steps" in out["ui"]["text"][0]
    assert out["ui"]["lora_written"] == [out["result"][2]], "the frontend refreshes its lists on this key"


def test_nan_stops_with_clear_message(sd15, dataset_dir, loras_dir):
    dataset, _ = make_dataset(sd15)
    # Step 1 at lr 1e30 makes the LoRA weights huge, so step 2's loss is not finite.
    with pytest.raises(
        RuntimeError, match=r"\[Train LoRA\] the loss became (nan|inf) at step 2.*no checkpoint"
    ):
        train(sd15, dataset, output_name="exploding", lr=1e30, steps=4, optimizer="SGD")
    assert not (loras_dir / "exploding" / "exploding.safetensors").exists()


def test_existing_error_and_optional_optimizer_message(sd15, dataset_dir, monkeypatch):
    dataset, _ = make_dataset(sd15)
    train(sd15, dataset, output_name="twice", steps=1)
    with pytest.raises(
        RuntimeError, match=r"\[Train LoRA\] .*already has .* set `existing` to 'resume' or 'overwrite'"
    ):
        train(sd15, dataset, output_name="twice", steps=1, existing="error")
    from lora_foundry.lora_core.train import optim

    def missing(name):
        raise ImportError(name)

    monkeypatch.setattr(optim.importlib, "import_module", missing)
    with pytest.raises(
        RuntimeError,
        match=r"\[Train LoRA\] optimizer Prodigy needs the package 'prodigyopt'.*pip install prodigyopt",
    ):
        train(sd15, dataset, output_name="prodigy", optimizer="Prodigy")


def test_every_input_has_a_tooltip():
    for cls in (LoraTrainingDataset, TrainLora):
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, value in spec.get(section, {}).items():
                assert value[1].get("tooltip"), f"{cls.__name__}.{name} has no tooltip"
        assert cls.CATEGORY == "LoRA Foundry/training" and cls.DESCRIPTION


def test_models_loaded_inside_inference_mode_train(dataset_dir):
    """ComfyUI's loaders run inside torch.inference_mode, so real weights are inference tensors."""
    import model_factory

    with torch.inference_mode():
        models = model_factory.build("sd15", seed=3)
    dataset, _ = make_dataset(models)
    out = train(models, dataset, output_name="inference_loaded", te_lr=1e-3, steps=2, dora=True)
    assert "2 steps" in out["ui"]["text"][0]


def test_sample_images_every_n_steps(sd15, dataset_dir, comfy_base):
    dataset, _ = make_dataset(sd15)
    samples = comfy_base / "output" / "lora_foundry" / "samples" / "sampled_run"
    train(sd15, dataset, output_name="sampled_run", steps=4, vae=sd15.vae, sample_every=2,
          sample_prompt="zxq, a test", sample_seed=5)  # fmt: skip
    files = sorted(p.name for p in samples.iterdir())
    assert files == ["step_000002.png", "step_000004.png"]

    first = Image.open(samples / files[0])
    assert first.size == (DATASET_ARGS["resolution"], DATASET_ARGS["resolution"])


def test_sample_every_without_vae_is_a_named_error(sd15, dataset_dir):
    dataset, _ = make_dataset(sd15)
    with pytest.raises(RuntimeError, match=r"\[Train LoRA\].*sample_every.*vae"):
        train(sd15, dataset, output_name="no_vae", steps=2, sample_every=1)


def test_sampling_does_not_change_the_training(sd15, dataset_dir, loras_dir):
    from safetensors.torch import load_file

    dataset, _ = make_dataset(sd15)
    train(sd15, dataset, output_name="plain_run", steps=4)
    train(sd15, dataset, output_name="sampled_twin", steps=4, vae=sd15.vae, sample_every=1, sample_prompt="x")
    plain = load_file(str(loras_dir / "plain_run" / "plain_run.safetensors"))
    sampled = load_file(str(loras_dir / "sampled_twin" / "sampled_twin.safetensors"))
    assert plain.keys() == sampled.keys()
    for k in plain:
        assert torch.equal(plain[k], sampled[k]), k
