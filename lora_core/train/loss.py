"""The denoising objective: noising latents on a discrete DDPM schedule, targets, min-SNR, losses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

Prediction = Literal["eps", "v"]
PREDICTIONS: tuple[str, ...] = get_args(Prediction)
LossName = Literal["MSE", "Huber"]
LOSSES: tuple[str, ...] = get_args(LossName)


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """alphas_cumprod (T,) of the model's discrete schedule and what the model predicts."""

    alphas_cumprod: Tensor
    prediction: str = "eps"

    def __post_init__(self) -> None:
        if self.prediction not in PREDICTIONS:
            raise ValueError(
                f"`prediction` should be one of {', '.join(PREDICTIONS)}, got {self.prediction!r}"
            )
        if self.alphas_cumprod.dim() != 1 or len(self.alphas_cumprod) < 2:
            raise ValueError(
                f"alphas_cumprod should be 1-D with T > 1 entries, got {tuple(self.alphas_cumprod.shape)}"
            )

    @classmethod
    def from_sigmas(cls, sigmas: Tensor, prediction: str = "eps") -> NoiseSchedule:
        """From k-diffusion sigmas, sigma^2 = (1 - a) / a (what ComfyUI's discrete sampling stores)."""
        return cls(1.0 / (1.0 + sigmas.double() ** 2), prediction)

    @property
    def steps(self) -> int:
        return len(self.alphas_cumprod)

    def _coeffs(self, timesteps: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        a = self.alphas_cumprod.to(like.device)[timesteps].to(torch.float32)
        shape = (-1,) + (1,) * (like.dim() - 1)
        return a.sqrt().reshape(shape), (1 - a).sqrt().reshape(shape)

    def add_noise(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps."""
        sa, sb = self._coeffs(timesteps, latents)
        return sa * latents + sb * noise

    def target(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        if self.prediction == "eps":
            return noise
        sa, sb = self._coeffs(timesteps, latents)
        return sa * noise - sb * latents  # v = sqrt(a) eps - sqrt(1 - a) x_0

    def snr(self, timesteps: Tensor) -> Tensor:
        a = self.alphas_cumprod.to(timesteps.device)[timesteps].to(torch.float32)
        return a / (1 - a)


def min_snr_weights(schedule: NoiseSchedule, timesteps: Tensor, gamma: float) -> Tensor:
    """Per-sample loss weights min(SNR, gamma) / SNR (eps) or / (SNR + 1) (v); ones when gamma <= 0."""
    if gamma <= 0:
        return torch.ones(len(timesteps))
    snr = schedule.snr(timesteps)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if schedule.prediction == "v" else clipped / snr


def sample_noise(latents: Tensor, generator: torch.Generator, offset: float = 0.0) -> Tensor:
    """Gaussian noise like latents; with offset, a per-channel constant (offset noise) is added."""
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    if offset:
        noise = noise + offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator)
    return noise


def per_sample_loss(pred: Tensor, target: Tensor, kind: str = "MSE", huber_delta: float = 0.1) -> Tensor:
    """Loss per sample (B,), averaged over channels and pixels, computed in float32."""
    pred, target = pred.float(), target.float()
    if kind == "MSE":
        elem = F.mse_loss(pred, target, reduction="none")
    elif kind == "Huber":
        elem = F.huber_loss(pred, target, reduction="none", delta=huber_delta)
    else:
        raise ValueError(f"`loss` should be one of {', '.join(LOSSES)}, got {kind!r}")
    return elem.reshape(elem.shape[0], -1).mean(dim=1)
