"""Data-parallel training over torch.distributed: each rank trains on its own rows of every global
batch and the LoRA gradients are summed across ranks, so N ranks of batch b train exactly as one
process of batch N x b would (same seed, same data order, same noise).

Every rank draws the whole global batch from the same seeded streams (data order, flips, crops,
noise, timesteps: cheap, the latents are cached) and keeps rows [r*n/N, (r+1)*n/N) of it. Each
rank's loss is its rows' weighted sum divided by the global row count, so the sum of the ranks'
gradients (one all-reduce per micro-batch) is the gradient of the global batch's mean loss; the
loss itself is summed too, so every rank sees the same loss and stops together on a NaN. The
gradients are then identical on every rank, and so are clipping, the optimizer and the weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .loss import per_sample_loss, sample_noise
from .trainer import Batch, NonFiniteLossError, StepReport, Trainer


class JobStoppedError(RuntimeError):
    """A rank was asked to stop (a signal, or its stop check): every rank stops at the same step."""


_stop_request: dict[str, int] = {}


def request_stop(signal_number: int = 0) -> None:
    """Asks this rank to stop at the next stop check (a signal handler calls it: it only sets a flag)."""
    _stop_request.setdefault("signal", signal_number)


def stop_requested() -> bool:
    return "signal" in _stop_request


@dataclass(frozen=True)
class ParallelReport(StepReport):
    """A data-parallel step's report: also the seconds this rank spent in all-reduces in the step."""

    allreduce_s: float = field(default=0.0)


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank of size; the writer is rank 0."""

    rank: int = 0
    size: int = 1

    @property
    def writes(self) -> bool:
        return self.rank == 0

    @staticmethod
    def current() -> World:
        """The torch.distributed group this process is in (World() when none is initialised)."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return World(dist.get_rank(), dist.get_world_size())
        return World()


def shard(n: int, world: World) -> slice:
    """This rank's rows of a global batch of n rows (contiguous, sizes differing by at most one)."""
    return slice(world.rank * n // world.size, (world.rank + 1) * n // world.size)


def shard_batch(batch: Batch, rows: slice) -> Batch:
    conds = None if batch.conds is None else {k: v[rows] for k, v in batch.conds.items()}
    return Batch(batch.latents[rows], batch.captions[rows], conds)


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sums ``tensor`` over every rank in place (a no-op in one process)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


class DataParallelTrainer(Trainer):
    """A Trainer whose micro-step trains this rank's shard and sums gradients over the ranks.

    Its data must batch the global batch (batch_size x world size); the state records the world
    size, and a state saved with another world size is refused on resume (the global batch, so
    the run, would differ).
    """

    def __init__(self, *args, world: World, **kwargs):
        self.world = world
        self._comm_s = 0.0  # seconds in all-reduces during the current step
        super().__init__(*args, **kwargs)

    def _all_reduce(self, tensor: Tensor) -> Tensor:
        start = time.perf_counter()
        all_reduce_sum(tensor)
        if tensor.device.type == "cuda":
            torch.cuda.synchronize(tensor.device)
        self._comm_s += time.perf_counter() - start
        return tensor

    def check_stop(self) -> None:
        """Every rank stops at the same point: this rank's stop request (request_stop, from SIGINT /
        SIGTERM) or stop check is summed over the ranks before every micro-batch, so a stop asked of
        any rank stops all of them there, and rank 0 can save the last completed step. (The per-block
        checks inside the forward pass see ComfyUI's interrupt flag, which a job does not set.)"""
        error: BaseException | None = None
        try:
            super().check_stop()
        except Exception as e:  # noqa: BLE001 - re-raised below, once the other ranks know
            error = e
        asked = 1.0 if error is not None or stop_requested() else 0.0
        flag = self._all_reduce(torch.tensor([asked], device=self.device))
        if error is not None:
            raise error
        if flag.item() > 0:
            raise JobStoppedError(f"stopped on request before step {self.step + 1}, on every rank")

    def train_step(self) -> StepReport:
        self._comm_s = 0.0
        report = super().train_step()
        fields_ = {f: getattr(report, f) for f in ("step", "total", "loss", "lr", "eta_s", "epoch")}
        return ParallelReport(**fields_, allreduce_s=self._comm_s)

    def _micro_step(self) -> float:
        batch = self.data.batch(self._next_indices(), self.generator, self.rng)
        latents = batch.latents.float()
        noise = sample_noise(latents, self.generator, self.cfg.noise_offset)
        drawn = self.objective.draw(latents, noise, self.generator)
        n, rows, dev = latents.shape[0], shard(latents.shape[0], self.world), self.device
        kept = [p.grad for p in self.params]  # earlier micro-batches' (already summed) gradients
        for p in self.params:
            p.grad = None
        local = torch.zeros((), device=dev)
        if rows.stop > rows.start:  # a short last batch can leave a rank without rows
            with torch.autocast(dev.type, dtype=self.autocast_dtype, enabled=self.cfg.precision != "fp32"):
                conds = self._conds(shard_batch(batch, rows))
                pred = self.predict(drawn.noisy[rows].to(dev), drawn.model_time[rows].to(dev), conds)
            losses = per_sample_loss(pred, drawn.target[rows].to(dev), self.cfg.loss, self.cfg.huber_delta)
            local = (losses * drawn.weights[rows].to(dev)).sum() / n
        total = self._all_reduce(local.detach().float().clone())  # on the device: NCCL reduces GPU tensors
        if not torch.isfinite(total):
            raise NonFiniteLossError(
                f"the loss became {total.item()} at step {self.step + 1} (on rank {self.world.rank} of "
                f"{self.world.size}): training stopped. Lower the learning rate (now {self.cfg.lr:g}), or use "
                "fp32 or bf16 instead of fp16"
            )
        if local.requires_grad:
            self.scaler.scale(local / self.cfg.grad_accum).backward()
        self._sum_grads(kept)
        return float(total)

    def _sum_grads(self, kept: list[Tensor | None]) -> None:
        """This micro-batch's gradients summed over ranks (one flat all-reduce), added to ``kept``."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = self._all_reduce(torch.cat([g.reshape(-1).float() for g in grads]))
        offset = 0
        for p, before in zip(self.params, kept, strict=True):
            size = p.numel()
            grad = flat[offset : offset + size].view_as(p).to(p.dtype)
            p.grad = grad if before is None else before + grad
            offset += size

    def state(self) -> tuple[dict[str, Tensor], dict]:
        tensors, info = super().state()
        return tensors, {**info, "world_size": self.world.size}

    @property
    def ranks(self) -> int:
        return self.world.size
