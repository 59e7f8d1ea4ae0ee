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


def planted_recovery(patcher, layer: str, cond: dict, n: int, side: int = 8, checkpoints: int = 12,
                     steps_per: int = 30, lr: float = 2e-2, channels: int = 16,
                     discrete: bool = False) -> list[float]:  # fmt: skip
    """A rank-2 change planted in a teacher, recovered by a student's rank-2 LoRA on the same layer.

    The teacher is the base with a rank-2 LoRA on ``layer`` (down: the network's own init, up: seeded
    normal x 0.5); the student's LoRA on that layer is fitted, full batch, to the teacher's outputs on
    ``n`` fixed (x_t, sigma) of ``channels`` x side x side latents and ``cond``: through the flow
    predictor at sigma in [0.1, 0.9], or, ``discrete``, through the noise predictor of an eps / v
    UNet (SD1.5, SDXL) at timesteps in [100, 900). Returns the relative error
    ||learned delta - planted delta|| / ||planted delta|| at the start and after each of
    ``checkpoints`` rounds of ``steps_per`` steps.

    The change is recoverable only when the teacher's outputs determine it: the layer's inputs over
    the batch (its tokens) must span the layer's input width many times over (n x tokens per sample
    well above the width), and its output must reach the model output with a gain that varies per
    token rather than through a norm or a softmax that discards directions. A DiT's first MLP
    projection (input: the normed, modulated token stream; output: through the activation into the
    residual) is such a layer; q and k of a block with QK-norm and near-uniform attention are not.
    """
    from lora_foundry.lora_core.train.network import LoraNetwork
    from lora_foundry.lora_core.train.trainer import TrainConfig, Trainer
    from lora_foundry.nodes import comfy_bridge_train as train_bridge
    from lora_foundry.nodes.train import model_targets

    target = [t for t in model_targets(patcher) if t.name == layer]
    assert len(target) == 1, layer
    teacher = LoraNetwork(target, rank=2, alpha=2.0, seed=5)
    planted = teacher.branches[layer]
    with torch.no_grad():
        planted.up.copy_(torch.randn(planted.up.shape, generator=torch.Generator().manual_seed(6)) * 0.5)
    planted_delta = (planted.up @ planted.down).detach() * planted.scale
    g = torch.Generator().manual_seed(3)
    xs = torch.randn(n, channels, side, side, generator=g)
    sigmas = torch.rand(n, generator=g) * 0.8 + 0.1
    predict = train_bridge.flow_predictor(patcher)
    if discrete:  # the "sigma" slot of a discrete model's predictor holds its timestep
        sigmas = (sigmas * 1000).floor()
        predict = train_bridge.noise_predictor(patcher)
    teacher.attach()
    try:
        with torch.no_grad():
            want = predict(xs, sigmas, cond)
    finally:
        teacher.detach()
    student = LoraNetwork(target, rank=2, alpha=2.0, seed=9)
    cfg = TrainConfig(steps=checkpoints * steps_per, batch_size=n, lr=lr, max_grad_norm=0.0, seed=0)
    trainer = Trainer(cfg, Data(xs, cond), predict, FixedTriples(xs, want, sigmas), student)
    branch = student.branches[layer]

    def rel_error() -> float:
        delta = (branch.up @ branch.down).detach() * branch.scale
        return float((delta - planted_delta).norm() / planted_delta.norm())

    errors = [rel_error()]
    student.attach()
    try:
        for _ in range(checkpoints):
            run_hooks(patcher, lambda: [trainer.train_step() for _ in range(steps_per)])
            errors.append(rel_error())
    finally:
        student.detach()
    return errors


def assert_recovered(errors: list[float], bound: float = 0.3, converged: float = 0.01) -> None:
    """The up projection starts at zero (error 1); the first rounds turn the random down projection
    toward the planted one (the error may rise a little while up grows); from then on the error falls
    at every checkpoint until it is below ``converged`` (there Adam's constant-size steps jitter it
    at that level), and ends below ``bound``."""
    assert abs(errors[0] - 1.0) < 1e-6, errors
    later = errors[2:]
    assert all(b < a for a, b in zip(later, later[1:], strict=False) if a >= converged), errors
    assert errors[-1] < bound, errors


def flux_dataset(n: int = 3, pooled: int = 32):
    """Latents and caption embeddings as a Flux VAE / CLIP-L + T5 would cache them (random, seeded);
    ``pooled`` 64 for the tiny SD3 (its pooled vector's width)."""
    from pathlib import Path

    from lora_foundry.lora_core.train.dataset import DatasetOptions, DatasetScan, LatentDataset, Sample

    g = torch.Generator().manual_seed(0)
    samples, conds = [], {}
    for i in range(n):
        caption = f"zkw, item {i}"
        samples.append(Sample(torch.randn(16, 8, 8, generator=g), None, (64, 64), caption, 1))
        conds[caption] = {
            "context": torch.randn(1, 4, 32, generator=g),
            "pooled": torch.randn(1, pooled, generator=g),
        }
    scan = DatasetScan(folder=Path("synthetic"), entries=(), problems=(), without_caption=0)
    dataset = LatentDataset(samples, DatasetOptions(resolution=64, flip=False), scan)
    dataset.conds = conds
    return dataset


def qwen_dataset(n: int = 3):
    """Latents and caption embeddings as Qwen-Image's VAE and text encoder would cache them (random;
    its encoder has no pooled vector, which the caption encoder stores as zeros)."""
    from pathlib import Path

    from lora_foundry.lora_core.train.dataset import DatasetOptions, DatasetScan, LatentDataset, Sample

    g = torch.Generator().manual_seed(0)
    samples, cached = [], {}
    for i in range(n):
        caption = f"zkw, item {i}"
        samples.append(Sample(torch.randn(16, 8, 8, generator=g), None, (64, 64), caption, 1))
        cached[caption] = {"context": torch.randn(1, 4, 32, generator=g), "pooled": torch.zeros(1, 1)}
    scan = DatasetScan(folder=Path("synthetic"), entries=(), problems=(), without_caption=0)
    ds = LatentDataset(samples, DatasetOptions(resolution=64, flip=False), scan)
    ds.conds = cached
    return ds
