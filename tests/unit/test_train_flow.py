"""The flow-matching objective (lora_core.train.flow) against formulas written out here: the noisy
input and target, each timestep sampling, each loss weighting, and a Trainer step on a linear toy
whose loss is computed by hand from the same draws."""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch import nn

from lora_foundry.lora_core.train.flow import FlowObjective, flux_mu, loss_weights
from lora_foundry.lora_core.train.network import LoraNetwork, Target
from lora_foundry.lora_core.train.trainer import Batch, TrainConfig, Trainer


def test_draw_is_the_rectified_flow_interpolation():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    drawn = FlowObjective(sampling="uniform").draw(x0, eps, torch.Generator().manual_seed(5))
    s = torch.rand(3, generator=torch.Generator().manual_seed(5))  # the same single draw
    torch.testing.assert_close(drawn.model_time, s)
    for i in range(3):
        torch.testing.assert_close(drawn.noisy[i], (1 - s[i]) * x0[i] + s[i] * eps[i])
        torch.testing.assert_close(drawn.target[i], eps[i] - x0[i])
    assert torch.equal(drawn.weights, torch.ones(3))


@pytest.mark.parametrize(
    ("sampling", "kw", "expected"),
    [
        ("shift", {"shift": 3.0}, 3 * 0.5 / (1 + 2 * 0.5)),
        ("flux_shift", {}, math.exp(0.5) / (math.exp(0.5) + 1)),  # 256 tokens: mu = 0.5
        ("model", {"sigma_of_t": lambda t: t**2}, 0.25),
        ("uniform", {}, 0.5),
    ],
)
def test_samplings_map_time_one_half(sampling, kw, expected, monkeypatch):
    monkeypatch.setattr(torch, "rand", lambda n, generator=None: torch.full((n,), 0.5))
    objective = FlowObjective(sampling=sampling, patch_tokens=4, **kw)
    s = objective.sigmas(2, torch.Generator(), (2, 16, 32, 32))  # 32 x 32 latent / (2 x 2) = 256 tokens
    torch.testing.assert_close(s, torch.full((2,), expected, dtype=s.dtype))


def test_flux_mu_endpoints_and_logit_normal_statistics():
    assert flux_mu(256) == pytest.approx(0.5) and flux_mu(4096) == pytest.approx(1.15)
    s = FlowObjective(sampling="logit_normal", logit_mean=0.7, logit_std=0.5).sigmas(
        20000, torch.Generator().manual_seed(0), (1, 4, 8, 8)
    )
    logits = torch.log(s / (1 - s))
    assert abs(float(logits.mean()) - 0.7) < 0.02 and abs(float(logits.std()) - 0.5) < 0.02


def test_loss_weightings():
    s = torch.tensor([0.25, 0.5])
    torch.testing.assert_close(loss_weights(s, "sigma_sqrt"), torch.tensor([16.0, 4.0]))
    torch.testing.assert_close(loss_weights(s, "cosmap"), 2 / (math.pi * torch.tensor([0.625, 0.5])))
    x = torch.zeros(2, 1, 1, 1)
    drawn = FlowObjective(sampling="uniform", weighting="sigma_sqrt").draw(
        x, x, torch.Generator().manual_seed(2)
    )
    torch.testing.assert_close(drawn.weights, drawn.model_time**-2)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="`timestep_sampling` should be one of model, uniform"):
        FlowObjective(sampling="cosine")
    with pytest.raises(ValueError, match="`loss_weighting` should be one of none, sigma_sqrt, cosmap"):
        FlowObjective(sampling="uniform", weighting="snr")
    with pytest.raises(ValueError, match="needs the model's sigma function"):
        FlowObjective(sampling="model")
    with pytest.raises(ValueError, match="`timestep_sampling` should be one of"):
        TrainConfig(timestep_sampling="x")


class OneBatch:
    def __init__(self, latents, context):
        self.latents, self.context = latents, context

    def epoch_order(self, epoch, seed):
        return [[0, 1]]

    def batch(self, indices, generator, rng: random.Random):
        return Batch(self.latents[indices], ("", ""), {"context": self.context[indices]})


def test_trainer_step_loss_on_a_linear_toy_equals_the_hand_computed_loss():
    """A linear toy v = W x (a LoRA on W starts at zero, so step 1 sees W alone): the trainer's
    reported loss is mean((W x_s - (eps - x0))^2 * w(s)) with x_s, eps and s re-drawn by hand."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 4, bias=False)
    net = LoraNetwork([Target("lora_unet_toy", "toy", layer)], rank=2, alpha=2.0)

    def predict(x, s, cond):  # channels last through the layer, as a DiT's tokens
        return layer(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    x0 = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(3))
    cfg = TrainConfig(steps=1, batch_size=2, lr=1e-3, optimizer="SGD", seed=11, timestep_sampling="uniform",
                      loss_weighting="cosmap")  # fmt: skip
    objective = FlowObjective(sampling="uniform", weighting="cosmap")
    trainer = Trainer(cfg, OneBatch(x0, torch.zeros(2, 1, 1)), predict, objective, net)
    report = trainer.train_step()
    g = torch.Generator().manual_seed(11)  # the trainer's generator: noise first, then sigmas
    eps = torch.randn(x0.shape, generator=g)
    s = torch.rand(2, generator=g).clamp(1e-5, 1 - 1e-5)
    xs = (1 - s[:, None, None, None]) * x0 + s[:, None, None, None] * eps
    with torch.no_grad():
        v = torch.einsum("oi,bihw->bohw", layer.weight, xs)
    per_sample = ((v - (eps - x0)) ** 2).mean(dim=(1, 2, 3))
    expected = (per_sample * 2 / (math.pi * (1 - 2 * s + 2 * s**2))).mean()
    assert report.loss == pytest.approx(float(expected), rel=1e-5)
