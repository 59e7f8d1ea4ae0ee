"""Guessing the base model family of a LoRA (from keys, shapes, metadata) and of a model (its unet_config).

Both sides use the family table's labels (lora_core.files.families) so a caller can compare them, or
"unknown" when the evidence is not clear enough to refuse a LoRA over it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

from .families import UNKNOWN, from_architecture, from_base_version
from .formats import split_key

# Width of the cross-attention context (attn2 to_k / to_v input) per UNet family.
_CONTEXT_DIMS = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL", 1280: "SDXL Refiner"}
# First text encoder hidden width for files with a single text encoder (lora_te_ / text_encoder.).
_TE_DIMS = {768: "SD1.x", 1024: "SD2.x"}
_DIT_WIDTHS = {3072: "Flux", 1536: "SD3", 2432: "SD3"}


@dataclass(frozen=True)
class FamilyGuess:
    family: str  # one of the labels above
    evidence: str  # short, for error messages: "cross-attention context 2048"


def _in_dims(tensors: Mapping[str, Tensor]) -> dict[str, int]:
    """Input width of each module, read from its down / A factor (LoRA, LoHa)."""
    dims: dict[str, int] = {}
    for key, t in tensors.items():
        split = split_key(key)
        if split is None or t.dim() < 2:
            continue
        module, _, role = split
        if role.startswith("down:") or role in ("hada_w1_b", "hada_w2_b"):
            dims[module] = int(t.shape[1])
    return dims


def _most_common(dims: list[int], table: Mapping[int, str]) -> tuple[str, int] | None:
    known = Counter(d for d in dims if d in table)
    if not known:
        return None
    dim = known.most_common(1)[0][0]
    return table[dim], dim


def _from_keys(tensors: Mapping[str, Tensor]) -> FamilyGuess | None:
    dims = _in_dims(tensors)
    names = [k.lower() for k in tensors]
    if any("double_blocks" in n or "single_blocks" in n or "single_transformer_blocks" in n for n in names):
        return FamilyGuess("Flux", "double_blocks/single_blocks keys")
    if any("joint_blocks" in n for n in names):
        return FamilyGuess("SD3", "joint_blocks keys")
    dit = [d for m, d in dims.items() if "transformer_blocks" in m and ".attn." in m and "attn2" not in m]
    if guess := _most_common(dit, _DIT_WIDTHS):
        return FamilyGuess(guess[0], f"transformer blocks of width {guess[1]}")
    context = [d for m, d in dims.items() if "attn2" in m and ("to_k" in m or "to_v" in m)]
    if guess := _most_common(context, _CONTEXT_DIMS):
        return FamilyGuess(guess[0], f"cross-attention context {guess[1]}")
    if any(n.startswith(("lora_te2_", "text_encoder_2.")) for n in names):
        return FamilyGuess("SDXL", "two text encoders (lora_te2_/text_encoder_2 keys)")
    single_te = [d for m, d in dims.items() if m.startswith(("lora_te_", "text_encoder.")) and "q_proj" in m]
    if guess := _most_common(single_te, _TE_DIMS):
        return FamilyGuess(guess[0], f"text encoder width {guess[1]}")
    return None


def family_from_metadata(metadata: Mapping[str, str]) -> FamilyGuess | None:
    arch = str(metadata.get("modelspec.architecture", "")).lower()
    if family := from_architecture(arch):
        return FamilyGuess(family.label, f"modelspec.architecture '{arch}'")
    version = str(metadata.get("ss_base_model_version", "")).lower()
    if family := from_base_version(version):
        return FamilyGuess(family.label, f"ss_base_model_version '{version}'")
    if str(metadata.get("ss_v2", "")).lower() == "true":
        return FamilyGuess("SD2.x", "ss_v2 = True")
    return None


def detect_family(tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> FamilyGuess:
    """The LoRA's base family; keys and shapes win over metadata, which trainers sometimes get wrong."""
    from_keys = _from_keys(tensors)
    from_meta = family_from_metadata(metadata or {})
    if from_keys and from_meta and from_keys.family != from_meta.family:
        return FamilyGuess(from_keys.family, f"{from_keys.evidence}; metadata says {from_meta.family}")
    return from_keys or from_meta or FamilyGuess(UNKNOWN, "no recognisable keys, shapes or metadata")


def model_family_from_unet_config(unet_config: Mapping[str, object]) -> FamilyGuess:
    """The MODEL's family from ComfyUI's ``model.model_config.unet_config`` dict."""
    image_model = unet_config.get("image_model")
    if image_model == "flux":
        return FamilyGuess("Flux", "image_model flux")
    if image_model is not None:  # other DiTs: named, but never called a mismatch
        return FamilyGuess(UNKNOWN, f"image_model {image_model}")
    if "pos_embed_scaling_factor" in unet_config or "context_embedder_config" in unet_config:
        return FamilyGuess("SD3", "MMDiT unet_config")
    context = unet_config.get("context_dim")
    if unet_config.get("in_channels", 4) != 4:
        return FamilyGuess(UNKNOWN, f"UNet with {unet_config.get('in_channels')} input channels")
    family = _CONTEXT_DIMS.get(context) if isinstance(context, int) else None
    if family is None:
        return FamilyGuess(UNKNOWN, f"context_dim {context}")
    adm = unet_config.get("adm_in_channels")
    if family in ("SDXL", "SDXL Refiner") and not adm:
        return FamilyGuess(UNKNOWN, f"context_dim {context} without adm")
    if family in ("SD1.x", "SD2.x") and adm:
        return FamilyGuess(UNKNOWN, f"context_dim {context} with adm_in_channels {adm} (unCLIP or similar)")
    return FamilyGuess(family, f"context_dim {context}" + (f", adm_in_channels {adm}" if adm else ""))
