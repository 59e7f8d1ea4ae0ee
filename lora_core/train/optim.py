"""Optimizers by name (optional packages imported only when chosen) and their state as tensors + JSON."""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Iterable
from typing import Literal, get_args

import torch
from torch import Tensor

OptimizerName = Literal["AdamW", "Adam", "Lion", "SGD", "AdamW8bit", "Prodigy"]
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)
# name -> (package to import, pip name)
_OPTIONAL = {"AdamW8bit": ("bitsandbytes", "bitsandbytes"), "Prodigy": ("prodigyopt", "prodigyopt")}


class MissingPackageError(ImportError):
    """An optional optimizer's package is not installed."""


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023): sign of an interpolated momentum, decoupled weight decay."""

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0):
        if lr <= 0:
            raise ValueError(f"Lion `lr` should be positive, got {lr}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                exp_avg = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                update = exp_avg.mul(beta1).add_(p.grad, alpha=1 - beta1).sign_()
                p.add_(update, alpha=-group["lr"])
                exp_avg.mul_(beta2).add_(p.grad, alpha=1 - beta2)
        return loss


def _optional(name: str):
    module, pip_name = _OPTIONAL[name]
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingPackageError(
            f"optimizer {name} needs the package '{pip_name}', which is not installed: run "
            f"`pip install {pip_name}` in ComfyUI's Python environment, or choose AdamW, Adam, Lion or SGD"
        ) from error


def make_optimizer(name: str, groups: list[dict], weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """An optimizer over param groups (each with its own lr)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"`optimizer` should be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    lr = groups[0]["lr"]
    if name == "AdamW":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    if name == "Adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    if name == "Lion":
        return Lion(groups, lr=lr, weight_decay=weight_decay)
    if name == "SGD":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "AdamW8bit":
        return _optional(name).optim.AdamW8bit(groups, lr=lr, weight_decay=weight_decay)
    return _optional(name).Prodigy(groups, lr=lr, weight_decay=weight_decay)


def state_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    """Optimizer state_dict split into tensors ('opt.<param>.<key>') and a JSON-able rest."""
    sd = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    plain: dict[str, dict] = {}
    for index, entries in sd["state"].items():
        for key, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"opt.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain.setdefault(str(index), {})[key] = value
    info = {"state": plain, "param_groups": sd["param_groups"]}
    json.dumps(info)  # fails here, not half-way through writing, if an optimizer keeps odd values
    return tensors, info


def state_from_tensors(tensors: dict[str, Tensor], info: dict) -> dict:
    """Inverse of state_to_tensors: a state_dict for ``optimizer.load_state_dict``."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, entries in info["state"].items():
        state.setdefault(int(index), {}).update(entries)
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else dict(g) for g in info["param_groups"]]
    return {"state": state, "param_groups": groups}


def all_params(groups: Iterable[dict]) -> list[Tensor]:
    return [p for g in groups for p in g["params"]]
