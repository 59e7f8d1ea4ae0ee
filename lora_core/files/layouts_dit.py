"""DiT LoRA key layouts: the names DiT trainers write that a ComfyUI key map lacks, added as aliases.

ComfyUI's key map (``model_lora_keys_unet``) names each weight of a DiT by its own path
(``diffusion_model.<path>``, ``lora_unet_<path with underscores>``) and, for some families, by
diffusers' path in one or two spellings (``transformer.`` for Flux, ``diffusion_model.`` and
``lycoris_`` for Z-Image). Trainers mix those: musubi-tuner writes ``lora_unet_`` names of diffusers
paths for Z-Image, OneTrainer ``lora_transformer_`` ones, DiffSynth-Studio bare diffusers paths,
diffusers / SimpleTuner ``transformer.`` paths of Wan, Flux.2 and HunyuanVideo 1.5 blocks ComfyUI maps
under no name.
``with_aliases`` adds every spelling of every path the map already knows (plus the diffusers paths
of the tables below) under each prefix those trainers use. An alias never replaces a name of the
map, and one that two different weights would claim is left out, so no name can reach a wrong weight.
Targets are kept as they are: a split q / k / v name of a fused weight keeps its (key, offset) slice.
"""

from __future__ import annotations

from collections.abc import Mapping

_DOTTED = ("diffusion_model.", "transformer.")
_UNDERSCORED = ("lora_unet_", "lora_transformer_", "lycoris_")
# Names of other parts or layouts that a bare dotted name must not be taken for.
_NOT_BARE = ("lora_", "lycoris_", "text_encoder", "unet.", "base_model.", "model.", "te_", "clip_")

# Diffusers paths of blocks ComfyUI maps under no diffusers name, by a key of the family's model
# (read from its weights) -> ((diffusers path, ComfyUI path), ...); "{i}" is the block index.
# Wan 2.1 / 2.2: diffusers' WanTransformer3DModel; ComfyUI keeps Wan's original names.
_WAN_BLOCK = (
    ("attn1.to_q", "self_attn.q"), ("attn1.to_k", "self_attn.k"), ("attn1.to_v", "self_attn.v"),
    ("attn1.to_out.0", "self_attn.o"), ("attn2.to_q", "cross_attn.q"), ("attn2.to_k", "cross_attn.k"),
    ("attn2.to_v", "cross_attn.v"), ("attn2.to_out.0", "cross_attn.o"), ("attn2.add_k_proj", "cross_attn.k_img"),
    ("attn2.add_v_proj", "cross_attn.v_img"), ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"),
)  # fmt: skip
_WAN_GLOBAL = (
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
    ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
    ("proj_out", "head.head"),
)
# Flux.2 (Klein / Dev): diffusers' Flux2Transformer2DModel; ComfyUI 0.3.75 maps only the Flux.1 names.
_FLUX2_DOUBLE = (
    ("ff.linear_in", "img_mlp.0"), ("ff.linear_out", "img_mlp.2"),
    ("ff_context.linear_in", "txt_mlp.0"), ("ff_context.linear_out", "txt_mlp.2"),
)  # fmt: skip
_FLUX2_SINGLE = (("attn.to_qkv_mlp_proj", "linear1"), ("attn.to_out", "linear2"))
_FLUX2_GLOBAL = (
    ("double_stream_modulation_img.linear", "double_stream_modulation_img.lin"),
    ("double_stream_modulation_txt.linear", "double_stream_modulation_txt.lin"),
    ("single_stream_modulation.linear", "single_stream_modulation.lin"),
    ("time_guidance_embed.timestep_embedder.linear_1", "time_in.in_layer"),
    ("time_guidance_embed.timestep_embedder.linear_2", "time_in.out_layer"),
    ("time_guidance_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
    ("time_guidance_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
)
# LTX-Video: ComfyUI keeps diffusers' block names but not those of the input and timestep layers.
_LTXV_GLOBAL = (
    ("proj_in", "patchify_proj"),
    ("time_embed.emb.timestep_embedder.linear_1", "adaln_single.emb.timestep_embedder.linear_1"),
    ("time_embed.emb.timestep_embedder.linear_2", "adaln_single.emb.timestep_embedder.linear_2"),
    ("time_embed.linear", "adaln_single.linear"),
)
# HunyuanVideo 1.5: diffusers' HunyuanVideo15Transformer3DModel transformer_blocks (double blocks); the
# fused q / k / v are in _SPLIT_QKV. Both modulations chunk shift, scale, gate (x2) in the same order.
_HV15_DOUBLE = (
    ("attn.to_out.0", "img_attn.proj"), ("attn.to_add_out", "txt_attn.proj"),
    ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"),
    ("ff_context.net.0.proj", "txt_mlp.0"), ("ff_context.net.2", "txt_mlp.2"),
    ("norm1.linear", "img_mod.lin"), ("norm1_context.linear", "txt_mod.lin"),
)  # fmt: skip
_HV15_MARKER = "diffusion_model.txt_in.individual_token_refiner.blocks.0.norm1.weight"
# family marker key -> (block container pairs, global pairs)
_TABLES: dict[str, tuple[tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...], tuple[tuple[str, str], ...]]] = {
    "diffusion_model.head.modulation": ((("blocks", "blocks", _WAN_BLOCK),), _WAN_GLOBAL),
    "diffusion_model.double_stream_modulation_img.lin.weight": (
        (("transformer_blocks", "double_blocks", _FLUX2_DOUBLE),
         ("single_transformer_blocks", "single_blocks", _FLUX2_SINGLE)),
        _FLUX2_GLOBAL,
    ),
    "diffusion_model.adaln_single.linear.weight": ((), _LTXV_GLOBAL),
    _HV15_MARKER: ((("transformer_blocks", "double_blocks", _HV15_DOUBLE),), ()),
}  # fmt: skip


# Fused weights ComfyUI holds whose q / k / v trainers write apart, by a key of the family's model ->
# (fused weight path with {i}, the split paths of q, k, v with {i}). HunyuanVideo 1.5: ComfyUI's
# repackaged checkpoint packs img_attn_qkv; musubi-tuner's model (hunyuan_video_1_5_models.py) splits it,
# and so does diffusers' HunyuanVideo15Transformer3DModel (attn.to_q / add_q_proj ...).
_SPLIT_QKV = {
    _HV15_MARKER: (
        ("double_blocks.{i}.img_attn.qkv", tuple(f"double_blocks.{{i}}.img_attn_{x}" for x in "qkv")),
        ("double_blocks.{i}.txt_attn.qkv", tuple(f"double_blocks.{{i}}.txt_attn_{x}" for x in "qkv")),
        ("double_blocks.{i}.img_attn.qkv", tuple(f"transformer_blocks.{{i}}.attn.to_{x}" for x in "qkv")),
        (
            "double_blocks.{i}.txt_attn.qkv",
            tuple(f"transformer_blocks.{{i}}.attn.add_{x}_proj" for x in "qkv"),
        ),
    ),
}


def split_paths(key_map: Mapping[str, object], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple]:
    """Split q / k / v path -> (fused weight key, (dim, start, rows)) for the tables above."""
    keys = _weight_keys(key_map)
    out: dict[str, tuple] = {}
    for marker, pairs in _SPLIT_QKV.items():
        if marker not in keys:
            continue
        for fused, split in pairs:
            container = fused.split(".", 1)[0]
            for i in range(_block_count(keys, container)):
                key = f"diffusion_model.{fused.format(i=i)}.weight"
                rows = shapes.get(key, (0,))[0]
                if key not in keys or rows % 3:
                    continue
                for n, path in enumerate(split):
                    out[path.format(i=i)] = (key, (0, n * rows // 3, rows // 3))
    return out


def _weight_keys(key_map: Mapping[str, object]) -> set[str]:
    return {t if isinstance(t, str) else t[0] for t in key_map.values()}


def _block_count(keys: set[str], container: str) -> int:
    prefix = f"diffusion_model.{container}."
    indices = {k[len(prefix) :].split(".", 1)[0] for k in keys if k.startswith(prefix)}
    return sum(1 for i in indices if i.isdigit())


def table_paths(key_map: Mapping[str, object]) -> dict[str, str]:
    """Diffusers path -> model weight key, from the family tables, for the weights the model has."""
    keys = _weight_keys(key_map)
    out: dict[str, str] = {}
    for marker, (blocks, globals_) in _TABLES.items():
        if marker not in keys:
            continue
        pairs = list(globals_)
        for theirs, ours, table in blocks:
            for i in range(_block_count(keys, ours)):
                pairs += [(f"{theirs}.{i}.{a}", f"{ours}.{i}.{b}") for a, b in table]
        for theirs, ours in pairs:
            if (key := f"diffusion_model.{ours}.weight") in keys:
                out[theirs] = key
    return out


def _dotted_path(name: str) -> str | None:
    for prefix in _DOTTED:
        if name.startswith(prefix):
            return name[len(prefix) :]
    if "." in name and not name.startswith(_NOT_BARE):
        return name  # a bare path (DiffSynth-Studio, Mochi, Qwen-Image's own format)
    return None


def _is_weight(target: object) -> bool:
    key = target if isinstance(target, str) else target[0] if isinstance(target, tuple) and target else None
    return isinstance(key, str) and key.endswith(".weight")


def with_aliases(
    key_map: Mapping[str, object], shapes: Mapping[str, tuple[int, ...]] | None = None
) -> dict[str, object]:
    """``key_map`` plus every trainer spelling of each DiT weight path it names (see the module doc);
    with the weights' ``shapes`` (key -> shape), also the split q / k / v of fused weights. A map of a
    UNet model (SD1.x, SDXL: input_blocks) is returned as it is."""
    if any(k.startswith("diffusion_model.input_blocks.") for k in _weight_keys(key_map)):
        return dict(key_map)
    paths: dict[str, object] = {**table_paths(key_map), **(split_paths(key_map, shapes) if shapes else {})}
    unclear: set[str] = set()  # a path two names give different weights: left out
    for name, target in key_map.items():
        path = _dotted_path(name) if _is_weight(target) else None
        if path is not None and paths.setdefault(path, target) != target:
            unclear.add(path)
    proposed: dict[str, object] = {}
    clashing: set[str] = set()
    for path, target in paths.items():
        if path in unclear:
            continue
        flat = path.replace(".", "_")
        for alias in (*(p + path for p in _DOTTED), path, *(p + flat for p in _UNDERSCORED)):
            if alias in key_map:
                continue
            if alias in proposed and proposed[alias] != target:
                clashing.add(alias)
            proposed.setdefault(alias, target)
    out = dict(key_map)
    out.update({a: t for a, t in proposed.items() if a not in clashing})
    return out
