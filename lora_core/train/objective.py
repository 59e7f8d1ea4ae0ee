"""What a training step asks of a denoising objective: noisy latents, the target, the time the model
is called with, and per-sample loss weights, drawn from the trainer's generator.

Two objectives follow it: the discrete DDPM schedule of SD1.x / SD2.x / SDXL (eps or v, min-SNR;
the draws and their order are those Train LoRA always made, so runs and exact resume are
unchanged) and flow matching (lora_core.train.flow) for the DiT families.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from .loss import NoiseSchedule, min_snr_weights


@dataclass(frozen=True, eq=False)
class Draw:
    noisy: Tensor  # (B, C, ...) the model's input
    target: Tensor  # what the model's raw output should equal
    model_time: Tensor  # (B,) what the predictor is called with: timestep indices or sigmas
    weights: Tensor  # (B,) per-sample loss weights


class Objective(Protocol):
    def draw(self, latents: Tensor, noise: Tensor, generator: torch.Generator) -> Draw: ...


@dataclass(frozen=True, eq=False)
class DiscreteObjective:
    """The DDPM objective on a model's discrete schedule: uniform timesteps, optional min-SNR."""

    schedule: NoiseSchedule
    min_snr_gamma: float = 0.0

    def draw(self, latents: Tensor, noise: Tensor, generator: torch.Generator) -> Draw:
        timesteps = torch.randint(0, self.schedule.steps, (latents.shape[0],), generator=generator)
        weights = min_snr_weights(self.schedule, timesteps, self.min_snr_gamma)
        noisy = self.schedule.add_noise(latents, noise, timesteps)
        return Draw(noisy, self.schedule.target(latents, noise, timesteps), timesteps, weights)
