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


def _row_order(function, size: int) -> list[int] | None:
    """Where a key map's function (not the identity) puts the rows of a change: ``order`` with
    ``weight[i] += change[order[i]]``, or None when it does more than reorder rows. Probed on an
    index column, as ``_is_identity`` probes."""
    probe = torch.arange(size, dtype=torch.float64)[:, None].expand(size, 2).clone()
    try:
        out = function(probe)
    except Exception:
        return None
    if (
        not isinstance(out, torch.Tensor)
        or tuple(out.shape) != (size, 2)
        or not torch.equal(out[:, 0], out[:, 1])
    ):
        return None
    order = [int(v) for v in out[:, 0].tolist()]
    return order if sorted(order) == list(range(size)) else None


def diffusers_row_map(model, prefix: str) -> dict[str, tuple[str, Sequence[int]]]:
    """Name -> (weight key, the weight's rows that are the named module's rows, in its order) for each
    name of the MODEL's key map starting with ``prefix`` that patches whole rows: a whole weight or a
    dim-0 slice of a fused one (q, k, v), either through a function that only reorders rows
    (swap_scale_shift). Names that patch otherwise are left out, so a weight they alone name has none."""
    shapes = weight_shapes(model)
    out = {}
    for name, target in unet_key_map(model).items():
        if not name.startswith(prefix):
            continue
        key, offset, function = (target, None, None) if isinstance(target, str) else (*target, None)[:3]
        if not isinstance(key, str) or key not in shapes or len(shapes[key]) < 2:
            continue
        dim, start, size = offset if offset is not None else (0, 0, shapes[key][0])
        if dim != 0:
            continue
        if _is_identity(function):
            out[name] = (key, range(start, start + size))
        elif (order := _row_order(function, size)) is not None:
            rows = [0] * size
            for i, j in enumerate(order):  # weight row start + i gets the module's row j
                rows[j] = start + i
            out[name] = (key, rows)
    return out


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


def input_directory() -> str:
    return folder_paths.get_input_directory()


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
