"""Tiny DiT MODELs of the 2026 families (Z-Image, Qwen-Image, Chroma, Flux.2, HiDream, LTX-V,
HunyuanVideo 1.5), built
from ComfyUI's own classes with random weights, for the LoRA layout tests.

Each config is ComfyUI's own for the family (the fields its model detection sets, see
comfy/model_detection.py) with the widths and depths made small; tests/comfy/test_model_factory.py
checks that ComfyUI's detection, run on the built weights, names the same model class. Nothing here
is part of the pack itself.
"""

from __future__ import annotations

import torch

# family -> (comfy.supported_models class name, unet_config)
CONFIGS: dict[str, tuple[str, dict]] = {
    "zimage": ("ZImage", {
        "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64, "cap_feat_dim": 32,
        "n_layers": 2, "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 2, "qk_norm": True,
        "axes_dims": [8, 12, 12], "axes_lens": [64, 32, 32], "rope_theta": 256.0,
        "ffn_dim_multiplier": 8.0 / 3.0, "multiple_of": 16, "z_image_modulation": True, "time_scale": 1000.0,
        "pad_tokens_multiple": 32,
    }),
    "qwen_image": ("QwenImage", {
        "image_model": "qwen_image", "in_channels": 64, "out_channels": 16, "num_layers": 2,
        "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": 32, "axes_dims_rope": (8, 12, 12),
    }),
    "chroma": ("Chroma", {
        "image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": 32, "hidden_size": 64,
        "mlp_ratio": 4.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 2, "axes_dim": [8, 12, 12],
        "theta": 10000, "patch_size": 2, "qkv_bias": True, "in_dim": 64, "out_dim": 64, "hidden_dim": 64, "n_layers": 1,
    }),
    "flux2": ("Flux2", {
        "image_model": "flux2", "in_channels": 16, "out_channels": 16, "vec_in_dim": None, "context_in_dim": 32,
        "hidden_size": 64, "mlp_ratio": 3.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 2,
        "axes_dim": [8, 8, 8, 8], "theta": 2000, "patch_size": 1, "qkv_bias": False, "guidance_embed": True,
        "global_modulation": True, "mlp_silu_act": True, "ops_bias": False, "default_ref_method": "index",
        "ref_index_scale": 10.0,
    }),
    "hidream": ("HiDream", {
        "image_model": "hidream", "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 2,
        "num_single_layers": 2, "attention_head_dim": 32, "num_attention_heads": 2, "caption_channels": [32, 32],
        "text_emb_dim": 32, "num_routed_experts": 2, "num_activated_experts": 1, "axes_dims_rope": [16, 8, 8],
        "max_resolution": [16, 16], "llama_layers": [0, 1],
    }),
    "ltxv": ("LTXV", {
        "image_model": "ltxv", "in_channels": 128, "cross_attention_dim": 64, "attention_head_dim": 32,
        "num_attention_heads": 2, "caption_channels": 32, "num_layers": 2,
    }),
    "hunyuan_video15": ("HunyuanVideo15", {
        "image_model": "hunyuan_video", "in_channels": 32, "out_channels": 32, "patch_size": [1, 1, 1],
        "vec_in_dim": None, "axes_dim": [8, 12, 12], "meanflow": False, "context_in_dim": 32, "hidden_size": 64,
        "mlp_ratio": 4.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 0, "theta": 256, "qkv_bias": True,
        "byt5": True, "guidance_embed": False, "use_cond_type_embedding": True, "vision_in_dim": 1152,
    }),
}  # fmt: skip
# Z-Image to train: ComfyUI's Z-Image modulation reads a 256-wide timestep embedding, so its width
# must be >= 256 (build with model_factory._dit_patcher(comfy.supported_models.ZImage, ...)).
ZIMAGE_TRAINABLE = CONFIGS["zimage"][1] | {"dim": 256, "axes_dims": [32, 48, 48]}


def dit_model(family: str, seed: int = 0, dtype=torch.float32):
    """A tiny MODEL (ModelPatcher, random weights, no text encoder) of one of CONFIGS' families."""
    import comfy.supported_models as sm
    import model_factory

    class_name, unet_config = CONFIGS[family]
    config = {**unet_config, **_version_fields(family)}
    return model_factory._dit_patcher(getattr(sm, class_name), config, seed, dtype)


# Fields newer ComfyUIs (0.8+) require and older ones refuse, with the values their detection sets.
_NEWER_FIELDS = {
    "flux2": {"txt_ids_dims": [3]},
    "chroma": {"txt_ids_dims": [], "vec_in_dim": None},
    "hunyuan_video15": {"meanflow_sum": True},
}


def _version_fields(family: str) -> dict:
    import dataclasses

    if family not in _NEWER_FIELDS:
        return {}
    if family == "chroma":
        from comfy.ldm.chroma.model import ChromaParams as params
    elif family == "hunyuan_video15":
        from comfy.ldm.hunyuan_video.model import HunyuanVideoParams as params
    else:
        from comfy.ldm.flux.model import FluxParams as params
    names = {f.name for f in dataclasses.fields(params)}
    return {k: v for k, v in _NEWER_FIELDS[family].items() if k in names}
