"""The one module that touches ComfyUI internals: key maps, model patching, file lookup, progress.

Everything else in nodes/ goes through these functions, so a change in ComfyUI's internals
is mended here alone.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence

import comfy.lora
import comfy.model_management
import comfy.utils
import comfy.weight_adapter
import folder_paths
import torch

from ..lora_core.apply.patching import HALF_DTYPES, Term, apply_steps_, apply_steps_half_, prepare, sums_only
from ..lora_core.files.atomic import write_with
from ..lora_core.files.families import training_metadata_for_class

log = logging.getLogger("lora_foundry")


_PROBE = torch.zeros(2, 1)


def _is_identity(function) -> bool:
    # ComfyUI passes ``lambda a: a`` when a patch has no function; it returns its argument itself.
    # Key maps attach real functions to some targets (Flux's norm_out: swap_scale_shift, which
    # splits its input in two); any that fails on the probe is not the identity either.
    if function is None:
        return True
    try:
        return function(_PROBE) is _PROBE
    except Exception:
        return False


class FoundryPatch(comfy.weight_adapter.WeightAdapterBase):
    """All of a LoRA stack's terms for one weight, applied in one pass.

    The plain LoRAs among them are concatenated once, here, so each call costs one GEMM per
    weight. What ComfyUI hands to ``calculate_weight`` (read from both versions' source):

    - The one-time patch when a model loads (``ModelPatcher.patch_weight_to_device``): a fresh
      copy of the weight on the load device, in float32 on 0.3.x and in
      ``comfy.model_management.lora_compute_dtype(device)`` since 0.8 (float16 on most CUDA
      GPUs, float32 on the CPU), ``intermediate_dtype`` float32. A quantized weight (0.12's
      comfy-kitchen QuantizedTensor, scaled fp8) arrives dequantized to a plain tensor; ComfyUI
      rounds or re-quantizes the result into the weight's own format afterwards.
    - Every forward of a weight left on the fly (``LowVramPatch``: partial low-VRAM loads, and on
      0.12 with dynamic VRAM every patched weight): the weight as the layer casts it for that
      forward, a fresh copy in the compute dtype (float32, float16 or bfloat16; dequantized),
      ``intermediate_dtype`` equal to that dtype. 0.3.x turns other dtypes (fp8) into float32
      first. This runs per step, per weight.
    - ``offset``: a slice of a fused weight (Flux / SD3 q, k, v), passed as a narrowed view whose
      returned value ComfyUI drops: it must be patched in place. ``function`` maps the change
      before it is added (identity but for a few DiT targets).

    So: a float32 weight is patched in place; a float16 / bfloat16 one in place too, without a
    float32 copy (``lora_core.apply.patching.apply_steps_half_``: temporaries under one weight's size
    for LoRA runs), its products in ``intermediate_dtype`` when that is the weight's dtype (GEMMs
    accumulating in float32, as LowVramPatch asks) and else in float32 blocks of rows; anything
    else (other dtypes, DoRA / OFT-like terms, a function, a grown weight) through a float32 copy
    rounded back. The base model itself is never edited.
    """

    name = "lora_foundry"

    def __init__(self, terms: Sequence[Term]):
        self.terms = tuple(terms)
        self.steps = prepare(self.terms)
        self.loaded_keys = set()
        self.weights = []

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):  # fmt: skip
        steps = self.steps
        if strength != 1.0:
            steps = prepare(tuple(Term(t.adapter, t.strength * strength) for t in self.terms))
        identity = _is_identity(function)
        if identity and weight.dtype == torch.float32:
            return _patch_float32_(steps, weight, key, offset)
        if identity and weight.dtype in HALF_DTYPES and sums_only(steps):
            # LowVramPatch asks for math in the weight's dtype; patch_weight_to_device in float32.
            compute = weight.dtype if intermediate_dtype == weight.dtype else torch.float32
            return apply_steps_half_(steps, weight, compute)
        return _patch_through_float32_(steps, weight, key, offset, None if identity else function)


def _patch_float32_(steps, weight, key: str, offset):
    """The usual one-time patch: ModelPatcher's float32 working copy, patched in place."""
    new = apply_steps_(steps, weight)
    if new is weight:
        return weight
    if new.shape != weight.shape:  # a reshape_weight grew it: the model takes the new tensor
        if offset is not None:
            raise ValueError(f"{key}: a LoRA that grows a weight cannot patch a slice of it")
        return new
    weight.copy_(new)
    return weight


def _patch_through_float32_(steps, weight, key: str, offset, function):
    """Any other case, through a float32 copy rounded back into ``weight`` (in place)."""
    new = apply_steps_(steps, weight.to(torch.float32, copy=True)).to(weight.dtype)
    if new.shape != weight.shape:
        if offset is not None or function is not None:
            raise ValueError(
                f"{key}: a LoRA that grows a weight cannot patch a slice of it or go through a function"
            )
        return new
    if function is not None:
        # ComfyUI's convention: ``function`` maps the change before it is added.
        new = weight + function(new - weight)
    # In place: with an offset, ComfyUI hands over a narrowed view and keeps the full tensor.
    weight.copy_(new)
    return weight


def unet_key_map(model) -> dict:
    """Names a LoRA file may use for the MODEL's weights -> the model's weight keys."""
    return comfy.lora.model_lora_keys_unet(model.model, {})


def clip_key_map(clip) -> dict:
    """Names a LoRA file may use for the CLIP's weights -> the text encoder's weight keys."""
    return comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})


def weight_shapes(patcher) -> dict[str, tuple[int, ...]]:
    """Shapes of a ModelPatcher's weights by key (no data is copied): its parameters and buffers,
    what ModelPatcher can patch. Not its state dict, which for a quantized checkpoint (0.12's
    comfy-kitchen layers) also holds ``comfy_quant`` / ``weight_scale`` entries that are no
    weights; a QuantizedTensor parameter reports its logical shape."""
    model = patcher.model
    return {k: tuple(v.shape) for k, v in (*model.named_parameters(), *model.named_buffers())}


def add_patches(patcher, patches: Mapping[object, Sequence[Term]]) -> int:
    """Adds one FoundryPatch per weight to a (cloned) ModelPatcher; returns how many took."""
    applied = patcher.add_patches({target: FoundryPatch(terms) for target, terms in patches.items()}, 1.0)
    return len(applied)


def model_class_name(model) -> str:
    """ComfyUI's name for the model's architecture (its supported_models class), e.g. 'SD15', 'SDXL'."""
    return type(model.model.model_config).__name__


def sgm_unet(model) -> bool:
    """True for SDXL-structured UNets (ComfyUI's SDXL and SDXL refiner classes and those built on
    them), which kohya's trainer names by their SGM paths (lora_unet_input_blocks_...)."""
    import comfy.supported_models as sm

    return isinstance(model.model.model_config, (sm.SDXL, sm.SDXLRefiner))


def model_unet_config(model) -> dict:
    return dict(model.model.model_config.unet_config)


# A node's ui key naming the LoRA files it wrote; the frontend then refreshes its LoRA lists
# (web/js/common.js LORA_WRITTEN) so the new file can be picked without pressing R.
LORA_WRITTEN = "lora_written"


def lora_names() -> list[str]:
    return folder_paths.get_filename_list("loras")


def lora_path(name: str) -> str:
    path = folder_paths.get_full_path("loras", name)
    if path is None:
        raise FileNotFoundError(
            f"LoRA '{name}' is not in models/loras (searched: {', '.join(folder_paths.get_folder_paths('loras'))}); "
            "put the file there or refresh the node list"
        )
    return path


def loras_dir() -> str:
    """The first models/loras folder: where new LoRA files are written."""
    return folder_paths.get_folder_paths("loras")[0]


def register_new_lora(path: str) -> str:
    """The name under which a file just written into a loras folder shows in the LoRA lists."""
    for base in folder_paths.get_folder_paths("loras"):
        rel = os.path.relpath(path, base)
        if not rel.startswith(".."):
            return rel.replace(os.sep, "/")
    return os.path.basename(path)


def preview_images(images: torch.Tensor, prefix: str) -> list[dict]:
    """Writes IMAGE thumbnails to ComfyUI's temp folder, as PreviewImage does, for a node's ui output."""
    import nodes as comfy_nodes

    return comfy_nodes.PreviewImage().save_images(images, prefix)["ui"]["images"]


def progress(total: int) -> Callable[..., None]:
    """A step callback driving ComfyUI's progress bar, raising if the user pressed Cancel."""
    bar = comfy.utils.ProgressBar(total)

    def step(done: int, of: int | None = None) -> None:
        # ``of``: the caller's own count when it differs from the estimate the bar started with
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, of or total)

    return step


# --- bounds: what the size checks need from ComfyUI (issue #14) ---


def unet_block_counts(model):
    """The MODEL's UNet block counts (lora_core.apply.block_weights.BlockCounts), None for models without
    input/middle/output blocks (DiT families: block specs do not apply to them)."""
    from ..lora_core.apply.block_weights import BlockCounts

    unet = getattr(model.model, "diffusion_model", None)
    groups = [getattr(unet, name, None) for name in ("input_blocks", "middle_block", "output_blocks")]
    if any(g is None for g in groups):
        return None
    return BlockCounts(input=len(groups[0]), middle=len(groups[1]), output=len(groups[2]))


def available_memory(device=None, keep=()) -> int:
    """Bytes free on ``device`` (ComfyUI's torch device when None) for work about to start: what
    comfy.model_management reports free, plus on a GPU what ComfyUI would free by unloading the
    loaded models other than ``keep`` (ModelPatchers). On the CPU unloading frees no RAM."""
    mm = comfy.model_management
    device = torch.device(device) if device is not None else mm.get_torch_device()
    free = int(mm.get_free_memory(device))
    if device.type == "cpu":
        return free
    kept = {id(p.model) for p in keep}  # clones of a kept patcher share its weights: kept too
    for loaded in list(getattr(mm, "current_loaded_models", ())):
        try:
            if loaded.device == device and not loaded.is_dead() and id(loaded.model.model) not in kept:
                free += int(loaded.model_loaded_memory())
        except Exception:  # an internal that changed between ComfyUI versions: count nothing
            continue
    return free


def check_interrupted() -> None:
    """Raises ComfyUI's InterruptProcessingException if the user pressed Cancel."""
    comfy.model_management.throw_exception_if_processing_interrupted()


# --- training ---
# What Train LoRA needs from ComfyUI, handed to lora_core.train as plain modules and callables.

TRAIN_EVENT = "lora_foundry.train"  # live training progress; the frontend listens for this name


def _train_targets(key_map: Mapping[str, object], root, sgm_unet: bool = False) -> list:
    """The weights of ``root`` that ``key_map`` names, as lora_core Targets under the kohya name
    kohya's trainers write (lora_core.apply.keymap.kohya_names)."""
    from ..lora_core.apply.keymap import kohya_names
    from ..lora_core.train.network import Target

    present = set(root.state_dict())  # ComfyUI's map also names weights a model may lack
    named = {
        n: k for n, k in key_map.items() if isinstance(k, str) and k.endswith(".weight") and k in present
    }
    out = []
    for key, name in kohya_names(named, sgm_unet).items():
        path = key[: -len(".weight")]
        out.append(Target(name, path, root.get_submodule(path)))
    return out


def unet_train_targets(model) -> list:
    """Every weight of the MODEL a LoRA file can address, as lora_core Targets (kohya names:
    diffusers-style paths for SD1.x / SD2.x, SGM paths for SDXL, as kohya's trainers write them)."""
    return _train_targets(unet_key_map(model), model.model, sgm_unet(model))


def clip_train_targets(clip) -> list:
    """The text encoder's weights as Targets: lora_te_ (one encoder) or lora_te1_/lora_te2_ (SDXL)."""
    return _train_targets(clip_key_map(clip), clip.cond_stage_model)


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


def noise_schedule(model):
    """The MODEL's discrete noise schedule and prediction type, for lora_core.train."""
    import comfy.model_base
    import comfy.model_sampling

    from ..lora_core.train.loss import NoiseSchedule

    sampling = model.model.model_sampling
    kinds = {comfy.model_base.ModelType.EPS: "eps", comfy.model_base.ModelType.V_PREDICTION: "v"}
    kind = kinds.get(model.model.model_type)
    if kind is None or not isinstance(sampling, comfy.model_sampling.ModelSamplingDiscrete):
        raise ValueError(
            f"training supports discrete-schedule eps / v-prediction models (SD1.x, SD2.x, SDXL); "
            f"this model is {model_class_name(model)} with {model.model.model_type.name}"
        )
    return NoiseSchedule.from_sigmas(sampling.sigmas.detach().cpu(), kind)


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


def checkpoint_blocks(model) -> list:
    """The UNet blocks gradient checkpointing wraps: each input, middle and output block."""
    unet = model.model.diffusion_model
    return [*unet.input_blocks, unet.middle_block, *unet.output_blocks]


def latent_transform(model) -> Callable:
    """Raw VAE latents -> the model's latent space (SD's 0.18215 scale and the like)."""
    return model.model.process_latent_in


def image_encoder(vae) -> Callable:
    """(B, H, W, 3) 0..1 pixels -> raw VAE latents."""

    def encode(pixels):
        with torch.inference_mode(False), torch.no_grad():
            return vae.encode(pixels[..., :3]).float().clone()

    return encode


def text_encoder(clip) -> Callable:
    """captions -> {"context": (B, L, D), "pooled": (B, P)}; differentiable through CLIP LoRA hooks."""

    def encode(captions):
        conds, pooled = [], []
        for caption in captions:
            cond, pool = clip.encode_from_tokens(clip.tokenize(caption), return_pooled=True)
            conds.append(cond)
            pooled.append(pool if pool is not None else torch.zeros(1, 1))
        from ..lora_core.train.dataset import stack_conds

        return stack_conds([{"context": c, "pooled": p} for c, p in zip(conds, pooled, strict=True)])

    return encode


def input_directory() -> str:
    return folder_paths.get_input_directory()


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


def base_model_version(model) -> str:
    """kohya's ss_base_model_version for the MODEL's family."""
    return training_metadata_for_class(model_class_name(model))["ss_base_model_version"]


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


def sampler(model, clip, vae, prompt: str, seed: int, width: int, height: int, steps: int = 12) -> Callable:
    """sample() -> IMAGE (1, H, W, 3) of MODEL as it is now (the training LoRA hooks included), with a
    fixed prompt, seed and size: the preview images Train LoRA saves every N steps."""
    import comfy.sample

    def sample() -> torch.Tensor:
        # The training's random streams must not notice a sample was taken (exact resume).
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            cond, pooled = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
            negative, neg_pooled = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)
            latent = torch.zeros(1, 4, height // 8, width // 8)
            noise = comfy.sample.prepare_noise(latent, seed)
            positive = [[cond, {"pooled_output": pooled}]]
            negative = [[negative, {"pooled_output": neg_pooled}]]
            out = comfy.sample.sample(model, noise, steps, 7.0, "euler", "normal", positive, negative, latent,
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


# --- folders the dataset nodes may read and write (issue #14), taggers, progress for the caption nodes ---
# lora_core.files.confine owns the rule; this block only gathers the folders from ComfyUI's folder_paths.

PACK_DIR = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
TAGGERS = "taggers"
# folder_paths names that are not data folders: custom_nodes holds other packs' code and settings.
NOT_DATA_FOLDERS = frozenset({"custom_nodes"})


def confinement_roots():
    """lora_core.files.confine.Roots of this server: input and output (read and write), every registered models
    folder incl. extra_model_paths (read only), the owner's folders (read and write). The pack's own
    folder, where allowed_folders.txt lives, is never written. Read on every call, so an edited
    allowed_folders.txt or environment takes effect without a restart."""
    from ..lora_core.files.confine import ALLOWED_FILE, Roots, owner_folders

    model_dirs = [
        path
        for name, (paths, _exts) in list(folder_paths.folder_names_and_paths.items())
        if name not in NOT_DATA_FOLDERS
        for path in paths
    ]
    owner = owner_folders(os.environ, os.path.join(PACK_DIR, ALLOWED_FILE))
    for entry in owner.ignored:
        log.warning("LoRA Foundry: allowed folder %r ignored: give an absolute path", entry)
    return Roots.build(folder_paths.get_input_directory(), folder_paths.get_output_directory(), model_dirs,
                       owner.folders, protected=(PACK_DIR,))  # fmt: skip


def tagger_folders() -> list[str]:
    """models/taggers (registered on first use unless the user set a 'taggers' path, e.g. in
    extra_model_paths.yaml, which ComfyUI reads before loading packs) and any extra ones."""
    if TAGGERS not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(TAGGERS, os.path.join(folder_paths.models_dir, TAGGERS))
    return folder_paths.get_folder_paths(TAGGERS)


def progress_callbacks(total_hint: int = 1) -> tuple[Callable[[int, int], None], Callable[[], bool]]:
    """ComfyUI's progress bar and Cancel button as lora_core's on_progress / should_stop callbacks."""
    bar = comfy.utils.ProgressBar(total_hint)

    def on_progress(done: int, total: int) -> None:
        bar.update_absolute(done, total)

    def should_stop() -> bool:
        comfy.model_management.throw_exception_if_processing_interrupted()  # raises on Cancel
        return False

    return on_progress, should_stop
