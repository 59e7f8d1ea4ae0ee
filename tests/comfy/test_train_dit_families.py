"""Flow-matching training on ComfyUI's own tiny Chroma, Flux.2, Z-Image and Lumina2 models: the
model's own sampling and conditioning drive the run (no pooled vector for Chroma, Flux.2's
guidance and latent channels, Lumina2's text token count from extra_conds), a short run fits fixed
(latent, noise, sigma) triples, and blocks are chosen in the family's own numbering."""

from __future__ import annotations

from types import SimpleNamespace

import comfy.supported_models as sm
import dit_factory
import model_factory
import pytest
import torch
from flow_data import assert_recovered, fixed_triple_losses, planted_recovery, qwen_dataset

from lora_foundry.lora_core.train.dit_blocks import block_of
from lora_foundry.nodes import comfy_bridge_train as train_bridge
from lora_foundry.nodes.train import check_blocks, check_resolution, train_targets

# Z-Image at the width its modulation needs (dit_factory.ZIMAGE_TRAINABLE); Lumina2 (the same
# network without that modulation) builds at the factory's width.
_ZIMAGE = dit_factory.ZIMAGE_TRAINABLE
_LUMINA2 = dit_factory.CONFIGS["zimage"][1] | {"z_image_modulation": False}
_LUMINA2.pop("time_scale")
BUILD = {"zimage": ("ZImage", _ZIMAGE), "lumina2": ("Lumina2", _LUMINA2)}
FAMILIES = ["chroma", "flux2", "zimage", "lumina2", "qwen_image"]
# family -> the block groups of its numbering (tiny models: 2 blocks each, 1 refiner layer)
GROUPS = {
    "chroma": {"double": 2, "single": 2},
    "flux2": {"double": 2, "single": 2},
    "zimage": {"noise_refiner": 1, "context_refiner": 1, "layer": 2},
    "lumina2": {"noise_refiner": 1, "context_refiner": 1, "layer": 2},
    "qwen_image": {"block": 2},
}


# one torch thread: these tiny models train in reproducible order and leave the cores to others
pytestmark = pytest.mark.usefixtures("one_thread")


_MODELS: dict = {}


def family_model(family: str):
    """A tiny MODEL of the family (built once per session)."""
    if family not in _MODELS:
        if family in BUILD:
            cls, config = BUILD[family]
            _MODELS[family] = model_factory._dit_patcher(getattr(sm, cls), dict(config), 0)
        else:
            _MODELS[family] = dit_factory.dit_model(family)
    return _MODELS[family]


def latents(model, n: int, g: torch.Generator) -> torch.Tensor:
    """8x8 latents of 16 channels: what each tiny network takes (Flux.2's real 128 made small)."""
    return torch.randn(n, 16, 8, 8, generator=g)


def conds(n: int, seed: int) -> dict:
    """Text embeddings only: these families take no pooled vector (extra_conds builds the rest)."""
    return {"context": torch.randn(n, 4, 32, generator=torch.Generator().manual_seed(seed))}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_as_flow_model_with_its_block_numbering(family):
    model = family_model(family)
    assert train_bridge.model_objective_kind(model) == "flow"
    counts = {g: n for g, n in GROUPS[family].items()}
    wanted = {(g, n - 1) for g, n in counts.items()}
    spec = ", ".join(f"{g}{n - 1}" for g, n in counts.items())
    assert check_blocks(model, spec) == wanted
    chosen = train_targets(model, "attention", spec)
    assert chosen and {block_of(t.path) for t in chosen} == wanted
    last = next(iter(counts))
    with pytest.raises(ValueError, match=f"past the model's last block.*{last}0-{counts[last] - 1}"):
        check_blocks(model, f"{last}{counts[last]}")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", FAMILIES)
def test_short_run_halves_the_loss_on_fixed_triples(family):
    model = family_model(family)
    g = torch.Generator().manual_seed(2)
    x0 = latents(model, 2, g)
    eps = torch.randn(x0.shape, generator=g)
    losses = fixed_triple_losses(model, x0, eps, conds(2, 1))
    assert losses[-1] < 0.5 * losses[0], losses


# family -> the layer a rank-2 change is planted in: the first MLP projection of the first block,
# whose input (the normed, modulated tokens) spans its width and whose output reaches the model
# output through a per-token activation. (q / k behind QK-norm and a near-uniform softmax of a tiny
# model, or an attention output whose input is nearly the same for all tokens of a sample, left the
# error at 0.5-1.0 after 360 steps: those changes are barely visible in the outputs.)
PLANTED = {
    "chroma": ("lora_unet_double_blocks_0_img_mlp_0", 10),
    "flux2": ("lora_unet_double_blocks_0_img_mlp_0", 6),  # at lr 4e-2; ComfyUI pads its text to 512 tokens
    "zimage": ("lora_unet_layers_0_feed_forward_w3", 6),
    "lumina2": ("lora_unet_layers_0_feed_forward_w3", 6),
    "qwen_image": ("lora_unet_transformer_blocks_0_img_mlp_net_0_proj", 10),
}  # family -> (layer, checkpoints of 30 steps)
# Flux.2's steps cost 7x the others' (576 tokens per sample): a larger learning rate, fewer steps.
# Measured at lr 2e-2: 1.00 0.84 0.63 0.49 0.39 0.32 0.26 ... 0.090 after 12; at 4e-2: 1.00 0.71 0.42
# 0.29 0.21 0.16 0.12 ... 0.084 after 8.
LR = {"flux2": 4e-2}


@pytest.mark.timeout(1500)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.first_leg  # a convergence proof: scripts/run_tests.sh runs it on the first leg
def test_planted_rank2_teacher_change_is_recovered(family):
    """8 latents of 64 tokens each (16x16 at 2x2 patches; Flux.2 packs 1x1, so 8x8): 512 tokens,
    8x the width (64) of the tiny models' layers, 2x Z-Image's 256."""
    model = family_model(family)
    layer, checkpoints = PLANTED[family]
    side = 8 if train_bridge.patch_size(model) == 1 else 16
    errors = planted_recovery(model, layer, conds(8, 4), n=8, side=side, checkpoints=checkpoints,
                              lr=LR.get(family, 2e-2))  # fmt: skip
    print(family, " ".join(f"{e:.3f}" for e in errors))
    assert_recovered(errors)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("family", "name"), [("ltxv", "LTXV"), ("hunyuan_video15", "HunyuanVideo15")])
def test_video_family_is_named_in_the_error(family, name):
    with pytest.raises(
        ValueError, match=rf"^{name} is a model for video \(5-D latents\): Train LoRA trains image"
    ):
        train_bridge.model_objective_kind(dit_factory.dit_model(family))


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("family", "size", "step"), [("flux2", (44, 36), 8), ("zimage", (40, 72), 16)])
def test_resolution_the_family_cannot_take_names_the_nearest(family, size, step):
    """Flux.2 packs 1x1 latent pixels per token (sides: multiples of 8), Z-Image 2x2 (16)."""
    model = family_model(family)
    assert 8 * train_bridge.patch_size(model) == step
    nearest = tuple(step * max(1, int(side / step + 0.5)) for side in size)  # halves round up
    assert all(n % step == 0 and abs(n - s) <= step / 2 for n, s in zip(nearest, size, strict=True))
    dataset = SimpleNamespace(
        samples=[SimpleNamespace(bucket=size)], options=SimpleNamespace(resolution=size[0])
    )
    with pytest.raises(
        ValueError, match=rf"multiples of {step}\); the nearest valid size is {nearest[0]}x{nearest[1]}"
    ):
        check_resolution(dataset, model)
    fine = SimpleNamespace(samples=[SimpleNamespace(bucket=nearest)], options=dataset.options)
    check_resolution(fine, model)  # the size it names is accepted


# Qwen-Image: an image model ComfyUI runs on the Wan (5-D) latent format, an image as one frame.


@pytest.mark.timeout(120)
def test_qwen_image_predictor_is_what_comfyuis_sampler_denoises_with():
    """Train LoRA keeps latents 4-D; the predictor feeds Qwen-Image one frame, as ComfyUI's sampler
    does (comfy.sample.fix_empty_latent_channels), and its output is what apply_model denoises with."""
    model = family_model("qwen_image")
    assert model.model.latent_format.latent_dimensions == 3 and train_bridge.one_frame(model)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    s = torch.tensor([0.3, 0.8])
    b = s[:, None, None, None]
    xs = (1 - b) * x0 + b * eps
    c = conds(2, 3)
    with torch.no_grad():
        v = train_bridge.flow_predictor(model)(xs, s, c)
        denoised = model.model.apply_model(xs.unsqueeze(2), s, c_crossattn=c["context"])
    assert v.shape == xs.shape
    torch.testing.assert_close((xs - b * v).unsqueeze(2), denoised, rtol=1e-5, atol=1e-5)
    # the dataset's 4-D latents get the model's per-channel (5-D) statistics on their one frame
    raw = torch.randn(3, 16, 4, 6, generator=g)
    torch.testing.assert_close(
        train_bridge.latent_transform(model)(raw), model.model.process_latent_in(raw.unsqueeze(2))[:, :, 0]
    )


@pytest.mark.timeout(600)
@pytest.mark.parametrize("targets", ["attention", "attention_ff", "all_linear"])
def test_qwen_image_file_loads_in_core_as_ours(targets, loras_dir, caplog):
    """Train LoRA (the node) on Qwen-Image: names of its transformer_blocks as musubi-tuner writes
    them (lora_unet_transformer_blocks_0_attn_to_q), zero unmatched keys in ComfyUI core's loader,
    and core's patched weights equal those of our Load LoRA (the node's MODEL output)."""
    import comfy.lora
    import comfy.sd
    import safetensors
    import safetensors.torch
    from patch_compare import assert_same, patched
    from train_run import train_model

    model = family_model("qwen_image")
    out = train_model(
        model, qwen_dataset(), output_name=f"qwen_{targets}", targets=targets, blocks="block1", lr=1e-2
    )
    ours, _, lora_name, _ = out["result"]
    path = loras_dir / lora_name
    with safetensors.safe_open(str(path), "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    modules = {k.split(".")[0] for k in keys}
    want = {t.name for t in train_targets(model, targets, "block1")}
    assert modules == want
    assert all(m.startswith("lora_unet_transformer_blocks_1_") for m in modules)
    assert (
        "lora_unet_transformer_blocks_1_attn_to_q" in modules
        and "lora_unet_transformer_blocks_1_attn_add_v_proj" in modules
    )
    assert ("lora_unet_transformer_blocks_1_img_mlp_net_0_proj" in modules) == (targets != "attention")
    assert ("lora_unet_transformer_blocks_1_img_mod_1" in modules) == (targets == "all_linear")
    assert meta["ss_steps"] == "3" and meta["ss_base_model_version"]
    sd = safetensors.torch.load_file(str(path))
    assert any(v.abs().max() > 0 for k, v in sd.items() if "lora_up" in k)
    with caplog.at_level("WARNING"):
        loaded = comfy.lora.load_lora(sd, comfy.lora.model_lora_keys_unet(model.model, {}))
    assert not [r for r in caplog.records if "not loaded" in r.getMessage()]
    assert len(loaded) == len(modules)
    core, _ = comfy.sd.load_lora_for_models(model, None, sd, 1.0, 0.0)
    assert_same(patched(ours), patched(core))
