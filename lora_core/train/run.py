"""Running a training to its end: resume (falling back past damaged states), periodic checkpoints,
stop-and-save on errors, NaN stop."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..files.savefile import kohya_metadata
from .state import CheckpointPlan, DamagedStateError, list_states, read_state, save_checkpoint
from .trainer import NonFiniteLossError, StepReport, TrainConfig, Trainer

log = logging.getLogger("lora_foundry")

# What may differ between the run that saved a state and the run resuming it.
RESUMABLE_CHANGES = frozenset({"steps", "epochs"})


@dataclass(frozen=True)
class RunInfo:
    """What the saved file's metadata says about the run besides the trainer's config."""

    base_model: str = ""  # e.g. the checkpoint file name
    base_model_version: str = "sd_v1"  # kohya's ss_base_model_version
    resolution: int = 512
    num_images: int = 0
    dataset_dirs: Mapping[str, Mapping[str, int]] | None = None  # folder -> {n_repeats, img_count}
    tag_frequency: Mapping[str, Mapping[str, int]] | None = None
    targets: str = "attention"
    modelspec_architecture: str | None = None


@dataclass(frozen=True)
class RunResult:
    path: Path
    step: int
    resumed_from: int
    losses: tuple[float, ...]
    lrs: tuple[float, ...]
    notes: tuple[str, ...] = ()  # what the user should know, e.g. a damaged state skipped on resume


def training_metadata(trainer: Trainer, run: RunInfo, name: str, started: float) -> dict[str, str]:
    cfg, unet = trainer.cfg, trainer.networks["unet"]
    meta = kohya_metadata(
        network_dim=unet.rank,
        network_alpha=unet.alpha,
        base_model_version=run.base_model_version,
        output_name=name,
        tag_frequency=run.tag_frequency,
        modelspec_architecture=run.modelspec_architecture,
        timestamp=started,
    )
    args = {"targets": run.targets}
    if unet.dora:
        args["dora_wd"] = "True"
    if cfg.loraplus_ratio != 1.0:
        args["loraplus_lr_ratio"] = str(cfg.loraplus_ratio)
    meta.update(
        {
            "ss_network_args": json.dumps(args),
            "ss_learning_rate": str(cfg.lr),
            "ss_unet_lr": str(cfg.lr),
            "ss_text_encoder_lr": str(cfg.te_lr),
            "ss_network_train_unet_only": str("te" not in trainer.networks),
            "ss_optimizer": cfg.optimizer,
            "ss_lr_scheduler": cfg.scheduler,
            "ss_lr_warmup_steps": str(trainer.lr_schedule.warmup_steps),
            "ss_max_train_steps": str(trainer.total_steps),
            "ss_steps": str(trainer.step),
            "ss_epoch": str(trainer.epoch),
            "ss_num_train_images": str(run.num_images),
            "ss_resolution": f"({run.resolution}, {run.resolution})",
            "ss_batch_size_per_device": str(cfg.batch_size),
            "ss_gradient_accumulation_steps": str(cfg.grad_accum),
            "ss_min_snr_gamma": str(cfg.min_snr_gamma),
            "ss_noise_offset": str(cfg.noise_offset),
            "ss_loss_type": cfg.loss.lower(),
            "ss_mixed_precision": {"fp32": "no"}.get(cfg.precision, cfg.precision),
            "ss_seed": str(cfg.seed),
            "ss_sd_model_name": run.base_model,
            "ss_training_started_at": str(started),
            "ss_training_finished_at": str(time.time()),
        }
    )
    if run.dataset_dirs is not None:
        meta["ss_dataset_dirs"] = json.dumps(run.dataset_dirs, ensure_ascii=False)
    return meta


def diffusers_named(meta: Mapping[str, str], rank: int) -> dict[str, str]:
    """The metadata of a file saved under diffusers names (key_names.py): alpha / rank is folded into
    lora_B, so the file's alpha is its rank (scale 1); the trained alpha and the naming are kept in
    ss_network_args."""
    out = dict(meta)
    args = json.loads(out.get("ss_network_args", "{}"))
    args |= {"key_names": "diffusers", "trained_alpha": out["ss_network_alpha"]}
    out["ss_network_args"] = json.dumps(args)
    out["ss_network_alpha"] = str(float(rank))
    return out


def _check_resumable(saved: Mapping, current: Mapping, where: Path) -> None:
    # A setting added after the state was saved counts at its default (the value that run used).
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    changed = sorted(
        k for k in current if k not in RESUMABLE_CHANGES and saved.get(k, defaults.get(k)) != current[k]
    )
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed[:4])
        raise ValueError(
            f"cannot resume from {where.name}: settings changed since it was saved ({detail}); set them "
            "back, choose another output name, or set `existing` to 'overwrite' to start over"
        )


def resume(trainer: Trainer, plan: CheckpointPlan, notes: list[str] | None = None) -> int:
    """Loads the newest good state in the run folder into the trainer; returns its step (0 if none).

    A damaged state is skipped for the one before it, with a note (appended to ``notes`` and
    logged); if every state is damaged the error names the newest. Changed settings are not
    damage: they stop the run (``_check_resumable``).
    """
    notes = notes if notes is not None else []
    damaged: list[DamagedStateError] = []
    for _, path in reversed(list_states(plan)):
        trainer.check_stop()  # reading a large state takes a while: honour a cancel between them
        try:
            tensors, info = read_state(path)
            _check_resumable(info["config"], asdict(trainer.cfg), path)
            trainer.load_state(tensors, info, source=str(path)[: -len(".json")])
        except DamagedStateError as error:
            damaged.append(error)
            continue
        step = int(info["step"])
        for error in damaged:
            notes.append(
                f"training state {error.path.name} is damaged ({error.why}); resumed from {path.name} "
                f"(step {step}) instead"
            )
            log.warning("[Train LoRA] %s", notes[-1])
        log.info("[Train LoRA] resumed %s at step %d", plan.name, step)
        return step
    if damaged:
        raise damaged[0]
    return 0


def fit(
    trainer: Trainer,
    plan: CheckpointPlan,
    run: RunInfo,
    on_step: Callable[[StepReport], None] | None = None,
    resume_existing: bool = True,
    stop_after: int | None = None,
    writes: bool = True,
) -> RunResult:
    """Trains to the end (or to stop_after steps, for tests and previews) with checkpoints.

    Any error during a step (ComfyUI's cancel included) saves a checkpoint of the last completed
    step and is re-raised; a NaN/Inf loss saves nothing, so the last good checkpoint stays.
    ``writes`` False (data-parallel ranks but the first): the same run, but no file is written.
    """
    plan.folder.mkdir(parents=True, exist_ok=True)
    started = time.time()
    notes: list[str] = []
    start = resume(trainer, plan, notes) if resume_existing else 0
    last_saved: Path | None = None

    def save(final: bool) -> Path:
        if not writes:
            return plan.lora_path(None if final else trainer.step)
        meta = training_metadata(trainer, run, plan.name, started)
        if plan.pieces is not None:
            meta = diffusers_named(meta, trainer.networks["unet"].rank)
        return save_checkpoint(plan, trainer.networks, trainer.state(), meta, final)

    end = trainer.total_steps if stop_after is None else min(trainer.total_steps, stop_after)
    try:
        while trainer.step < end:
            report = trainer.train_step()
            if on_step is not None:
                on_step(report)
            if plan.every and trainer.step % plan.every == 0 and trainer.step < trainer.total_steps:
                last_saved = save(final=False)
    except NonFiniteLossError as error:
        kept = last_saved or _newest(plan)
        where = (
            f"; the last good checkpoint is {kept.name}" if kept else "; no checkpoint was saved before it"
        )
        raise NonFiniteLossError(f"{error}{where}") from error
    except BaseException:
        if trainer.step > start:
            path = save(final=False)
            log.warning(
                "[Train LoRA] stopped at step %d; saved %s (resume by running again)", trainer.step, path.name
            )
        raise
    final = trainer.step >= trainer.total_steps
    path = save(final=final)
    h = trainer.history
    return RunResult(path, trainer.step, start, tuple(h.losses), tuple(h.lrs), tuple(notes))


def _newest(plan: CheckpointPlan) -> Path | None:
    states = list_states(plan)
    if not states:
        return None
    stem = states[-1][1].name[: -len(".trainstate.json")]
    path = plan.folder / f"{stem}.safetensors"
    return path if path.exists() else None
