"""Sample images during training on a flow-matching model (tiny Flux dev: guidance-distilled): Train
LoRA's sample_every writes one PNG per N steps through ComfyUI's own sampler, same seed each time;
they change as the LoRA learns, and the last one is what the trained MODEL output samples."""

from __future__ import annotations

from pathlib import Path

import comfy.model_management
import comfy.sd
import numpy as np
import pytest
import torch
from PIL import Image
from train_run import train_model

from lora_foundry.lora_core.train.dataset import DatasetOptions, DatasetScan, LatentDataset, Sample
from lora_foundry.nodes import comfy_bridge_train as train_bridge

PROMPT = "zkw, a red circle"
SEED = 11


@pytest.fixture(scope="module")
def clip_and_vae():
    """A CLIP-L-structured text encoder 32 wide (the tiny Flux's txt_in / vector_in width) and a
    VAE with Flux's 16 latent channels, both tiny with random weights."""
    import model_factory
    from comfy.ldm.models.autoencoder import AutoencoderKL

    sizes = model_factory.Sizes(model_channels=32, heads=2, clip_l_hidden=32, clip_l_layers=2, vae_ch=32)
    clip = model_factory.build("sd15", sizes, seed=5).clip
    params = model_factory.vae_config(32)
    params = {"embed_dim": 16, "ddconfig": {**params["ddconfig"], "z_channels": 16}}
    module = AutoencoderKL(**params)
    model_factory.randomize_(module, 6)
    vae = comfy.sd.VAE(sd=module.state_dict(), config={"params": params})
    return clip, vae


def dataset(clip) -> LatentDataset:
    g = torch.Generator().manual_seed(0)
    samples, conds = [], {}
    for i in range(3):
        caption = f"zkw, item {i}"
        samples.append(Sample(torch.randn(16, 8, 8, generator=g), None, (64, 64), caption, 1))
        with torch.no_grad():
            context, pooled = clip.encode_from_tokens(clip.tokenize(caption), return_pooled=True)
        conds[caption] = {"context": context, "pooled": pooled}
    scan = DatasetScan(folder=Path("synthetic"), entries=(), problems=(), without_caption=0)
    ds = LatentDataset(samples, DatasetOptions(resolution=64, flip=False), scan)
    ds.conds = conds
    return ds


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


@pytest.mark.timeout(600)
def test_flux_samples_change_with_the_lora_and_match_the_trained_model(flux, clip_and_vae, comfy_base):
    clip, vae = clip_and_vae
    name = "flux_samples"
    out = train_model(flux, dataset(clip), clip=clip, output_name=name, steps=3, lr=2e-2, vae=vae,
                      sample_every=1, sample_prompt=PROMPT, sample_seed=SEED, unique_id="4")  # fmt: skip
    try:
        folder = comfy_base / "output" / "lora_foundry" / "samples" / name
        files = sorted(folder.glob("*.png"))
        assert [f.name for f in files] == [f"step_{s:06d}.png" for s in (1, 2, 3)]
        images = [pixels(f) for f in files]
        assert all(im.shape == (64, 64, 3) for im in images)
        assert all(im.std() > 0 for im in images), "a sample is one flat colour"
        for a, b in zip(images, images[1:], strict=False):
            assert np.abs(a - b).max() > 0, (
                "two samples with the same seed are equal: the LoRA changed nothing"
            )

        # Same prompt, seed and settings on the node's MODEL output (the saved file applied through
        # Load LoRA's path, no training hooks): the picture of the last step again.
        trained = out["result"][0]
        with torch.inference_mode():
            again = train_bridge.sampler(trained, clip, vae, PROMPT, SEED, 64, 64)()
        again = (again[0].clamp(0, 1).numpy() * 255).round().astype(np.int16)
        assert np.abs(again - images[-1]).max() <= 2
        # ... and the base model alone samples a different picture.
        with torch.inference_mode():
            base = train_bridge.sampler(flux, clip, vae, PROMPT, SEED, 64, 64)()
        base = (base[0].clamp(0, 1).numpy() * 255).round().astype(np.int16)
        assert np.abs(base - images[-1]).max() > 2
    finally:
        comfy.model_management.unload_all_models()


def test_flux_samples_use_the_guidance_in_the_conditioning_and_cfg_1(flux, clip_and_vae, monkeypatch):
    """The guidance-distilled model is sampled as ComfyUI's Flux templates do: CFG 1, FluxGuidance's
    guidance in the positive conditioning, the 'simple' scheduler, 16-channel latents."""
    import comfy.sample

    clip, vae = clip_and_vae
    seen = {}
    real = comfy.sample.sample

    def spy(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent, **kw):
        seen.update(cfg=cfg, scheduler=scheduler, guidance=positive[0][1].get("guidance"), shape=latent.shape)
        return real(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent, **kw)

    monkeypatch.setattr(comfy.sample, "sample", spy)
    try:
        with torch.inference_mode():
            train_bridge.sampler(flux, clip, vae, PROMPT, SEED, 64, 64, steps=2)()
    finally:
        comfy.model_management.unload_all_models()
    assert seen == {"cfg": 1.0, "scheduler": "simple", "guidance": 3.5, "shape": (1, 16, 8, 8)}
