"""A pure-torch tiny denoiser with SD-style module paths, and in-memory training data, for the
training tests (imported by them as ``unit.train_helpers``)."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora_foundry.lora_core.train.dataset import Batches, DatasetOptions, DatasetScan, LatentDataset, Sample
from lora_foundry.lora_core.train.loss import NoiseSchedule
from lora_foundry.lora_core.train.network import Target
from lora_foundry.lora_core.train.trainer import Batch

DIM, CTX, TOKENS = 16, 8, 3


class Attention(nn.Module):
    def __init__(self, dim: int, ctx: int):
        super().__init__()
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(ctx, dim, bias=False)
        self.to_v = nn.Linear(ctx, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Identity())

    def forward(self, x, context):
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
        return self.to_out(a @ v)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        proj = nn.Module()
        proj.proj = nn.Linear(dim, 2 * dim)
        self.net = nn.Sequential(proj, nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        return self.net[2](self.net[1](self.net[0].proj(x)))


class Block(nn.Module):
    def __init__(self, dim: int, ctx: int):
        super().__init__()
        self.attn1 = Attention(dim, dim)
        self.attn2 = Attention(dim, ctx)
        self.ff = FeedForward(dim)

    def forward(self, x, context):
        x = x + self.attn1(x, x)
        x = x + self.attn2(x, context)
        return x + self.ff(x)


class Transformer(nn.Module):
    def __init__(self, dim: int, ctx: int):
        super().__init__()
        self.proj_in = nn.Conv2d(dim, dim, 1)
        self.transformer_blocks = nn.ModuleList([Block(dim, ctx)])

    def forward(self, h, context):
        b, c, hh, ww = h.shape
        x = self.proj_in(h).flatten(2).transpose(1, 2)
        x = self.transformer_blocks[0](x, context)
        return h + x.transpose(1, 2).reshape(b, c, hh, ww)


class TinyUNet(nn.Module):
    """conv in -> one transformer (self + cross attention + ff) -> conv out; time as a bias."""

    def __init__(self, channels: int = 4, dim: int = DIM, ctx: int = CTX, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.input_blocks = nn.ModuleList(
            [
                nn.ModuleList([nn.Conv2d(channels, dim, 3, padding=1)]),
                nn.ModuleList([nn.Identity(), Transformer(dim, ctx)]),
            ]
        )
        self.time_embed = nn.Linear(2, dim)
        self.out = nn.Conv2d(dim, channels, 3, padding=1)

    def forward(self, x, t, context):
        tt = t.float()[:, None] / 1000
        emb = self.time_embed(torch.cat([torch.sin(tt * 3), torch.cos(tt * 3)], dim=1))
        h = self.input_blocks[0][0](x) + emb[:, :, None, None]
        h = self.input_blocks[1][1](F.silu(h), context)
        return self.out(F.silu(h))


def targets(model: nn.Module, prefix: str = "lora_unet_") -> list[Target]:
    return [
        Target(prefix + path.replace(".", "_"), path, m)
        for path, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    ]


def predictor(model: nn.Module):
    def predict(x, t, cond):
        return model(x, t, cond["context"])

    return predict


def schedule() -> NoiseSchedule:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return NoiseSchedule(torch.cumprod(1 - betas, dim=0), "eps")


def latent_dataset(
    n: int = 6, seed: int = 0, options: DatasetOptions | None = None, size: int = 4
) -> LatentDataset:
    """Synthetic samples (no images): structured latents, fixed contexts per caption."""
    g = torch.Generator().manual_seed(seed)
    options = options or DatasetOptions(resolution=64, flip=True, crop="random")
    samples, conds = [], {}
    for i in range(n):
        big = size + 2 if options.crop == "random" else size
        base = torch.linspace(-1, 1, big)[None, :, None] * (i % 3 - 1) + 0.3 * torch.randn(
            4, big, big, generator=g
        )
        caption = f"tag{i}, common, extra{i % 2}"
        samples.append(
            Sample(base, base.flip(-1) if options.flip else None, (size * 8, size * 8), caption, 1 + i % 2)
        )
        conds[caption] = {"context": torch.randn(1, TOKENS, CTX, generator=g)}
    scan = DatasetScan(
        folder=__import__("pathlib").Path("synthetic"), entries=(), problems=(), without_caption=0
    )
    ds = LatentDataset(samples, options, scan)
    ds.conds = conds
    return ds


class FixedData:
    """Minimal TrainingData: fixed latents and contexts, seeded order."""

    def __init__(self, latents, contexts, batch_size: int = 2):
        self.latents, self.contexts, self.bs = latents, contexts, batch_size

    def epoch_order(self, epoch, seed):
        g = torch.Generator().manual_seed(seed * 7 + epoch)
        perm = torch.randperm(len(self.latents), generator=g).tolist()
        return [perm[i : i + self.bs] for i in range(0, len(perm), self.bs)]

    def batch(self, indices, generator, rng: random.Random):
        return Batch(self.latents[indices], tuple("" for _ in indices), {"context": self.contexts[indices]})


def batches(ds: LatentDataset, batch_size: int = 2) -> Batches:
    return Batches(ds, batch_size)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread (and do not fight other processes for the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
