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


def run_hooks(patcher, fn):
    """fn() with the model's blocks checkpointed (as Train LoRA runs them) and grad on."""
    from lora_foundry.nodes.train import block_hooks

    undo = block_hooks(patcher, checkpointing=True)
    try:
        with torch.enable_grad():
            return fn()
    finally:
        for u in undo:
            u()


def fixed_triple_losses(patcher, x0, eps, cond, steps: int = 40) -> list[float]:
    """Losses of a rank-4 attention+MLP LoRA trained `steps` steps on two fixed (x_t, target, sigma)
    triples of the flow objective (sigma 0.25 and 0.7): memorisation, so the loss must fall."""
    from lora_foundry.lora_core.train.network import LoraNetwork, select_targets
    from lora_foundry.lora_core.train.trainer import TrainConfig, Trainer
    from lora_foundry.nodes import comfy_bridge_train as train_bridge
    from lora_foundry.nodes.train import model_targets

    s = torch.tensor([0.25, 0.7])
    b = s[:, None, None, None]
    objective = FixedTriples((1 - b) * x0 + b * eps, eps - x0, s)
    net = LoraNetwork(select_targets(model_targets(patcher), "attention_ff"), rank=4, alpha=4.0, seed=0)
    cfg = TrainConfig(steps=steps, batch_size=2, lr=1e-2, seed=0)
    trainer = Trainer(cfg, Data(x0, cond), train_bridge.flow_predictor(patcher), objective, net)
    net.attach()
    try:
        return run_hooks(patcher, lambda: [trainer.train_step().loss for _ in range(steps)])
    finally:
        net.detach()
