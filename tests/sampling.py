"""One real KSampler step on the tiny in-process models, and the comparison bypass-mode tests make."""

from __future__ import annotations

import torch


def sd15_conds(seed: int = 0):
    """(positive, negative, empty latent) for the tiny SD1.5 (context width 64)."""
    g = torch.Generator().manual_seed(seed)
    positive = [[torch.randn(1, 77, 64, generator=g), {}]]
    negative = [[torch.randn(1, 77, 64, generator=g), {}]]
    return positive, negative, torch.zeros(1, 4, 8, 8)


def flux_conds(seed: int = 0):
    """(positive, negative, empty latent) for the tiny Flux (context 32, pooled 32, guidance)."""
    g = torch.Generator().manual_seed(seed)

    def cond():
        return [[torch.randn(1, 8, 32, generator=g), {"pooled_output": torch.randn(1, 32, generator=g),
                                                      "guidance": 3.5}]]  # fmt: skip

    return cond(), cond(), torch.zeros(1, 16, 8, 8)


def wan_conds(seed: int = 0):
    """(positive, negative, empty latent) for the tiny Wan (text width 32, one latent frame)."""
    g = torch.Generator().manual_seed(seed)
    positive = [[torch.randn(1, 8, 32, generator=g), {}]]
    negative = [[torch.randn(1, 8, 32, generator=g), {}]]
    return positive, negative, torch.zeros(1, 16, 1, 8, 8)


def sample(model, positive, negative, latent, steps: int = 1, denoise: float = 1.0) -> torch.Tensor:
    """A real KSampler run (euler, CFG 2): ComfyUI loads the model as a graph would, bypass hooks included."""
    import comfy.sample

    noise = comfy.sample.prepare_noise(latent, 7)
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        out = comfy.sample.sample(model, noise, steps, 2.0, "euler", "normal", positive, negative, latent,
                                  denoise=denoise, seed=7, disable_pbar=True)  # fmt: skip
    return out.float()


def encode(clip, text: str = "a lighthouse") -> torch.Tensor:
    with torch.inference_mode():
        return clip.encode_from_tokens(clip.tokenize(text)).float()


def assert_close(got: torch.Tensor, expected: torch.Tensor, base: torch.Tensor, what: str) -> None:
    """``got`` equals ``expected`` within fp32 tolerance, and ``expected`` differs clearly from ``base``."""
    effect = (expected - base).abs().max().item()
    assert effect > 1e-2, f"{what}: the LoRA changed too little, the comparison is moot ({effect})"
    diff = (got - expected).abs().max().item()
    assert diff <= 1e-4 * max(1.0, expected.abs().max().item()), (
        f"{what}: differs by {diff} (effect {effect})"
    )
