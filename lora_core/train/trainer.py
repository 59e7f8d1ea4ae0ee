"""The training loop: one optimizer step at a time, with everything it depends on as explicit state.

Randomness comes from the trainer's own torch.Generator (noise, timesteps, flips, crops) and
random.Random (caption shuffle / dropout); data order is a function of (seed, epoch). Together
with the LoRA weights, the optimizer and the step they are the whole state, so a run stopped at
step k and resumed from its state file continues exactly as if it had never stopped.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Literal, Protocol

import numpy as np
import torch
from torch import Tensor

from .flow import LOSS_WEIGHTINGS, TIMESTEP_SAMPLINGS, LossWeighting, TimestepSampling
from .loss import LOSSES, LossName, NoiseSchedule, per_sample_loss, sample_noise
from .network import LoraNetwork
from .objective import DiscreteObjective, Objective
from .optim import OPTIMIZERS, OptimizerName, all_params, make_optimizer, state_from_tensors, state_to_tensors
from .schedule import SCHEDULERS, Schedule, SchedulerName, warmup_from
from .state import DamagedStateError

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

Predict = Callable[[Tensor, Tensor, Mapping[str, Tensor]], Tensor]
Encode = Callable[[list[str]], dict[str, Tensor]]
Check = Callable[[], None]  # raises to stop (ComfyUI's cancel); called between micro-steps and loads


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf; the message says at which step and what to change."""


@dataclass(frozen=True, eq=False)
class Batch:
    latents: Tensor  # (B, C, h, w), already scaled to the model's latent space
    captions: tuple[str, ...]
    conds: dict[str, Tensor] | None = None  # cached text conditioning; None: encode the captions


class TrainingData(Protocol):
    def epoch_order(self, epoch: int, seed: int) -> list[list[int]]: ...

    def batch(self, indices: list[int], generator: torch.Generator, rng: random.Random) -> Batch: ...


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a run; checked on creation, naming the field and the accepted values."""

    steps: int = 100  # optimizer steps; ignored when epochs > 0
    epochs: int = 0
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-4
    te_lr: float = 0.0  # 0: text encoder not trained
    loraplus_ratio: float = 1.0
    optimizer: OptimizerName = "AdamW"
    weight_decay: float = 0.01
    scheduler: SchedulerName = "constant"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    cycles: int = 1
    power: float = 1.0
    min_snr_gamma: float = 0.0
    noise_offset: float = 0.0
    loss: LossName = "MSE"
    huber_delta: float = 0.1
    precision: Precision = "fp32"
    max_grad_norm: float = 1.0
    seed: int = 0
    # flow-matching models only (Flux, SD3, ...; lora_core.train.flow); SD1.x / SDXL ignore them
    timestep_sampling: TimestepSampling = "model"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 3.0
    loss_weighting: LossWeighting = "none"
    guidance: float = 1.0  # guidance-distilled models (Flux dev): the value trained at

    def __post_init__(self) -> None:
        checks = [
            ("steps", self.steps >= 1 or self.epochs >= 1, "at least 1 (or set epochs)"),
            ("epochs", self.epochs >= 0, "0 or more"),
            ("batch_size", self.batch_size >= 1, "at least 1"),
            ("grad_accum", self.grad_accum >= 1, "at least 1"),
            ("lr", self.lr > 0, "positive"),
            ("te_lr", self.te_lr >= 0, "0 (text encoder frozen) or positive"),
            ("loraplus_ratio", self.loraplus_ratio > 0, "positive (1 = plain LoRA)"),
            ("min_snr_gamma", self.min_snr_gamma >= 0, "0 (off) or positive, typically 5"),
            ("noise_offset", self.noise_offset >= 0, "0 (off) or positive, typically 0.05-0.1"),
            ("max_grad_norm", self.max_grad_norm >= 0, "0 (no clipping) or positive"),
        ]
        for name, ok, wanted in checks:
            if not ok:
                raise ValueError(f"`{name}` should be {wanted}, got {getattr(self, name)!r}")
        for name, value, allowed in (
            ("optimizer", self.optimizer, OPTIMIZERS),
            ("scheduler", self.scheduler, SCHEDULERS),
            ("loss", self.loss, LOSSES),
            ("precision", self.precision, tuple(PRECISIONS)),
            ("timestep_sampling", self.timestep_sampling, TIMESTEP_SAMPLINGS),
            ("loss_weighting", self.loss_weighting, LOSS_WEIGHTINGS),
        ):
            if value not in allowed:
                raise ValueError(f"`{name}` should be one of {', '.join(allowed)}, got {value!r}")
        warmup_from(1, self.warmup_steps, self.warmup_ratio)


@dataclass(frozen=True)
class StepReport:
    step: int  # optimizer steps done
    total: int
    loss: float
    lr: float
    eta_s: float
    epoch: int


@dataclass
class History:
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)


class Trainer:
    """Owns the optimizer, the random state and the data position for LoRA networks being trained."""

    def __init__(
        self,
        config: TrainConfig,
        data: TrainingData,
        predict: Predict,
        schedule: NoiseSchedule | Objective,
        unet: LoraNetwork,
        te: LoraNetwork | None = None,
        encode: Encode | None = None,
        device: torch.device | str = "cpu",
        check: Check | None = None,
    ):
        self.cfg, self.data, self.predict, self.schedule = config, data, predict, schedule
        # A discrete schedule (SD1.x / SDXL) or any Objective (flow matching for DiTs).
        self.objective = (
            DiscreteObjective(schedule, config.min_snr_gamma)
            if isinstance(schedule, NoiseSchedule)
            else schedule
        )
        self._check = check
        self.networks = {"unet": unet} if te is None else {"unet": unet, "te": te}
        if te is not None and (config.te_lr <= 0 or encode is None):
            raise ValueError("training the text encoder needs `te_lr` > 0 and an encode function")
        self.encode, self.device = encode, torch.device(device)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.rng = random.Random(config.seed)
        self.step, self.epoch, self.position = 0, 0, 0
        self.history = History()
        self._order: tuple[int, list[list[int]]] | None = None
        groups = unet.param_groups(config.lr, config.loraplus_ratio)
        if te is not None:
            groups += te.param_groups(config.te_lr, config.loraplus_ratio)
        for g in groups:
            g["initial_lr"] = g["lr"]
        self.params = all_params(groups)
        for p in self.params:
            p.requires_grad_(True)
        self.optimizer = make_optimizer(config.optimizer, groups, config.weight_decay)
        self.total_steps = self._total_steps()
        self.lr_schedule = Schedule(
            config.scheduler,
            self.total_steps,
            warmup_from(self.total_steps, config.warmup_steps, config.warmup_ratio),
            config.cycles,
            config.power,
        )
        self.autocast_dtype = PRECISIONS[config.precision]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        self._step_times: list[float] = []

    def _total_steps(self) -> int:
        if self.cfg.epochs <= 0:
            return self.cfg.steps
        per_epoch = len(self.data.epoch_order(0, self.cfg.seed))
        return max(1, self.cfg.epochs * per_epoch // self.cfg.grad_accum)

    # --- data -----------------------------------------------------------------------------
    def _next_indices(self) -> list[int]:
        if self._order is None or self._order[0] != self.epoch:
            self._order = (self.epoch, self.data.epoch_order(self.epoch, self.cfg.seed))
        order = self._order[1]
        if self.position >= len(order):
            self.epoch, self.position = self.epoch + 1, 0
            return self._next_indices()
        self.position += 1
        return order[self.position - 1]

    def _conds(self, batch: Batch) -> dict[str, Tensor]:
        if batch.conds is not None and "te" not in self.networks:
            return batch.conds
        if self.encode is None:
            raise ValueError("the batch has no cached text conditioning and no encode function was given")
        if "te" in self.networks:
            return self.encode(list(batch.captions))
        with torch.no_grad():
            return self.encode(list(batch.captions))

    def check_stop(self) -> None:
        """Raises if the caller's check says stop (e.g. ComfyUI's Cancel was pressed)."""
        if self._check is not None:
            self._check()

    # --- one step -------------------------------------------------------------------------
    def _micro_step(self) -> float:
        batch = self.data.batch(self._next_indices(), self.generator, self.rng)
        latents = batch.latents.float()
        noise = sample_noise(latents, self.generator, self.cfg.noise_offset)
        drawn = self.objective.draw(latents, noise, self.generator)
        dev = self.device
        enabled = self.cfg.precision != "fp32"
        with torch.autocast(dev.type, dtype=self.autocast_dtype, enabled=enabled):
            conds = self._conds(batch)
            pred = self.predict(drawn.noisy.to(dev), drawn.model_time.to(dev), conds)
        losses = per_sample_loss(pred, drawn.target.to(dev), self.cfg.loss, self.cfg.huber_delta)
        loss = (losses * drawn.weights.to(dev)).mean()
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"the loss became {loss.item()} at step {self.step + 1}: training stopped. Lower the learning "
                f"rate (now {self.cfg.lr:g}), or use fp32 or bf16 instead of fp16"
            )
        self.scaler.scale(loss / self.cfg.grad_accum).backward()
        return float(loss.detach())

    def _snapshot(self) -> tuple:
        return (self.generator.get_state(), self.rng.getstate(), self.epoch, self.position)

    def _restore(self, snap: tuple) -> None:
        self.generator.set_state(snap[0])
        self.rng.setstate(snap[1])
        self.epoch, self.position = snap[2], snap[3]

    def train_step(self) -> StepReport:
        """One optimizer step (grad_accum micro-batches). On any error the trainer is left exactly
        as it was before the step (weights, random state, data position), so it can be saved."""
        start = time.perf_counter()
        factor = self.lr_schedule.factor(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        snap = self._snapshot()
        try:
            total = 0.0
            for _ in range(self.cfg.grad_accum):
                # Each micro-step can take long (large batches, high resolution): a cancel is
                # honoured before every one, not only between optimizer steps.
                self.check_stop()
                total += self._micro_step()
            loss = total / self.cfg.grad_accum
        except BaseException:
            self._restore(snap)
            self.optimizer.zero_grad(set_to_none=True)
            raise
        if self.cfg.max_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        lr = self.optimizer.param_groups[0]["lr"]
        self.history.losses.append(loss)
        self.history.lrs.append(lr)
        self._step_times.append(time.perf_counter() - start)
        recent = self._step_times[-20:]
        eta = sum(recent) / len(recent) * (self.total_steps - self.step)
        return StepReport(self.step, self.total_steps, loss, lr, eta, self.epoch)

    # --- state ----------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, Tensor], dict]:
        """(tensors, JSON-able info): LoRA weights, optimizer, step, data position, RNG states."""
        tensors = {
            f"lora.{part}.{k}": v.detach().cpu().contiguous()
            for part, net in self.networks.items()
            for k, v in net.named_weights().items()
        }
        opt_tensors, opt_info = state_to_tensors(self.optimizer)
        tensors.update(opt_tensors)
        np_state = np.random.get_state()
        tensors["rng.trainer"] = self.generator.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["rng.numpy"] = torch.from_numpy(np_state[1].astype(np.int64))
        info = {
            "step": self.step,
            "epoch": self.epoch,
            "position": self.position,
            "total_steps": self.total_steps,
            "config": asdict(self.cfg),
            "history": asdict(self.history),
            "optimizer": opt_info,
            "scaler": self.scaler.state_dict(),
            "rng": {
                "trainer_random": _py_state(self.rng.getstate()),
                "python": _py_state(random.getstate()),
                "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
            },
        }
        return tensors, info

    def _check_fits(self, tensors: Mapping[str, Tensor]) -> None:
        """A state saved with other targets, blocks or rank is a settings error, not damage."""
        weights = {k for k in tensors if k.startswith("lora.")}
        params = {
            f"lora.{part}.{k}": p
            for part, net in self.networks.items()
            for k, p in net.named_weights().items()
        }
        if weights != set(params):
            missing, extra = sorted(set(params) - weights), sorted(weights - set(params))
            raise ValueError(
                f"the training state does not fit this network ({len(missing)} weights missing, e.g. "
                f"{missing[:1]}; {len(extra)} unexpected, e.g. {extra[:1]}): it was saved with other "
                "targets, blocks, rank or text-encoder setting; use the same settings or a new name"
            )
        for key, p in params.items():
            if tuple(tensors[key].shape) != tuple(p.shape):
                raise ValueError(
                    f"the training state's {key} has shape {tuple(tensors[key].shape)}, this network's "
                    f"{tuple(p.shape)}: it was saved with another rank; use the same rank or a new name"
                )

    @property
    def ranks(self) -> int:
        """Processes training this run together (data parallel: DataParallelTrainer's world size)."""
        return 1

    def load_state(self, tensors: Mapping[str, Tensor], info: Mapping, source: str = "state") -> None:
        """Restores a state (``Trainer.state``); ValueError if it does not fit these settings,
        DamagedStateError (naming ``source``) if its contents do not load."""
        saved = info.get("world_size", 1) if isinstance(info, Mapping) else 1
        if saved != self.ranks:
            raise ValueError(
                f"the training state {source} was saved by a run of {saved} rank(s), this run has {self.ranks}: "
                "resuming would change the global batch (batch_size x ranks), so the run would no longer be "
                f"the one saved. Resume with {saved} rank(s), or start over under a new output name or with "
                "`existing` set to 'overwrite'"
            )
        self._check_fits(tensors)
        try:
            self._apply_state(tensors, info)
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
            raise DamagedStateError(source, f"{type(e).__name__}: {e}") from e

    def _apply_state(self, tensors: Mapping[str, Tensor], info: Mapping) -> None:
        with torch.no_grad():
            for part, net in self.networks.items():
                for k, p in net.named_weights().items():
                    p.copy_(tensors[f"lora.{part}.{k}"])
        self.optimizer.load_state_dict(state_from_tensors(dict(tensors), info["optimizer"]))
        self.scaler.load_state_dict(info["scaler"])
        self.step, self.epoch, self.position = int(info["step"]), int(info["epoch"]), int(info["position"])
        self.history = History(**info["history"])
        self._order = None
        rng = info["rng"]
        self.generator.set_state(tensors["rng.trainer"])
        self.rng.setstate(_py_tuple(rng["trainer_random"]))
        torch.set_rng_state(tensors["rng.torch"])
        random.setstate(_py_tuple(rng["python"]))
        kind, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))


def _py_state(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _py_tuple(state: list) -> tuple:
    return (state[0], tuple(state[1]), state[2])
