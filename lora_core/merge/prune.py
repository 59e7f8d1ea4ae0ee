"""TIES and DARE on dense deltas, as peft's merge_utils defines them: magnitude and random pruning,
the sign election and the disjoint mean. Stateless functions on (out, in) tensors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

MajoritySign = Literal["total", "frequency"]


def magnitude_prune(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density * numel) largest-magnitude entries (at least one), zero the rest."""
    if density >= 1.0:
        return delta
    k = max(1, int(density * delta.numel()))
    flat = delta.reshape(-1)
    mask = torch.zeros_like(flat)
    mask[torch.topk(flat.abs(), k=k, largest=True).indices] = 1.0
    return (flat * mask).reshape(delta.shape)


def random_prune(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Keep each entry with probability `density` and rescale kept ones by 1 / density (DARE)."""
    if density >= 1.0:
        return delta
    # The mask is drawn on the CPU so a seed gives the same mask on any device.
    keep = torch.bernoulli(torch.full(delta.shape, density), generator=generator).to(delta.device)
    return delta * keep / density


def disjoint_merge(
    stack: torch.Tensor, weights: Sequence[float], majority_sign: MajoritySign
) -> torch.Tensor:
    """TIES sign election on the unweighted stack (n, out, in), then the mean of the weighted
    entries that agree with the elected sign (as peft's merge_utils)."""
    if majority_sign == "total":
        magnitude = stack.sum(dim=0)
    elif majority_sign == "frequency":
        magnitude = stack.sign().sum(dim=0)
    else:
        raise ValueError(f"majority_sign must be 'total' or 'frequency', got {majority_sign!r}")
    elected = torch.where(magnitude >= 0, 1.0, -1.0)  # (out, in)
    agree = stack.sign() == elected  # (n, out, in); pruned zeros never agree
    scale = torch.tensor([float(w) for w in weights], dtype=stack.dtype, device=stack.device).view(-1, 1, 1)
    total = (stack * scale * agree).sum(dim=0)
    return total / agree.sum(dim=0).clamp(min=1)


def ties_delta(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    density: float,
    majority_sign: MajoritySign = "total",
) -> torch.Tensor:
    """TIES on dense deltas: magnitude trim to `density`, elect sign, disjoint mean."""
    stack = torch.stack([magnitude_prune(d.float(), density) for d in deltas])  # (n, out, in)
    return disjoint_merge(stack, weights, majority_sign)


def dare_delta(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    density: float,
    generator: torch.Generator,
    elect_sign: bool,
) -> torch.Tensor:
    """DARE on dense deltas: random drop + rescale, then TIES election or a weighted sum."""
    pruned = [random_prune(d.float(), density, generator) for d in deltas]
    if elect_sign:
        return disjoint_merge(torch.stack(pruned), weights, "total")
    return sum(p * float(w) for p, w in zip(pruned, weights, strict=True))
