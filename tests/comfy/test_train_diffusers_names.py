"""Train LoRA's `key_names` 'diffusers' on the tiny SD3, Flux, Flux.2, Chroma, Qwen-Image and Z-Image (diffusers has
no converter for kohya SD3 LoRAs, so for SD3 the file is written under diffusers / PEFT names; for
the others it is the option beside the kohya default): diffusers' ``lora_state_dict`` reads it as it
is, our Load LoRA and core's loader put the same weights into the model with it as with the
kohya-named file of the same run, and a tiny diffusers transformer of the family adapts every
module with, once fused, each weight's change equal to the file's B A and to that weight's rows of
the kohya file's change (Flux: q, k, v and the MLP input as rows of a single block's fused
linear1). A family whose key map has no diffusers names (SD1.x; Z-Image before ComfyUI 0.12) is
refused before anything is written; the default still writes the kohya file it wrote before."""

from __future__ import annotations

import json
import struct

import pytest
import safetensors.torch
import torch
from dit_files import check, core_map, trained_model
from flow_data import flux_dataset, qwen_dataset
from train_run import train_model

# one torch thread: the kohya and diffusers runs train the same numbers
pytestmark = pytest.mark.usefixtures("one_thread")

# family -> (pooled width of the data (None: Qwen-style data without one), modules the file must name,
# modules that may get no gradient); the tiny diffusers twins: dit_peer.trained_peer
FAMILIES = {
    "sd3": (64,
            {"attention": {"transformer.transformer_blocks.0.attn.add_k_proj", "transformer.transformer_blocks.1.attn.to_v"},
             # ComfyUI's map reorders these rows (swap_scale_shift): split by its function
             "all_linear": {"transformer.norm_out.linear", "transformer.transformer_blocks.1.norm1_context.linear"}},
            # the last block's context query gets no gradient: that block's context output is dropped
            # (pre_only), so its q is unused
            {"transformer.transformer_blocks.1.attn.add_q_proj"}),
    "flux": (32,
             {"attention": {"transformer.transformer_blocks.0.attn.add_k_proj", "transformer.single_transformer_blocks.1.attn.to_v"},
              "all_linear": {"transformer.single_transformer_blocks.0.proj_mlp", "transformer.norm_out.linear",
                             "transformer.transformer_blocks.1.norm1.linear"}},
             set()),
    # only attention: the tiny Z-Image's feed-forward is wider in ComfyUI than in diffusers (dit_peer)
    "zimage": (None,
               {"attention": {"transformer.layers.1.attention.to_k", "transformer.noise_refiner.0.attention.to_out.0"}},
               set()),
    "qwen_image": (None,
                   {"attention": {"transformer.transformer_blocks.0.attn.add_k_proj", "transformer.transformer_blocks.1.attn.to_v"},
                    "all_linear": {"transformer.transformer_blocks.0.img_mlp.net.0.proj", "transformer.transformer_blocks.1.txt_mlp.net.2"}},
                   # the last block's text output is dropped, so its text query, output and MLP get no gradient
                   {f"transformer.transformer_blocks.1.{m}" for m in ("attn.add_q_proj", "attn.to_add_out", "txt_mlp.net.0.proj",
                                                                      "txt_mlp.net.2")}),
    # Flux.2's own names where ComfyUI's map also gives Flux.1's for the same rows (a single block's
    # fused attn.to_qkv_mlp_proj and attn.to_out, the MLPs' linear_in / linear_out)
    "flux2": (None,
              {"attention": {"transformer.single_transformer_blocks.1.attn.to_qkv_mlp_proj",
                             "transformer.single_transformer_blocks.0.attn.to_out", "transformer.transformer_blocks.0.attn.add_k_proj"},
               "all_linear": {"transformer.transformer_blocks.1.ff.linear_in", "transformer.transformer_blocks.0.ff_context.linear_out"}},
              set()),
    # Chroma is Flux.1 without per-block modulations: Flux.1's names
    "chroma": (None,
               {"attention": {"transformer.single_transformer_blocks.1.proj_mlp", "transformer.transformer_blocks.0.attn.add_k_proj"},
                "all_linear": {"transformer.transformer_blocks.1.ff.net.0.proj", "transformer.single_transformer_blocks.0.proj_out"}},
               set()),
}  # fmt: skip
CASES = [("sd3", "attention"), ("sd3", "all_linear"), ("flux", "attention"), ("flux", "all_linear"),
         ("zimage", "attention"), ("qwen_image", "attention"), ("qwen_image", "all_linear"),
         ("flux2", "attention"), ("flux2", "all_linear"), ("chroma", "attention"), ("chroma", "all_linear")]  # fmt: skip
# Flux.2's modulations and Chroma's distilled guidance layer are shared by all blocks and have no
# diffusers name in ComfyUI's map: all_linear trains the blocks only there (the refusal with them: below)
BLOCKS = {("flux2", "all_linear"): "double0-1,single0-1", ("chroma", "all_linear"): "double0-1,single0-1"}
TIME_KEYS = ("ss_training_started_at", "ss_training_finished_at")


def run(model, loras_dir, name: str, targets: str, pooled: int | None = 64, **changes):
    """Train LoRA (the node) on ``model``; returns the path of the file it wrote."""
    with torch.inference_mode():  # as ComfyUI's dataset node makes them
        data = qwen_dataset() if pooled is None else flux_dataset(pooled=pooled)
    out = train_model(model, data, output_name=name, targets=targets, lr=1e-2, **changes)
    return loras_dir / out["result"][2]


def kohya_changes(kohya: dict, model) -> dict[str, torch.Tensor]:
    """Model weight key -> the kohya file's change of it, (alpha / rank) up down."""
    keys = core_map(model)
    out = {}
    for name in {k.rsplit(".", 1)[0] for k in kohya if k.endswith(".alpha")}:
        down, up = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"]
        out[keys[name]] = float(kohya[f"{name}.alpha"]) / down.shape[0] * (up @ down)
    return out


def tiny_model(request, family: str):
    """The session's tiny SD3 / Flux (conftest), else the tiny model the family trains in the tests."""
    return request.getfixturevalue(family) if family in ("sd3", "flux") else trained_model(family)


def refusal(model, family: str) -> str | None:
    """What the refusal says where ComfyUI's map lacks the family's own diffusers names (0.3.75: any
    for Z-Image; Flux.2's, so a single block's linear1 has only Flux.1's split names, which do not
    cover its rows), else None."""
    names = core_map(model)
    if family == "zimage" and not any(k.startswith("transformer.") for k in names):
        return r"key map for Z-Image has no diffusers name"
    if family == "flux2" and not any(k.endswith(".attn.to_qkv_mlp_proj") for k in names):
        return r"names of Flux.2's lora_unet_single_blocks_0_linear1 .* do not cover its \d+ rows once each"
    return None


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("family", "targets"), CASES)
def test_file_with_diffusers_names_reads_in_diffusers_as_the_kohya_file(request, loras_dir, family, targets):
    import diffusers
    import dit_peer

    pooled, named, may_stay = FAMILIES[family]
    cls_name, config, pipe = dit_peer.trained_peer(family)
    model = tiny_model(request, family)
    if (refused := refusal(model, family)) is not None:
        with pytest.raises(RuntimeError, match=refused + ".*set `key_names` to 'kohya'"):
            run(model, loras_dir, f"{family}_no_names", targets, pooled, key_names="diffusers")
        assert not (loras_dir / f"{family}_no_names").exists()
        return
    blocks = BLOCKS.get((family, targets), "")
    kohya_path = run(model, loras_dir, f"{family}_kohya_{targets}", targets, pooled, blocks=blocks)
    path = run(
        model,
        loras_dir,
        f"{family}_diffusers_{targets}",
        targets,
        pooled,
        blocks=blocks,
        key_names="diffusers",
    )
    kohya, ours = (safetensors.torch.load_file(str(p)) for p in (kohya_path, path))
    modules = {k.rsplit(".lora_", 1)[0] for k in ours}
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in ours)  # no alpha: folded into B
    meta = safetensors.safe_open(str(path), "pt").metadata()
    assert (
        json.loads(meta["ss_network_args"])["key_names"] == "diffusers" and meta["ss_network_alpha"] == "4.0"
    )

    read = getattr(diffusers, pipe).lora_state_dict(str(path))
    read = read[0] if isinstance(read, tuple) else read
    assert set(read) == set(ours) and all(k.startswith("transformer.") for k in read), sorted(read)[:3]
    assert all(torch.equal(read[k], ours[k]) for k in ours)
    # fused q, k, v are three modules each (Flux's single-block linear1 four, with the MLP input)
    assert len(modules) >= len({k.split(".")[0] for k in kohya})
    assert named[targets] <= modules, sorted(named[targets] - modules)

    # ours on the diffusers file = core on the kohya file, and core on the diffusers file = ours on kohya
    check(model, loras_dir, family, ours, kohya, f"diffusers_names_{targets}",
          "diffusers / SimpleTuner / ai-toolkit")  # fmt: skip
    check(model, loras_dir, family, kohya, ours, f"kohya_names_{targets}",
          "kohya-style (sd-scripts / musubi-tuner)")  # fmt: skip

    torch.manual_seed(0)
    transformer = getattr(diffusers, cls_name)(**config)
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    transformer.load_lora_adapter(ours, prefix="transformer", adapter_name="ours")
    adapted = {n for n, m in transformer.named_modules() if hasattr(m, "lora_A") and "ours" in m.lora_A}
    assert {f"transformer.{n}" for n in adapted} == modules
    transformer.fuse_lora(adapter_names=["ours"])
    changes, keys = kohya_changes(kohya, model), core_map(model)
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
    # every module changed (so the comparisons are not of zeros) but those named as getting no gradient
    assert untrained <= may_stay, untrained


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


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("family", "shared"), [("flux2", "_modulation_"), ("chroma", "_distilled_guidance_layer_")]
)
def test_shared_layers_without_diffusers_names_are_refused(loras_dir, family, shared):
    """all_linear on Flux.2 / Chroma takes the layers all blocks share (Flux.2's modulations, Chroma's
    distilled guidance layer), which ComfyUI's map names only in kohya form: the run stops at its
    plan, naming them, the option and both fixes."""
    model = trained_model(family)
    if refusal(model, family) is not None:
        pytest.skip("ComfyUI before 0.12 refuses Flux.2's diffusers names at linear1 first (tested above)")
    with pytest.raises(RuntimeError) as error:
        run(model, loras_dir, f"{family}_shared", "all_linear", None, key_names="diffusers")
    message = str(error.value)
    label = {"flux2": "Flux.2", "chroma": "Chroma"}[family]
    assert f"key map for {label} has no diffusers name" in message and shared in message
    assert "set `key_names` to 'kohya'" in message and "choose targets / blocks" in message
    assert not (loras_dir / f"{family}_shared").exists()
