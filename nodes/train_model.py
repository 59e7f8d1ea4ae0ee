"""What Train LoRA trains on a MODEL: its targets and blocks in the model's own numbering, the
resolutions it takes, its objective (flow or discrete schedule) and the hooks a run puts on its blocks."""

from __future__ import annotations

from ..lora_core.files.families import by_comfy_class
from ..lora_core.train.dit_blocks import group_counts, in_blocks, parse_dit_blocks
from ..lora_core.train.flow import FlowObjective
from ..lora_core.train.hooks import clone_inputs
from ..lora_core.train.key_names import KEY_NAMES, PREFIX, diffusers_pieces
from ..lora_core.train.loss import NoiseSchedule
from ..lora_core.train.network import check_before_forward, checkpoint_forward, parse_blocks, select_targets
from ..lora_core.train.targets import targets_from_key_map
from ..lora_core.train.trainer import TrainConfig
from . import comfy_bridge as bridge
from . import comfy_bridge_dit as dit_bridge
from . import comfy_bridge_train as train_bridge


def model_targets(model) -> list:
    """Every weight of the MODEL a LoRA file can address, as lora_core Targets."""
    return targets_from_key_map(*train_bridge.unet_target_source(model))


def clip_targets(clip) -> list:
    """The text encoder's weights as lora_core Targets."""
    return targets_from_key_map(*train_bridge.clip_target_source(clip))


def check_resolution(dataset, model) -> None:
    """Every bucket must split into the DiT's patches (latent 8x smaller, p x p latent pixels per
    token); the error names the nearest size that does."""
    step = 8 * train_bridge.patch_size(model)
    for size in sorted({s.bucket for s in dataset.samples}):
        if any(side % step for side in size):
            nearest = tuple(max(step, int(side / step + 0.5) * step) for side in size)  # halves round up
            raise ValueError(
                f"the dataset has images at {size[0]}x{size[1]}, which this model cannot take (sides must be "
                f"multiples of {step}); the nearest valid size is {nearest[0]}x{nearest[1]}: set the dataset's "
                f"resolution so buckets fit, e.g. {round(dataset.options.resolution / step) * step}"
            )


def check_blocks(model, spec: str) -> set | None:
    """The blocks ``spec`` names in the MODEL's own numbering, checked against its real blocks:
    in/mid/out for UNets ('in4-8, mid'), the DiT's block lists ('double0-18, single0-37' for Flux)."""
    counts = bridge.unet_block_counts(model)
    if counts is not None:
        return parse_blocks(spec, counts)
    return parse_dit_blocks(spec, group_counts(dit_bridge.dit_block_lists(model)))


def train_targets(model, preset: str, spec: str) -> list:
    """The MODEL's targets of a preset inside the blocks ``spec`` names."""
    counts = bridge.unet_block_counts(model)
    if counts is not None:
        return select_targets(model_targets(model), preset, spec, counts)
    return in_blocks(select_targets(model_targets(model), preset), check_blocks(model, spec))


def key_name_pieces(model, key_names: str, preset: str, spec: str, dora: bool) -> dict | None:
    """None for kohya names; for diffusers names, each trained module's diffusers pieces from the
    MODEL's key map (lora_core.train.key_names), or a ValueError naming the family and the fix,
    before anything loads."""
    if key_names not in KEY_NAMES:
        raise ValueError(f"`key_names` should be one of {', '.join(KEY_NAMES)}, got {key_names!r}")
    if key_names == "kohya":
        return None
    name = bridge.model_class_name(model)
    family = family.label if (family := by_comfy_class(name)) else name
    if dora:
        raise ValueError(
            "`key_names` 'diffusers' cannot hold DoRA (diffusers' loaders drop kohya's dora_scale): turn "
            "`dora` off or set `key_names` to 'kohya'"
        )
    trained = {
        t.name: (f"{t.path}.weight", t.module.weight.shape[0]) for t in train_targets(model, preset, spec)
    }
    return diffusers_pieces(trained, bridge.diffusers_row_map(model, PREFIX), family)


def objective_for(model, cfg: TrainConfig) -> tuple:
    """(predictor, objective) for the MODEL: flow matching driven by its own sampling for CONST
    (flow) models, its discrete DDPM schedule (eps / v, min-SNR) for SD1.x / SD2.x / SDXL."""
    if train_bridge.model_objective_kind(model) == "discrete":
        schedule = NoiseSchedule.from_sigmas(*train_bridge.discrete_schedule(model))
        return train_bridge.noise_predictor(model), schedule
    if cfg.min_snr_gamma > 0:
        raise ValueError(
            "`min_snr_gamma` applies to eps / v-prediction models; this is a flow-matching model: set it to 0 "
            "and use `loss_weighting` instead"
        )
    objective = FlowObjective(train_bridge.sigma_of_t(model), cfg.timestep_sampling, cfg.logit_mean, cfg.logit_std,
                              cfg.shift, cfg.loss_weighting, train_bridge.patch_size(model) ** 2)  # fmt: skip
    return train_bridge.flow_predictor(model, cfg.guidance), objective


def block_hooks(model, checkpointing: bool) -> list:
    """The hooks a run puts on the MODEL's blocks (the modules ComfyUI calls one by one): copies of
    the inputs DiT blocks overwrite in place, a differentiable RoPE, gradient checkpointing, the
    cancel check before each block. Returns their undo functions."""
    blocks = dit_bridge.checkpoint_blocks(model)
    undo = [clone_inputs(dit_bridge.inplace_residual_modules(model)), dit_bridge.differentiable_rope()]
    if checkpointing:
        undo.append(checkpoint_forward(blocks))
    undo.append(check_before_forward(blocks, bridge.check_interrupted))
    return undo
