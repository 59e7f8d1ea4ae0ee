"""Training nodes: LoRA Training Dataset (a folder read into cached latents and caption embeddings)
and Train LoRA (the run, its checkpoints, live loss, and the result applied to MODEL and CLIP)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..lora_core.budget import TrainSettings, check_fits, train_need
from ..lora_core.files.confine import resolve_folder
from ..lora_core.files.savefile import safe_output_name
from ..lora_core.train.dataset import (
    Batches,
    DatasetOptions,
    batch_encoder,
    build_dataset,
    scan_dataset,
    tag_frequency,
)
from ..lora_core.train.existing import EXISTING, handle_existing
from ..lora_core.train.flow import LOSS_WEIGHTINGS, TIMESTEP_SAMPLINGS
from ..lora_core.train.heap import release_freed_memory
from ..lora_core.train.hooks import check_trains_through, recast_frozen_linears
from ..lora_core.train.key_names import KEY_NAMES
from ..lora_core.train.network import (
    TARGET_HELP,
    TARGETS,
    LoraNetwork,
    select_targets,
)
from ..lora_core.train.optim import OPTIMIZERS, MissingPackageError
from ..lora_core.train.parallel import DataParallelTrainer, World
from ..lora_core.train.plot import loss_curve
from ..lora_core.train.run import RunInfo, RunResult, fit
from ..lora_core.train.schedule import SCHEDULERS
from ..lora_core.train.state import LONGEST_SUFFIX, CheckpointPlan
from ..lora_core.train.trainer import PRECISIONS, NonFiniteLossError, StepReport, TrainConfig, Trainer
from . import comfy_bridge as bridge
from . import comfy_bridge_dit as dit_bridge
from . import comfy_bridge_train as train_bridge
from .load_lora import apply_lora
from .train_model import (  # noqa: F401 - tests and the job runner import these from here
    block_hooks,
    check_blocks,
    check_resolution,
    clip_targets,
    key_name_pieces,
    model_targets,
    objective_for,
    train_targets,
)

CATEGORY = "LoRA Foundry/training"
DATASET_TYPE = "LORA_TRAINING_DATASET"
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, MissingPackageError, NonFiniteLossError)


def _tip(spec: tuple, tooltip: str) -> tuple:
    kind, options = spec if len(spec) == 2 else (spec[0], {})
    return (kind, {**options, "tooltip": tooltip})


class LoraTrainingDataset:
    DESCRIPTION = (
        "Reads a folder of images with same-name .txt captions (kohya N_name repeat folders too) and "
        "caches their latents and caption embeddings for Train LoRA. The folder is never changed."
    )
    CATEGORY = CATEGORY
    FUNCTION = "execute"
    RETURN_TYPES = (DATASET_TYPE, "STRING")
    RETURN_NAMES = ("dataset", "summary")
    OUTPUT_TOOLTIPS = ("Cached training data for Train LoRA.", "Images, buckets and anything skipped.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "folder": _tip(("STRING", {"default": "lora_dataset"}), "Folder of images and .txt captions, inside ComfyUI's input folder (relative names start there); absolute paths work inside input, output, the models folders or a folder the server's owner allowed (allowed_folders.txt). Links leading out of the folder are skipped."),
                "vae": _tip(("VAE",), "Encodes the images to latents once, before training."),
                "clip": _tip(("CLIP",), "Encodes the captions once (unless tags are shuffled)."),
                "resolution": _tip(("INT", {"default": 512, "min": 64, "max": 2048, "step": 64}), "Training resolution: images go to buckets of about this many pixels squared."),
                "trigger_word": _tip(("STRING", {"default": ""}), "Put first in every caption (and recorded in the file so loaders can show it)."),
                "buckets": _tip(("BOOLEAN", {"default": True}), "Aspect-ratio buckets; off: every image is cropped square."),
                "crop": _tip((["center", "random"],), "Where an image is cropped to its bucket: the centre, or a new random window each step."),
                "flip": _tip(("BOOLEAN", {"default": False}), "Randomly mirror images left-right (not for asymmetric subjects or text)."),
                "shuffle_tags": _tip(("BOOLEAN", {"default": False}), "Shuffle caption tags each step (captions are then encoded every step)."),
                "keep_tags": _tip(("INT", {"default": 0, "min": 0, "max": 64}), "Tags after the trigger word that keep their place when shuffling."),
                "caption_dropout": _tip(("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01}), "Chance of training a step with an empty caption."),
                "repeats": _tip(("INT", {"default": 1, "min": 1, "max": 1000}), "Repeats per epoch for images directly in the folder (N_name subfolders use N)."),
                "cache": _tip((["memory", "disk"],), "Keep cached latents in memory only, or also on disk (output/lora_foundry_cache, safetensors) to reuse them next time."),
            }
        }  # fmt: skip

    def execute(self, folder, vae, clip, resolution, trigger_word, buckets, crop, flip, shuffle_tags, keep_tags,
                caption_dropout, repeats, cache):  # fmt: skip
        node = "LoRA Training Dataset"
        try:
            options = DatasetOptions(resolution, buckets, crop, flip, trigger_word, shuffle_tags, keep_tags,
                                     caption_dropout, repeats)  # fmt: skip
            scan = scan_dataset(_dataset_folder(folder), options)
            cache_dir = Path(train_bridge.cache_directory()) if cache == "disk" else None
            bar = bridge.progress(len(scan.entries))
            dataset = build_dataset(scan, options, train_bridge.image_encoder(vae), batch_encoder(train_bridge.caption_encoder(clip)),
                                    cache_dir, _encoder_id(vae, clip, cache), on_item=bar)  # fmt: skip
        except USER_ERRORS as e:
            raise RuntimeError(f"[{node}] {e}") from e
        return (dataset, dataset.summary())


def _encoder_id(vae, clip, cache: str) -> str:
    return (
        f"{train_bridge.weights_fingerprint(vae)}:{train_bridge.weights_fingerprint(clip)}"
        if cache == "disk"
        else ""
    )


def _dataset_folder(folder: str) -> Path:
    """The folder's real path, confined to the folders this server lets nodes read (lora_core.files.confine)."""
    return resolve_folder(folder, bridge.confinement_roots(), "folder")


@dataclass(frozen=True)
class NetworkSettings:
    rank: int
    alpha: float
    targets: str
    blocks: str
    dora: bool
    gradient_checkpointing: bool


@dataclass(frozen=True)
class SampleSettings:
    every: int = 0
    prompt: str = ""
    seed: int = 0
    vae: object = None


class TrainLora:
    DESCRIPTION = (
        "Trains a LoRA on a LoRA Training Dataset: saves it into models/loras/<name>/ (kohya format with "
        "training metadata) every N steps and at the end, resumes exactly after a stop, and outputs MODEL "
        "and CLIP with the LoRA applied and the loss curve. Live loss is sent to the browser."
    )
    CATEGORY = CATEGORY
    FUNCTION = "execute"
    OUTPUT_NODE = True
    RETURN_TYPES = ("MODEL", "CLIP", "STRING", "IMAGE")
    RETURN_NAMES = ("MODEL", "CLIP", "lora_name", "loss_curve")
    OUTPUT_TOOLTIPS = (
        "The model with the trained LoRA applied (through Load LoRA's path).",
        "The text encoder with the trained LoRA applied.",
        "The saved file's name as Load LoRA lists it (<name>/<name>.safetensors).",
        "Loss per step (raw and smoothed) with the learning rate on a second axis.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        targets = "; ".join(f"{k}: {v}" for k, v in TARGET_HELP.items())
        return {
            "required": {
                "model": _tip(("MODEL",), "The base model to train on: SD1.x, SD2.x, SDXL, or a flow-matching DiT (Flux, SD3, ...)."),
                "clip": _tip(("CLIP",), "Its text encoder: trained when te_lr > 0, and used when tags are shuffled."),
                "dataset": _tip((DATASET_TYPE,), "From LoRA Training Dataset."),
                "output_name": _tip(("STRING", {"default": "my_lora"}), "Saved as models/loras/<name>/<name>.safetensors, with <name>-stepNNNNNN checkpoints."),
                "steps": _tip(("INT", {"default": 500, "min": 1, "max": 1000000}), "Optimizer steps (ignored when epochs > 0)."),
                "epochs": _tip(("INT", {"default": 0, "min": 0, "max": 10000}), "Passes over the data set (with repeats); 0: use steps."),
                "batch_size": _tip(("INT", {"default": 1, "min": 1, "max": 256}), "Images per batch (one bucket per batch)."),
                "grad_accum": _tip(("INT", {"default": 1, "min": 1, "max": 256}), "Batches accumulated per optimizer step."),
                "rank": _tip(("INT", {"default": 16, "min": 1, "max": 1024}), "LoRA rank (dim): 4-8 simple, 16-32 styles, 64-128 detailed subjects."),
                "alpha": _tip(("FLOAT", {"default": 16.0, "min": 0.01, "max": 1024.0, "step": 0.01}), "Network alpha: the LoRA is scaled by alpha / rank (alpha = rank: scale 1)."),
                "targets": _tip((list(TARGETS),), f"Layers to adapt. {targets}."),
                "blocks": _tip(("STRING", {"default": ""}), "Optional blocks to train in the model's own numbering: UNets 'in4-8, mid, out0-5'; Flux 'double0-18, single0-37'; SD3 'joint0-23'; Z-Image 'layer0-29'; Qwen-Image 'block0-59'. Empty: all."),
                "lr": _tip(("FLOAT", {"default": 1e-4, "min": 1e-7, "max": 10.0, "step": 1e-6}), "UNet learning rate (Prodigy: use 1.0)."),
                "te_lr": _tip(("FLOAT", {"default": 0.0, "min": 0.0, "max": 10.0, "step": 1e-6}), "Text-encoder learning rate; 0 keeps the text encoder frozen (and its embeddings cached)."),
                "optimizer": _tip((list(OPTIMIZERS),), "AdamW8bit needs bitsandbytes, Prodigy needs prodigyopt installed."),
                "scheduler": _tip((list(SCHEDULERS),), "Learning-rate schedule over the whole run."),
                "warmup_steps": _tip(("INT", {"default": 0, "min": 0, "max": 100000}), "Linear warm-up steps (wins over warmup_ratio)."),
                "warmup_ratio": _tip(("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.99, "step": 0.01}), "Warm-up as a fraction of the run, e.g. 0.05."),
                "min_snr_gamma": _tip(("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.5}), "Min-SNR loss weighting; 5 is usual, 0 off."),
                "noise_offset": _tip(("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01}), "Offset noise for darker/brighter images; 0.05-0.1 typical, 0 off."),
                "loss": _tip((["MSE", "Huber"],), "MSE on the predicted noise, or Huber (robust to outliers)."),
                "precision": _tip((list(PRECISIONS),), "Compute precision: fp32, bf16, or fp16 with loss scaling. LoRA weights stay fp32."),
                "gradient_checkpointing": _tip(("BOOLEAN", {"default": True}), "Recompute UNet blocks in backward: much less memory, a little slower."),
                "seed": _tip(("INT", {"default": 0, "min": 0, "max": 2**31 - 1}), "Seed for LoRA init, data order, noise and timesteps."),
                "loraplus_ratio": _tip(("FLOAT", {"default": 1.0, "min": 0.01, "max": 64.0, "step": 0.5}), "LoRA+: the up (B) matrices learn this many times faster; 16 typical, 1 off."),
                "dora": _tip(("BOOLEAN", {"default": False}), "DoRA: also learn a per-column magnitude (saved as dora_scale)."),
                "save_every": _tip(("INT", {"default": 0, "min": 0, "max": 1000000}), "Save a checkpoint every N steps (0: only at the end)."),
                "keep_last": _tip(("INT", {"default": 3, "min": 0, "max": 1000}), "Step checkpoints kept (older ones are deleted); 0 keeps all."),
                "save_dtype": _tip((["fp16", "bf16", "fp32"],), "Precision of the saved LoRA file."),
                "existing": _tip((list(EXISTING),), "If the run folder has files: resume from the newest state, overwrite them, or stop with an error."),
            },
            "optional": {
                "cycles": _tip(("INT", {"default": 3, "min": 1, "max": 100}), "Restarts for cosine_with_restarts."),
                "power": _tip(("FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0, "step": 0.1}), "Exponent for the polynomial schedule."),
                "vae": _tip(("VAE",), "Needed for sample images (sample_every > 0): decodes them."),
                "sample_every": _tip(("INT", {"default": 0, "min": 0, "max": 1000000}), "Save a sample image every N steps (0: off) to output/lora_foundry/samples/<name>/, with the prompt and seed below; needs vae."),
                "sample_prompt": _tip(("STRING", {"default": ""}), "Prompt of the sample images (put the trigger word in it)."),
                "sample_seed": _tip(("INT", {"default": 0, "min": 0, "max": 2**31 - 1}), "Seed of the sample images: the same for every sample, so they show what training changed."),
                "timestep_sampling": _tip((list(TIMESTEP_SAMPLINGS),), "Flow-matching models (Flux, SD3 ...): how noise levels are drawn. model: the model's own shift; uniform; logit_normal (mean/std below); shift (fixed shift below); flux_shift (Flux's resolution-dependent shift). SD1.x/SDXL ignore it."),
                "logit_mean": _tip(("FLOAT", {"default": 0.0, "min": -5.0, "max": 5.0, "step": 0.05}), "Mean of logit_normal sampling (0: centred)."),
                "logit_std": _tip(("FLOAT", {"default": 1.0, "min": 0.05, "max": 5.0, "step": 0.05}), "Spread of logit_normal sampling."),
                "shift": _tip(("FLOAT", {"default": 3.0, "min": 0.05, "max": 100.0, "step": 0.05}), "Fixed shift for timestep_sampling 'shift' (SD3 uses 3): higher trains noisier steps."),
                "loss_weighting": _tip((list(LOSS_WEIGHTINGS),), "Flow-matching loss weighting per noise level: none, sigma_sqrt or cosmap."),
                "guidance": _tip(("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1}), "Guidance value fed to guidance-distilled models (Flux dev) while training; 1.0 is what trainers use."),
                "key_names": _tip((list(KEY_NAMES),), "Key names of the saved file. kohya: sd-scripts' lora_unet_ names with alpha (ComfyUI, kohya tools). diffusers: transformer.<diffusers module>.lora_A / lora_B, fused q/k/v split per module, alpha/rank folded into lora_B, for diffusers' own loader (DiTs whose ComfyUI key map has diffusers names: SD3, Flux, Qwen-Image ...; others are refused before training)."),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }  # fmt: skip

    def execute(self, model, clip, dataset, output_name, rank, alpha, targets, blocks, dora, gradient_checkpointing,
                save_every, keep_last, save_dtype, existing, cycles=3, power=1.0, vae=None, sample_every=0,
                sample_prompt="", sample_seed=0, key_names="kohya", unique_id=None, **train):  # fmt: skip
        node = "Train LoRA"
        try:
            cfg = TrainConfig(**train, cycles=cycles, power=power)
            net = NetworkSettings(rank, alpha, targets, blocks, dora, gradient_checkpointing)
            samples = SampleSettings(sample_every, sample_prompt, sample_seed, vae)
            plan = plan_run(
                model, dataset, net, output_name, save_every, keep_last, save_dtype, samples, key_names
            )
            handle_existing(plan, existing)
            with torch.inference_mode(False), torch.enable_grad():
                try:
                    result = run_training(model, clip, dataset, cfg, net, plan, unique_id, samples)
                finally:  # what the run freed goes back to the system, not kept by the server's heap
                    release_freed_memory()
        except USER_ERRORS as e:
            raise RuntimeError(f"[{node}] {e}") from e
        lora_name = bridge.register_new_lora(str(result.path))
        new_model, new_clip, _, _ = apply_lora(node, model, clip, lora_name, 1.0, 1.0, "")
        curve = torch.from_numpy(loss_curve(result.losses, result.lrs))[None]
        text = (
            f"{lora_name}: {result.step} steps, final loss {result.losses[-1]:.4f}"
            if result.losses
            else lora_name
        )
        text = "\n".join([text, *(f"note: {n}" for n in result.notes)])
        return {
            "ui": {"text": [text], bridge.LORA_WRITTEN: [lora_name]},
            "result": (new_model, new_clip, lora_name, curve),
        }


def plan_run(model, dataset, net: NetworkSettings, output_name: str, save_every: int, keep_last: int,
             save_dtype: str, samples: SampleSettings, key_names: str = "kohya") -> CheckpointPlan:  # fmt: skip
    """Checks a run's settings against the MODEL and data set before anything loads (Train LoRA and
    headless jobs alike); returns where its files go and under which key names."""
    name = safe_output_name(output_name, LONGEST_SUFFIX)[: -len(".safetensors")]
    train_bridge.model_objective_kind(model)  # a family it cannot train: said before anything loads
    check_blocks(model, net.blocks)  # a wrong block spec is said before anything loads
    check_resolution(dataset, model)
    if samples.every and samples.vae is None:
        raise ValueError("`sample_every` is set but no `vae` is connected: connect the VAE or set it to 0")
    pieces = key_name_pieces(model, key_names, net.targets, net.blocks, net.dora)
    return CheckpointPlan(
        Path(bridge.loras_dir()) / name, name, save_every, keep_last, save_dtype, pieces=pieces
    )


def _check_memory(model, clip, device, targets, cfg: TrainConfig, net: NetworkSettings, dataset) -> None:
    """Refuses settings whose LoRA, optimizer state and activations clearly cannot fit the device."""
    settings = TrainSettings(net.rank, net.dora, cfg.optimizer, cfg.batch_size, dataset.options.resolution,
                             net.targets, net.blocks)  # fmt: skip
    need = train_need(
        [tuple(t.module.weight.shape) for t in targets], settings, bridge.model_unet_config(model)
    )
    keep = [model] + ([clip.patcher] if clip is not None else [])
    check_fits(need, bridge.available_memory(device, keep), str(device))


def run_training(
    model,
    clip,
    dataset,
    cfg: TrainConfig,
    net: NetworkSettings,
    plan: CheckpointPlan,
    unique_id,
    samples: SampleSettings | None = None,
    world: World | None = None,
    on_report: Callable[[StepReport], None] | None = None,
) -> RunResult:
    """Builds the networks and the trainer from ComfyUI's objects and runs it with checkpoints.
    ``world``: a data-parallel rank (headless jobs under torchrun); ``on_report``: each step's report."""
    samples = samples or SampleSettings()
    world = world or World()
    train_te = cfg.te_lr > 0
    needs_clip = train_te or dataset.options.captions_vary
    if needs_clip and clip is None:
        raise ValueError("`clip` is needed to train the text encoder (te_lr > 0) or to shuffle tags")
    if train_te and plan.pieces is not None:
        raise ValueError(
            "`key_names` 'diffusers' names the model's layers only: set `te_lr` to 0 or `key_names` to 'kohya'"
        )
    device = train_bridge.prepare_for_training(model, clip if needs_clip else None)
    bridge.check_interrupted()  # loading can take minutes: a cancel meanwhile stops here
    unet_targets = train_targets(model, net.targets, net.blocks)
    check_trains_through(unet_targets)
    te_targets = select_targets(clip_targets(clip), net.targets) if train_te else []
    _check_memory(model, clip if needs_clip else None, device, unet_targets + te_targets, cfg, net, dataset)
    unet = LoraNetwork(unet_targets, net.rank, net.alpha, net.dora, cfg.seed).to(device)
    te = LoraNetwork(te_targets, net.rank, net.alpha, net.dora, cfg.seed + 1).to(device) if train_te else None
    data = Batches(dataset, cfg.batch_size * world.size, train_bridge.latent_transform(model))
    encode = batch_encoder(train_bridge.caption_encoder(clip)) if needs_clip else None
    predict, objective = objective_for(model, cfg)
    parallel = {"world": world} if world.size > 1 else {}
    trainer = (DataParallelTrainer if parallel else Trainer)(cfg, data, predict, objective, unet, te, encode,
                                                             device, check=bridge.check_interrupted, **parallel)  # fmt: skip
    family = train_bridge.training_metadata(model)
    run = RunInfo(
        base_model=bridge.model_class_name(model),
        base_model_version=family["ss_base_model_version"],
        modelspec_architecture=family.get("modelspec.architecture"),
        resolution=dataset.options.resolution,
        num_images=dataset.num_images,
        dataset_dirs=dataset.dataset_dirs(),
        tag_frequency=tag_frequency(dataset.scan.entries, dataset.options.trigger_word),
        targets=net.targets,
    )
    bar = bridge.progress(trainer.total_steps)

    sample = None
    if samples.every:
        size = dataset.options.resolution
        sample = train_bridge.sampler(model, clip, samples.vae, samples.prompt, samples.seed, size, size)

    def on_step(report) -> None:
        train_bridge.send_event({"node": unique_id, "step": report.step, "total": report.total,
                           "loss": report.loss, "lr": report.lr, "eta_s": report.eta_s})  # fmt: skip
        bar(report.step)
        if on_report is not None:
            on_report(report)
        if sample is not None and report.step % samples.every == 0:
            train_bridge.save_sample(sample(), plan.name, report.step)

    undo = block_hooks(model, net.gradient_checkpointing)
    undo.append(recast_frozen_linears(dit_bridge.plain_cast_linears(model)))
    if train_te:
        undo.append(train_bridge.text_encoder_grad_safe(clip))
    networks = [n for n in (unet, te) if n is not None]
    for n in networks:
        n.attach()
    try:
        return fit(trainer, plan, run, on_step, resume_existing=True, writes=world.writes)
    finally:
        for n in networks:
            n.detach()
        for fn in undo:
            fn()
