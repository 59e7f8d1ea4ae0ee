"""Fixed training data and objectives for the flow-model training tests (tests/comfy/test_train_*)."""

from __future__ import annotations

import random

import torch

from lora_foundry.lora_core.train.objective import Draw
from lora_foundry.lora_core.train.trainer import Batch


class FixedTriples:
    """An Objective returning the same (noisy, target, sigma) every step (memorisation)."""

    def __init__(self, noisy, target, sigma):
        self.fixed = Draw(noisy, target, sigma, torch.ones(len(sigma)))

    def draw(self, latents, noise, generator):
        return self.fixed


class Data:
    """TrainingData of fixed latents and conds, batch = all of them, or seeded pairs."""

    def __init__(self, latents, cond, pairs=False):
        self.latents, self.cond, self.pairs = latents, cond, pairs

    def epoch_order(self, epoch, seed):
        n = len(self.latents)
        if not self.pairs:
            return [list(range(n))]
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 31 + epoch)).tolist()
        return [perm[i : i + 2] for i in range(0, n, 2)]

    def batch(self, indices, generator, rng: random.Random):
        return Batch(
            self.latents[indices], tuple("" for _ in indices), {k: v[indices] for k, v in self.cond.items()}
        )
