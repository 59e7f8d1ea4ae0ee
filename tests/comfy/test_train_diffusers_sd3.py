"""Train LoRA's `key_names` 'diffusers' on the tiny SD3 (diffusers has no converter for kohya SD3
LoRAs, so the file is written under diffusers / PEFT names): diffusers' ``lora_state_dict`` reads it
as it is, our Load LoRA and core's loader put the same weights into the model with it as with the
kohya-named file of the same run, and a tiny diffusers SD3 transformer adapts every module with, once
fused, each weight's change equal to the file's B A and to that weight's rows of the kohya file's
change. A family whose key map has no diffusers names (SD1.x) is refused before anything loads; the
default still writes the kohya file it wrote before."""

from __future__ import annotations

import json
import struct

import pytest
import safetensors.torch
import torch
from dit_files import check, core_map
from flow_data import flux_dataset

# one torch thread: the kohya and diffusers runs train the same numbers
pytestmark = pytest.mark.usefixtures("one_thread")

# the tiny diffusers SD3 shaped like model_factory.sd3_model() (depth 2: 2 heads of 64, width 128)
SD3_CONFIG = dict(sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64,
                  num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=128,
                  pooled_projection_dim=64, out_channels=16, pos_embed_max_size=64)  # fmt: skip
TIME_KEYS = ("ss_training_started_at", "ss_training_finished_at")


def run(model, loras_dir, name: str, targets: str, **changes):
    """Train LoRA (the node) on ``model``; returns the path of the file it wrote."""
    import comfy.model_management
    from train_run import TRAIN_ARGS

    from lora_foundry.nodes.train import TrainLora

    settings = {**TRAIN_ARGS, "output_name": name, "targets": targets, "lr": 1e-2, **changes}
    try:
        with torch.inference_mode():  # as ComfyUI runs a graph
            out = TrainLora().execute(model, None, flux_dataset(pooled=64), **settings, unique_id="7")
    finally:
        comfy.model_management.unload_all_models()
    return loras_dir / out["result"][2]


def kohya_changes(kohya: dict, model) -> dict[str, torch.Tensor]:
    """Model weight key -> the kohya file's change of it, (alpha / rank) up down."""
    keys = core_map(model)
    out = {}
    for name in {k.rsplit(".", 1)[0] for k in kohya if k.endswith(".alpha")}:
        down, up = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"]
        out[keys[name]] = float(kohya[f"{name}.alpha"]) / down.shape[0] * (up @ down)
    return out


@pytest.mark.timeout(600)
@pytest.mark.parametrize("targets", ["attention", "all_linear"])
def test_sd3_file_with_diffusers_names_reads_in_diffusers_as_the_kohya_file(sd3, loras_dir, targets):
    import diffusers

    kohya_path = run(sd3, loras_dir, f"sd3_kohya_{targets}", targets)
    path = run(sd3, loras_dir, f"sd3_diffusers_{targets}", targets, key_names="diffusers")
    kohya, ours = (safetensors.torch.load_file(str(p)) for p in (kohya_path, path))
    modules = {k.rsplit(".lora_", 1)[0] for k in ours}
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in ours)  # no alpha: folded into B
    meta = safetensors.safe_open(str(path), "pt").metadata()
    assert (
        json.loads(meta["ss_network_args"])["key_names"] == "diffusers" and meta["ss_network_alpha"] == "4.0"
    )

    read = diffusers.StableDiffusion3Pipeline.lora_state_dict(str(path))
    assert set(read) == set(ours) and all(k.startswith("transformer.") for k in read), sorted(read)[:3]
    assert all(torch.equal(read[k], ours[k]) for k in ours)
    # fused q, k, v are three modules each (and all_linear's modulations, MLPs and embedders one each)
    assert len(modules) > len({k.split(".")[0] for k in kohya})
    assert any(m.endswith(".attn.add_k_proj") for m in modules) and any(
        m.endswith(".attn.to_v") for m in modules
    )
    if targets == "all_linear":  # ComfyUI's map reorders these rows (swap_scale_shift): split by its function
        assert {
            "transformer.norm_out.linear",
            "transformer.transformer_blocks.1.norm1_context.linear",
        } <= modules

    # ours on the diffusers file = core on the kohya file, and core on the diffusers file = ours on kohya
    check(
        sd3,
        loras_dir,
        "sd3",
        ours,
        kohya,
        f"diffusers_names_{targets}",
        "diffusers / SimpleTuner / ai-toolkit",
    )
    check(
        sd3,
        loras_dir,
        "sd3",
        kohya,
        ours,
        f"kohya_names_{targets}",
        "kohya-style (sd-scripts / musubi-tuner)",
    )

    torch.manual_seed(0)
    transformer = diffusers.SD3Transformer2DModel(**SD3_CONFIG)
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    transformer.load_lora_adapter(ours, prefix="transformer", adapter_name="ours")
    adapted = {n for n, m in transformer.named_modules() if hasattr(m, "lora_A") and "ours" in m.lora_A}
    assert {f"transformer.{n}" for n in adapted} == modules
    transformer.fuse_lora(adapter_names=["ours"])
    changes, keys = kohya_changes(kohya, sd3), core_map(sd3)
    untrained = set()
    for module in modules:
        path_in = module.removeprefix("transformer.")
        fused = (
            transformer.get_submodule(path_in).get_base_layer().weight.detach() - before[f"{path_in}.weight"]
        )
        a, b = ours[f"{module}.lora_A.weight"], ours[f"{module}.lora_B.weight"]
        if fused.abs().max() < 1e-6:
            untrained.add(module)
        torch.testing.assert_close(fused, b @ a, rtol=1e-5, atol=1e-6)  # diffusers' scale is 1: no alpha
        # ComfyUI adds function(change) to its rows of the fused weight: that is the kohya file's change
        target = keys[module]
        key, offset, function = (target, None, None) if isinstance(target, str) else (*target, None)[:3]
        want = changes[key] if offset is None else changes[key].narrow(*offset)
        torch.testing.assert_close((function or (lambda x: x))(fused), want, rtol=1e-5, atol=1e-6)
    # every module changed (so the comparisons are not of zeros) but the last block's context query,
    # which gets no gradient: that block's context output is dropped (pre_only), so its q is unused
    assert untrained <= {"transformer.transformer_blocks.1.attn.add_q_proj"}, untrained


def masked(path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    header["__metadata__"].update(dict.fromkeys(TIME_KEYS, "<time>"))
    return header, data[8 + size :]


@pytest.mark.timeout(300)
def test_default_and_explicit_kohya_names_write_the_same_file(sd3, loras_dir):
    first = masked(run(sd3, loras_dir, "sd3_same", "attention"))
    again = run(sd3, loras_dir, "sd3_same", "attention", key_names="kohya")
    assert masked(again) == first
    assert all(k.startswith("lora_unet_joint_blocks_") for k in safetensors.torch.load_file(str(again)))


@pytest.mark.timeout(300)
def test_a_family_without_diffusers_names_is_refused_before_loading(
    sd15, dataset_dir, loras_dir, monkeypatch
):
    """SD1.x: ComfyUI's key map has no transformer. names for a UNet (on 0.3.75 none for Z-Image either;
    0.12 adds them), so the run stops at its plan, before the model is prepared or a file written."""
    from train_run import make_dataset, train

    from lora_foundry.nodes import comfy_bridge_train

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was prepared for training before the refusal")

    dataset, _ = make_dataset(sd15)
    monkeypatch.setattr(comfy_bridge_train, "prepare_for_training", must_not_load)
    with pytest.raises(RuntimeError) as error:
        train(sd15, dataset, output_name="sd15_diffusers_names", key_names="diffusers")
    message = str(error.value)
    assert message.startswith(
        "[Train LoRA] `key_names` 'diffusers': ComfyUI's key map for SD1.x has no diffusers"
    )
    assert "set `key_names` to 'kohya'" in message
    assert not (loras_dir / "sd15_diffusers_names").exists()
