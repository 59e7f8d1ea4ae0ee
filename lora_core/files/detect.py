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
    family: str  # one of the labels above, or "Flux or Chroma" when the keys cannot tell them apart
    evidence: str  # short, for error messages: "cross-attention context 2048"
    candidates: tuple[str, ...] = ()  # the labels ``family`` may be, when more than one

    @property
    def labels(self) -> tuple[str, ...]:
        """The family labels this guess may be (``family`` alone unless the keys left a choice)."""
        return self.candidates or (self.family,)


# DiT families whose LoRAs use the double_blocks / single_blocks names (ComfyUI's and kohya /
# musubi's alike): Flux.1, Flux.2 (shared modulation, SwiGLU MLP), Chroma (no modulation layers)
# and HunyuanVideo 1.5 (double blocks only, a token refiner in txt_in).
_DOUBLE_SINGLE = ("Flux", "Flux.2", "Chroma", "HunyuanVideo 1.5")
# The released models' widths: Flux.1 and Chroma 3072, Flux.2 dev 6144 (klein 4B 3072), HunyuanVideo 1.5 2048.
_DOUBLE_SINGLE_WIDTHS = {3072: ("Flux", "Flux.2", "Chroma"), 6144: ("Flux.2",), 2048: ("HunyuanVideo 1.5",)}
# Z-Image and Lumina 2: ComfyUI's lumina2 model; told apart by width only.
_LUMINA = ("Z-Image", "Lumina 2")
_LUMINA_WIDTHS = {3840: "Z-Image", 2304: "Lumina 2"}
# Prefixes trainers put before a DiT module path (kohya / musubi, OneTrainer, LyCORIS, ComfyUI-style,
# diffusers / PEFT); a name with none is read as a bare path (DiffSynth-Studio).
_PATH_PREFIXES = ("lora_unet_", "lora_transformer_", "lycoris_", "base_model.model.", "model.diffusion_model.",
                  "diffusion_model.", "transformer.")  # fmt: skip


def _factor_dims(tensors: Mapping[str, Tensor], side: str) -> dict[str, int]:
    """Each module's input (``side="in"``, from its down / A factor) or output width (``"out"``, from
    its up / B factor), for LoRA and LoHa."""
    prefix, hada, axis = (
        ("down:", ("hada_w1_b", "hada_w2_b"), 1) if side == "in" else ("up:", ("hada_w1_a", "hada_w2_a"), 0)
    )
    dims: dict[str, int] = {}
    for key, t in tensors.items():
        split = split_key(key)
        if split is None or t.dim() < 2:
            continue
        module, _, role = split
        if role.startswith(prefix) or role in hada:
            dims[module] = int(t.shape[axis])
    return dims


def _path(module: str) -> str:
    """The module's path in the model, with the trainer's prefix cut and dots read as underscores."""
    low = module.lower()
    for prefix in _PATH_PREFIXES:
        if low.startswith(prefix):
            low = low[len(prefix) :]
            break
    return low.replace(".", "_")


def _index(path: str, container: str) -> int | None:
    rest = path[len(container) :].split("_", 1)[0] if path.startswith(container) else ""
    return int(rest) if rest.isdigit() else None


def _guess(labels: tuple[str, ...] | list[str], evidence: str) -> FamilyGuess | None:
    labels = tuple(labels)
    if not labels:
        return None
    if len(labels) == 1:
        return FamilyGuess(labels[0], evidence)
    return FamilyGuess(", ".join(labels[:-1]) + " or " + labels[-1], evidence, labels)


def _double_single(paths: list[str], ins: dict[str, int], outs: dict[str, int]) -> FamilyGuess:
    """Which of the double/single-block families the module names and shapes leave possible."""
    left = list(_DOUBLE_SINGLE)
    said: list[str] = []

    def keep(allowed: tuple[str, ...], why: str) -> None:
        nonlocal left
        if set(left) - set(allowed):
            left = [f for f in left if f in allowed]
            said.append(why)

    if any("individual_token_refiner" in p for p in paths):
        keep(("HunyuanVideo 1.5",), "txt_in token refiner")
    if any(p.startswith("distilled_guidance_layer") for p in paths):
        keep(("Chroma",), "distilled_guidance_layer")
    if any(p.startswith(("double_blocks", "single_blocks")) and ("_mod_lin" in p or "_modulation_lin" in p)
           for p in paths):  # fmt: skip
        keep(("Flux", "HunyuanVideo 1.5"), "per-block modulation layers")
    if any(p.startswith("single_blocks") for p in paths):
        keep(("Flux", "Flux.2", "Chroma"), "single blocks")
    if max((i for p in paths if (i := _index(p, "double_blocks_")) is not None), default=0) > 18:
        keep(("HunyuanVideo 1.5",), "more than 19 double blocks")
    if max((i for p in paths if (i := _index(p, "single_blocks_")) is not None), default=0) > 37:
        keep(("Flux.2",), "more than 38 single blocks")
    # The MLP's width over the block's: Flux.1 (and Chroma, HunyuanVideo) 4x GELU, Flux.2 3x SwiGLU
    # (its first layer twice as wide): single linear1 = 3 (qkv) + 4 or 3 + 6 widths, img_mlp.0 4 or 6.
    ratios = {round(outs[m] / ins[m], 2) for m in ins if m in outs and _path(m).endswith(("_linear1", "_mlp_0"))
              and _path(m).startswith(("single_blocks", "double_blocks"))}  # fmt: skip
    if ratios & {9.0, 6.0} and not ratios & {7.0, 4.0}:
        keep(("Flux.2",), "a SwiGLU MLP (Flux.2's widths)")
    elif ratios & {7.0, 4.0} and not ratios & {9.0, 6.0}:
        keep(("Flux", "Chroma", "HunyuanVideo 1.5"), "a 4x MLP (Flux.1's widths)")
    widths = Counter(
        d for m, d in ins.items() if _path(m).endswith(("_img_attn_qkv", "_txt_attn_qkv", "_img_attn_proj"))
    )
    if widths and (width := widths.most_common(1)[0][0]) in _DOUBLE_SINGLE_WIDTHS:
        keep(_DOUBLE_SINGLE_WIDTHS[width], f"width {width}")
    evidence = "double_blocks/single_blocks keys" + (f" ({', '.join(said)})" if said else "")
    return _guess(left, evidence) or FamilyGuess(UNKNOWN, evidence + " that no one family has")


def _dit_from_paths(modules: list[str], ins: dict[str, int], outs: dict[str, int]) -> FamilyGuess | None:
    """The DiT family the module paths (ComfyUI's, kohya's, diffusers') name, where they are its own."""
    paths = [_path(m) for m in modules]
    if any(p.startswith(("double_stream_blocks", "single_stream_blocks")) for p in paths):
        return FamilyGuess("HiDream", "double_stream_blocks/single_stream_blocks keys")
    if any(p.startswith(("double_blocks", "single_blocks")) for p in paths):
        return _double_single(paths, ins, outs)
    if any(p.startswith(("layers_", "noise_refiner_", "context_refiner_")) and ("_attention_" in p or "_feed_forward_" in p)
           for p in paths):  # fmt: skip
        widths = [d for m, d in ins.items() if _path(m).startswith("layers_") and "_attention_" in _path(m)]
        if found := _most_common(widths, _LUMINA_WIDTHS):
            return FamilyGuess(found[0], f"layers.N.attention keys of width {found[1]}")
        return _guess(_LUMINA, "layers.N.attention / feed_forward keys")
    if any(p.startswith("blocks_") and any(t in p for t in ("_self_attn_", "_cross_attn_", "_ffn_", "_attn1_", "_attn2_"))
           for p in paths):  # fmt: skip
        return FamilyGuess("Wan", "blocks.N.self_attn / cross_attn keys")
    blocks = [p for p in paths if p.startswith("transformer_blocks_")]
    if any(t in p for p in blocks for t in ("_img_mlp_", "_txt_mlp_", "_img_mod_", "_txt_mod_")):
        return FamilyGuess("Qwen-Image", "transformer_blocks img_mlp / txt_mlp keys")
    if any(t in p for p in blocks for t in ("_attn1_", "_attn2_")):
        return FamilyGuess("LTX-Video", "transformer_blocks attn1 / attn2 keys")
    if any("token_refiner" in p for p in paths) and blocks:
        return FamilyGuess("HunyuanVideo 1.5", "transformer_blocks with a context token refiner")
    # Flux.2's diffusers single blocks fuse qkv and the MLP input (to_qkv_mlp_proj). Not ff.linear_in:
    # ComfyUI 0.12's key map gives Flux.1's ff.net.0.proj that second (LyCORIS) name too.
    flux1 = any(t in p for p in paths for t in ("_proj_mlp", "_ff_net_", "_norm1_linear", "_norm_linear"))
    if not flux1 and any(
        p.startswith("single_transformer_blocks_") and "to_qkv_mlp_proj" in p for p in paths
    ):
        return FamilyGuess("Flux.2", "diffusers Flux.2 names (single blocks' to_qkv_mlp_proj)")
    return None


def _most_common(dims: list[int], table: Mapping[int, str]) -> tuple[str, int] | None:
    known = Counter(d for d in dims if d in table)
    if not known:
        return None
    dim = known.most_common(1)[0][0]
    return table[dim], dim


def _from_keys(tensors: Mapping[str, Tensor]) -> FamilyGuess | None:
    dims = _factor_dims(tensors, "in")
    names = [k.lower() for k in tensors]
    modules = sorted({split[0] for k in tensors if (split := split_key(k)) is not None})
    if found := _dit_from_paths(modules, dims, _factor_dims(tensors, "out")):
        return found
    if any("single_transformer_blocks" in n for n in names):
        return FamilyGuess("Flux", "single_transformer_blocks keys")
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
    if from_keys and from_keys.family == UNKNOWN:
        from_keys = None if from_meta else from_keys
    if from_keys and from_meta and from_meta.family in from_keys.candidates:  # the header says which one
        return FamilyGuess(from_meta.family, f"{from_meta.evidence}; {from_keys.evidence}")
    if from_keys and from_meta and from_keys.family != from_meta.family:
        return FamilyGuess(from_keys.family, f"{from_keys.evidence}; metadata says {from_meta.family}",
                           from_keys.candidates)  # fmt: skip
    return from_keys or from_meta or FamilyGuess(UNKNOWN, "no recognisable keys, shapes or metadata")


# ComfyUI's unet_config image_model -> family, for a model class the family table does not name.
_IMAGE_MODELS = {"flux": "Flux", "flux2": "Flux.2", "chroma": "Chroma", "chroma_radiance": "Chroma",
                 "qwen_image": "Qwen-Image", "wan2.1": "Wan", "hidream": "HiDream", "ltxv": "LTX-Video"}  # fmt: skip


def model_family_from_unet_config(unet_config: Mapping[str, object]) -> FamilyGuess:
    """The MODEL's family from ComfyUI's ``model.model_config.unet_config`` dict."""
    image_model = unet_config.get("image_model")
    if image_model == "lumina2":
        family = "Z-Image" if unet_config.get("z_image_modulation") else "Lumina 2"
        return FamilyGuess(family, f"image_model lumina2{' with z_image_modulation' * (family == 'Z-Image')}")
    if isinstance(image_model, str) and image_model in _IMAGE_MODELS:
        return FamilyGuess(_IMAGE_MODELS[image_model], f"image_model {image_model}")
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
