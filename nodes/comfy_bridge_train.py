"""Train LoRA's bridge to ComfyUI: training targets, loading for autograd, the noise schedule and
predictor, encoders, progress events, sample images (a DiT's blocks: comfy_bridge_dit.py).

What Train LoRA needs from ComfyUI is handed to lora_core.train as plain modules and callables;
only this module (with nodes/comfy_bridge.py, whose general helpers it reuses) touches ComfyUI's
internals for training.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import comfy.model_management
import folder_paths
import torch

from ..lora_core.files.atomic import write_with
from ..lora_core.files.families import training_metadata_for_class
from .comfy_bridge import clip_key_map, model_class_name, sgm_unet, unet_key_map

TRAIN_EVENT = "lora_foundry.train"  # live training progress; the frontend listens for this name


def unet_target_source(model) -> tuple[dict, torch.nn.Module, str]:
    """(key map, module the keys are paths in, naming style) for lora_core.train.targets: the MODEL's
    weights a LoRA file can address, named as kohya's trainers write them (diffusers-style paths for
    SD1.x / SD2.x, SGM paths for SDXL, sd-scripts' own paths for DiTs)."""
    return unet_key_map(model), model.model, "kohya_sgm" if sgm_unet(model) else "kohya"


def clip_target_source(clip) -> tuple[dict, torch.nn.Module, str]:
    """The same for the text encoder(s): lora_te_ (one encoder) or lora_te1_ / lora_te2_ (SDXL)."""
    return clip_key_map(clip), clip.cond_stage_model, "kohya"


def _trainable_weights(module) -> None:
    # Weights loaded while ComfyUI runs a graph are inference tensors, which autograd cannot save
    # for backward. Each is replaced by a plain copy (same values), as ComfyUI's set_attr_param
    # replaces parameters when it patches; swapping only .data would keep the inference wrapper.
    with torch.inference_mode(False):
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None and p.is_inference():
                    sub._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=False)
            for name, b in list(sub._buffers.items()):
                if b is not None and b.is_inference():
                    sub._buffers[name] = b.clone()


def prepare_for_training(model, clip=None) -> torch.device:
    """Loads MODEL (and CLIP) with their patches, weights usable by autograd; returns the device."""
    comfy.model_management.load_models_gpu([model], force_full_load=True)
    model.model.requires_grad_(False)
    _trainable_weights(model.model)
    if clip is not None:
        clip.load_model()
        clip.cond_stage_model.requires_grad_(False)
        _trainable_weights(clip.cond_stage_model)
    return model.load_device


def discrete_schedule(model) -> tuple[torch.Tensor, str]:
    """(sigmas, prediction) of the MODEL's discrete noise schedule: ComfyUI's k-diffusion sigmas
    and 'eps' or 'v', for lora_core.train.loss.NoiseSchedule.from_sigmas."""
    import comfy.model_base
    import comfy.model_sampling

    sampling = model.model.model_sampling
    kinds = {comfy.model_base.ModelType.EPS: "eps", comfy.model_base.ModelType.V_PREDICTION: "v"}
    kind = kinds.get(model.model.model_type)
    if kind is None or not isinstance(sampling, comfy.model_sampling.ModelSamplingDiscrete):
        raise ValueError(
            f"training supports discrete-schedule eps / v-prediction models (SD1.x, SD2.x, SDXL); "
            f"this model is {model_class_name(model)} with {model.model.model_type.name}"
        )
    return sampling.sigmas.detach().cpu(), kind


LATENT_KINDS = {1: "audio (1-D latents)", 3: "video (5-D latents)"}
# Image models ComfyUI gives a video latent format (5-D, frames on dim 2): Qwen-Image decodes with
# the Wan VAE, so its latent format is Wan21's, yet it is an image model. ComfyUI feeds it an image
# as one frame (comfy.sample.fix_empty_latent_channels unsqueezes a 4-D latent), and so does Train
# LoRA: its latents stay 4-D and gain the frame axis only around the model's own calls.
ONE_FRAME_IMAGE_MODELS = frozenset({"QwenImage"})


def one_frame(model) -> bool:
    """True when the MODEL is an image model ComfyUI runs on 5-D latents of one frame (Qwen-Image)."""
    dims = getattr(model.model.latent_format, "latent_dimensions", 2)
    return dims == 3 and model_class_name(model) in ONE_FRAME_IMAGE_MODELS


def model_objective_kind(model) -> str:
    """'discrete' (SD1.x / SD2.x / SDXL: eps or v on a DDPM schedule) or 'flow' (ComfyUI's CONST
    sampling: Flux, SD3, Lumina2 / Z-Image, Qwen-Image, Chroma ...); a clear error naming the
    family for anything the training cannot take yet (video, audio, 3-D)."""
    import comfy.model_sampling

    name = model_class_name(model)
    dims = getattr(model.model.latent_format, "latent_dimensions", 2)
    if dims != 2 and not one_frame(model):
        raise ValueError(
            f"{name} is a model for {LATENT_KINDS.get(dims, f'{dims}-D latents')}: Train LoRA trains image "
            "models (SD1.x, SD2.x, SDXL, Flux, Flux.2, SD3, Z-Image, Lumina2, Qwen-Image, Chroma) for now"
        )
    sampling = model.model.model_sampling
    if isinstance(sampling, comfy.model_sampling.CONST):
        return "flow"
    if isinstance(sampling, comfy.model_sampling.ModelSamplingDiscrete):
        return "discrete"
    raise ValueError(
        f"{name} uses {type(sampling).__name__} sampling, which Train LoRA cannot train yet: it trains "
        "discrete eps / v-prediction models and flow-matching models"
    )


def patch_size(model) -> int:
    """Latent pixels per token side of a DiT (Flux, SD3: 2); 1 for UNets."""
    return int(getattr(model.model.diffusion_model, "patch_size", 1) or 1)


def sigma_of_t(model) -> Callable:
    """t in (0, 1) -> sigma by the MODEL's own flow sampling (its shift included): ComfyUI's
    model_sampling.sigma of the timestep for sigma t, as its schedulers space them."""
    sampling = model.model.model_sampling

    def sigma(t: torch.Tensor) -> torch.Tensor:
        return sampling.sigma(sampling.timestep(t)).float()

    return sigma


def flow_predictor(model, guidance: float = 1.0) -> Callable:
    """predict(x_t, sigmas, cond) -> the DiT's raw output (the flow velocity eps - x0), for
    lora_core.train.

    The conditioning is built by the model's own ``extra_conds`` (as ComfyUI's samplers build it:
    Flux guidance, pooled vectors as ``y``), and the call mirrors BaseModel._apply_model without
    its last step (calculate_denoised), so what is trained is what ComfyUI samples from.
    """
    base = model.model
    dtype = base.manual_cast_dtype or base.get_dtype()
    device = model.load_device
    frames = one_frame(model)

    def predict(x, sigma, cond):
        if frames and x.ndim == 4:  # Qwen-Image: the image as one frame, as ComfyUI's sampler feeds it
            return predict(x.unsqueeze(2), sigma, cond).squeeze(2)
        x = x.to(device)
        kwargs = {"cross_attn": cond["context"].to(device), "device": device, "noise": x,
                  "guidance": guidance, "width": x.shape[-1] * 8, "height": x.shape[-2] * 8}  # fmt: skip
        # As a sampler's conds: the key is always there, None for encoders without a pooled vector
        # (Chroma, Flux.2, Z-Image), whose extra_conds then add no ``y``.
        kwargs["pooled_output"] = cond["pooled"].to(device) if "pooled" in cond else None
        conds = {k: c.process_cond(batch_size=x.shape[0], device=device, area=None).cond
                 for k, c in base.extra_conds(**kwargs).items()}  # fmt: skip
        context = conds.pop("c_crossattn")
        concat = conds.pop("c_concat", None)
        sigma = sigma.to(device).float()
        xc = base.model_sampling.calculate_input(sigma, x)
        if concat is not None:
            xc = torch.cat([xc, concat.to(xc)], dim=1)
        extra = {k: v.to(device, dtype) if torch.is_tensor(v) and v.is_floating_point() else v
                 for k, v in conds.items()}  # fmt: skip
        t = base.model_sampling.timestep(sigma).float()
        return base.diffusion_model(xc.to(dtype), t, context=context.to(device, dtype), control=None,
                                    transformer_options={}, **extra)  # fmt: skip

    return predict


def noise_predictor(model) -> Callable:
    """predict(x_t, timesteps, cond) -> the UNet's raw output (eps or v), for lora_core.train.

    Calls the diffusion model directly (no sampler, no CFG); SDXL's size vector is built from the
    batch's pixel size (bucket), the pooled text embedding from cond["pooled"].
    """
    base = model.model
    unet = base.diffusion_model
    dtype = base.manual_cast_dtype or base.get_dtype()
    device = model.load_device

    def predict(x, timesteps, cond):
        context = cond["context"].to(device, dtype)
        extra = {}
        if base.adm_channels:
            h, w = x.shape[-2] * 8, x.shape[-1] * 8
            y = base.encode_adm(pooled_output=cond["pooled"].to(device), width=w, height=h, crop_w=0, crop_h=0,
                                target_width=w, target_height=h, device=device)  # fmt: skip
            extra["y"] = y.to(device, dtype)
        return unet(x.to(device, dtype), timesteps.to(device).float(), context=context,
                    transformer_options={}, **extra)  # fmt: skip

    return predict


def latent_transform(model) -> Callable:
    """Raw VAE latents -> the model's latent space (SD's 0.18215 scale and the like); 4-D in and
    out, a one-frame model's per-channel statistics (5-D) applied to its one frame."""
    if one_frame(model):
        return lambda latents: model.model.process_latent_in(latents.unsqueeze(2)).squeeze(2)
    return model.model.process_latent_in


def image_encoder(vae) -> Callable:
    """(B, H, W, 3) 0..1 pixels -> raw VAE latents."""

    def encode(pixels):
        with torch.inference_mode(False), torch.no_grad():
            latents = vae.encode(pixels[..., :3]).float()
            # A video VAE (Qwen-Image's, Wan's) encodes an image as one frame: (B, C, 1, h, w) -> 4-D.
            if latents.ndim == 5 and latents.shape[2] == 1:
                latents = latents[:, :, 0]
            return latents.clone()

    return encode


def caption_encoder(clip) -> Callable:
    """caption -> {"context": (1, L, D), "pooled": (1, P)}; differentiable through CLIP LoRA hooks.
    lora_core.train.dataset.batch_encoder makes a batch encoder of it."""

    def encode(caption: str) -> dict:
        cond, pooled = clip.encode_from_tokens(clip.tokenize(caption), return_pooled=True)
        return {"context": cond, "pooled": pooled if pooled is not None else torch.zeros(1, 1)}

    return encode


def cache_directory() -> str:
    return os.path.join(folder_paths.get_output_directory(), "lora_foundry_cache")


def send_event(data: dict) -> None:
    """A training progress event to the browser (nothing when no server runs, e.g. in tests)."""
    try:
        from server import PromptServer
    except ImportError:
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is not None:
        instance.send_sync(TRAIN_EVENT, data)


def training_metadata(model) -> dict[str, str]:
    """ss_base_model_version and the modelspec.* architecture of the MODEL's family, for the trained file."""
    return dict(training_metadata_for_class(model_class_name(model)))


def weights_fingerprint(obj) -> str:
    """A stable identity of a VAE / CLIP's weights for the disk cache (same weights, same id)."""
    import hashlib

    module = getattr(obj, "first_stage_model", None) or getattr(obj, "cond_stage_model", None) or obj
    items = list(module.state_dict().items())
    digest = hashlib.sha1(type(module).__name__.encode())
    for name, tensor in items[:8] + items[-8:]:
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().flatten()[:32].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def text_encoder_grad_safe(clip) -> Callable[[], None]:
    """Lets gradients flow through ComfyUI's CLIP layers; returns the undo function.

    CLIPLayer adds its residuals in place (``x += attn(norm(x))``), which overwrites the input the
    norm saved for backward once LoRA makes x require grad; the norms get a copy instead.
    """
    import comfy.clip_model

    handles = []
    for module in clip.cond_stage_model.modules():
        if isinstance(module, comfy.clip_model.CLIPLayer):
            for norm in (module.layer_norm1, module.layer_norm2):
                handles.append(norm.register_forward_pre_hook(lambda _m, args: (args[0].clone(), *args[1:])))

    def undo() -> None:
        for handle in handles:
            handle.remove()

    return undo


# What the training samples use per objective: discrete SD models sample as ComfyUI's default KSampler
# (CFG 7, 'normal'); flow models with the scheduler ComfyUI's Flux / SD3 templates use ('simple'),
# CFG 1 with the guidance in the conditioning for guidance-distilled ones (Flux dev: FluxGuidance's
# default 3.5), CFG 4 for the others (SD3, Z-Image, Qwen-Image, Chroma).
SAMPLE_SETTINGS = {"discrete": (7.0, "normal"), "flow": (4.0, "simple")}
SAMPLE_FLUX_GUIDANCE = 3.5


def _guidance_distilled(model) -> bool:
    """True when the DiT takes a guidance value as input (Flux dev, Flux.2: ``guidance_embed``)."""
    params = getattr(model.model.diffusion_model, "params", None)
    return bool(getattr(params, "guidance_embed", False))


def sampler(model, clip, vae, prompt: str, seed: int, width: int, height: int, steps: int = 12) -> Callable:
    """sample() -> IMAGE (1, H, W, 3) of MODEL as it is now (the training LoRA hooks included), with a
    fixed prompt, seed and size: the preview images Train LoRA saves every N steps.

    Sampled by ComfyUI's own sampler on the MODEL's own model_sampling (discrete eps / v, or flow with
    the model's shift), from an empty latent of the model's latent channels; for guidance-distilled
    flow models the guidance goes into the conditioning as ComfyUI's FluxGuidance node puts it."""
    import comfy.sample

    kind = model_objective_kind(model)
    cfg, scheduler = SAMPLE_SETTINGS[kind]
    extra = {}
    if kind == "flow" and _guidance_distilled(model):
        cfg, extra = 1.0, {"guidance": SAMPLE_FLUX_GUIDANCE}
    channels = int(getattr(model.model.latent_format, "latent_channels", 4))
    down = vae.spacial_compression_encode() if hasattr(vae, "spacial_compression_encode") else 8

    def sample() -> torch.Tensor:
        # The training's random streams must not notice a sample was taken (exact resume).
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            cond, pooled = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
            negative, neg_pooled = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)
            latent = torch.zeros(1, channels, height // down, width // down)
            noise = comfy.sample.prepare_noise(latent, seed)
            positive = [[cond, {"pooled_output": pooled, **extra}]]
            negative = [[negative, {"pooled_output": neg_pooled, **extra}]]
            out = comfy.sample.sample(model, noise, steps, cfg, "euler", scheduler, positive, negative, latent,
                                      seed=seed, disable_pbar=True)  # fmt: skip
            return vae.decode(out).reshape(1, height, width, 3).float().cpu()

    return sample


def save_sample(image: torch.Tensor, run_name: str, step: int) -> str:
    """Writes a training sample as output/lora_foundry/samples/<run>/step_NNNNNN.png; returns its path."""
    import numpy as np
    from PIL import Image

    folder = os.path.join(folder_paths.get_output_directory(), "lora_foundry", "samples", run_name)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"step_{step:06d}.png")
    pixels = (image[0].clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    write_with(path, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG"), overwrite=True)
    return path
