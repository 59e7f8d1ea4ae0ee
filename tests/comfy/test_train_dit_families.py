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
from flow_data import fixed_triple_losses

from lora_foundry.lora_core.train.dit_blocks import block_of
from lora_foundry.nodes import comfy_bridge_train as train_bridge
from lora_foundry.nodes.train import check_blocks, check_resolution, train_targets

# ComfyUI's Z-Image modulation reads a 256-wide timestep embedding, so its width must be >= 256;
# Lumina2 (the same network without that modulation) builds at the factory's width.
_ZIMAGE = dit_factory.CONFIGS["zimage"][1] | {"dim": 256, "axes_dims": [32, 48, 48]}
_LUMINA2 = dit_factory.CONFIGS["zimage"][1] | {"z_image_modulation": False}
_LUMINA2.pop("time_scale")
BUILD = {"zimage": ("ZImage", _ZIMAGE), "lumina2": ("Lumina2", _LUMINA2)}
FAMILIES = ["chroma", "flux2", "zimage", "lumina2"]
# family -> the block groups of its numbering (tiny models: 2 blocks each, 1 refiner layer)
GROUPS = {
    "chroma": {"double": 2, "single": 2},
    "flux2": {"double": 2, "single": 2},
    "zimage": {"noise_refiner": 1, "context_refiner": 1, "layer": 2},
    "lumina2": {"noise_refiner": 1, "context_refiner": 1, "layer": 2},
}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
