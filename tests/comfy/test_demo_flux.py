"""The demo Flux that set-up writes (scripts/make_demo_models.py): ComfyUI's own loaders read it as
Flux dev (not Schnell, not Chroma) with CLIP-L's 768-wide text and vector inputs, its VAE as a
16-channel Flux-style VAE, and a sampler step conditioned by the demo CLIP-L file (the demo
checkpoint's own text encoder, the same encodings) runs."""

from __future__ import annotations

import gc

import comfy.model_management
import comfy.sample
import comfy.sd
import comfy.utils
import make_demo_models
import pytest
import torch
from job_run import COMFY_DIR, DEMO

PROMPT = "a red circle"


def demo_file(*parts: str):
    path = COMFY_DIR.joinpath("models", *parts)
    if not path.exists():
        pytest.fail(f"{path} is missing: run scripts/make_demo_models.py --comfyui {COMFY_DIR}")
    return path


@pytest.mark.timeout(900)
def test_demo_flux_loads_as_flux_dev_and_samples_with_the_demo_clip():
    flux_path = demo_file("diffusion_models", make_demo_models.DEMO_FLUX)
    vae_path = demo_file("vae", make_demo_models.DEMO_FLUX_VAE)
    clip_path = demo_file("text_encoders", make_demo_models.DEMO_CLIP_L)
    ckpt_path = demo_file("checkpoints", DEMO)
    try:
        model = comfy.sd.load_diffusion_model(str(flux_path))  # what UNETLoader calls
        assert type(model.model.model_config).__name__ == "Flux"
        params = model.model.diffusion_model.params
        assert params.guidance_embed and params.context_in_dim == 768 and params.vec_in_dim == 768
        assert (params.depth, params.depth_single_blocks) == (1, 1)
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(vae_path)))  # what VAELoader calls
        assert vae.latent_channels == 16
        # what CLIPLoader (type stable_diffusion) calls
        clip = comfy.sd.load_clip([str(clip_path)], clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)
        _, ckpt_clip, _ = comfy.sd.load_checkpoint_guess_config(str(ckpt_path), output_vae=False)[:3]
        with torch.inference_mode():
            cond, pooled = clip.encode_from_tokens(clip.tokenize(PROMPT), return_pooled=True)
            assert cond.shape[-1] == 768 and pooled.shape[-1] == 768
            ckpt_cond, ckpt_pooled = ckpt_clip.encode_from_tokens(
                ckpt_clip.tokenize(PROMPT), return_pooled=True
            )
            assert torch.equal(cond, ckpt_cond) and torch.equal(pooled, ckpt_pooled)
            del ckpt_clip
            latent = torch.zeros(1, 16, 8, 8)
            noise = comfy.sample.prepare_noise(latent, 1)
            positive = [[cond, {"pooled_output": pooled, "guidance": 3.5}]]
            out = comfy.sample.sample(model, noise, 1, 1.0, "euler", "simple", positive, positive, latent,
                                      seed=1, disable_pbar=True)  # fmt: skip
            image = vae.decode(out)
        assert out.shape == (1, 16, 8, 8) and torch.isfinite(out).all()
        assert image.shape == (1, 64, 64, 3) and image.std() > 0
    finally:
        comfy.model_management.unload_all_models()
        gc.collect()
