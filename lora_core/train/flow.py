"""The flow-matching objective the DiT families train with (Flux, SD3, Z-Image, Qwen-Image, Chroma):
x_t = (1 - s) x0 + s eps, the model predicts eps - x0, with the timestep samplings and loss
weightings trainers offer.

Sigma s in (0, 1) is drawn as: ``model`` (uniform time through the model's own sigma function, so
its configured shift applies: ComfyUI's model_sampling, handed over as ``sigma_of_t``), ``uniform``,
``logit_normal`` (sigmoid of a normal with ``logit_mean`` / ``logit_std``), ``shift`` (uniform time
shifted by a fixed ``shift``: s = k t / (1 + (k - 1) t)) or ``flux_shift`` (Flux's shift that grows
with the image's token count, mu from 0.5 at 256 tokens to 1.15 at 4096). Loss weighting: ``none``,
``sigma_sqrt`` (1 / s^2) or ``cosmap`` (2 / (pi (1 - 2 s + 2 s^2))).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from .objective import Draw

TimestepSampling = Literal["model", "uniform", "logit_normal", "shift", "flux_shift"]
TIMESTEP_SAMPLINGS: tuple[str, ...] = get_args(TimestepSampling)
LossWeighting = Literal["none", "sigma_sqrt", "cosmap"]
LOSS_WEIGHTINGS: tuple[str, ...] = get_args(LossWeighting)

# Flux's resolution-dependent shift: mu is linear in the token count between these two points.
FLUX_BASE = (256, 0.5)
FLUX_MAX = (4096, 1.15)
# Sigmas stay inside (0, 1): s = 0 makes sigma_sqrt infinite, s = 1 leaves no image to learn.
EDGE = 1e-5


def shifted(t: Tensor, shift: float) -> Tensor:
    """SD3's shift of time t in (0, 1): shift * t / (1 + (shift - 1) * t)."""
    return shift * t / (1 + (shift - 1) * t)


def flux_mu(tokens: int) -> float:
    (n0, mu0), (n1, mu1) = FLUX_BASE, FLUX_MAX
    return mu0 + (mu1 - mu0) * (tokens - n0) / (n1 - n0)


def flux_shifted(t: Tensor, mu: float) -> Tensor:
    """Flux's exponential shift: e^mu / (e^mu + 1 / t - 1)."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def loss_weights(sigmas: Tensor, weighting: str) -> Tensor:
    if weighting == "none":
        return torch.ones_like(sigmas)
    if weighting == "sigma_sqrt":
        return sigmas**-2.0
    if weighting == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    raise ValueError(f"`loss_weighting` should be one of {', '.join(LOSS_WEIGHTINGS)}, got {weighting!r}")


@dataclass(frozen=True, eq=False)
class FlowObjective:
    """Flow matching on a model whose ComfyUI sampling is CONST (rectified flow)."""

    sigma_of_t: Callable[[Tensor], Tensor] | None = None  # the model's own t -> sigma
    sampling: TimestepSampling = "model"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 3.0
    weighting: LossWeighting = "none"
    patch_tokens: int = 4  # latent pixels per token (Flux: 2 x 2 patches), for flux_shift

    def __post_init__(self) -> None:
        if self.sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(
                f"`timestep_sampling` should be one of {', '.join(TIMESTEP_SAMPLINGS)}, got {self.sampling!r}"
            )
        loss_weights(torch.ones(1) * 0.5, self.weighting)  # names a wrong weighting now
        if self.logit_std <= 0 or self.shift <= 0:
            raise ValueError(
                f"`logit_std` and `shift` should be positive, got {self.logit_std}, {self.shift}"
            )
        if self.sampling == "model" and self.sigma_of_t is None:
            raise ValueError("timestep sampling 'model' needs the model's sigma function")

    def sigmas(self, n: int, generator: torch.Generator, latent_shape: tuple[int, ...]) -> Tensor:
        """(n,) sigmas in (0, 1), drawn from ``generator`` (one draw of n numbers)."""
        if self.sampling == "logit_normal":
            s = torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(n, generator=generator))
        else:
            t = torch.rand(n, generator=generator).clamp(EDGE, 1 - EDGE)
            if self.sampling == "model":
                s = self.sigma_of_t(t).float()
            elif self.sampling == "shift":
                s = shifted(t, self.shift)
            elif self.sampling == "flux_shift":
                tokens = math.prod(latent_shape[-2:]) // self.patch_tokens
                s = flux_shifted(t, flux_mu(tokens))
            else:
                s = t
        return s.clamp(EDGE, 1 - EDGE)

    def draw(self, latents: Tensor, noise: Tensor, generator: torch.Generator) -> Draw:
        s = self.sigmas(latents.shape[0], generator, tuple(latents.shape))
        b = s.reshape((-1,) + (1,) * (latents.dim() - 1))
        noisy = (1 - b) * latents + b * noise
        return Draw(noisy, noise - latents, s, loss_weights(s, self.weighting))
