"""Builds Stable Diffusion models with random weights from ComfyUI's own classes.

Used by the demo (a full-size SD1.5 checkpoint that ComfyUI detects as SD1.5) and by the
tests (tiny SD1.5- and SDXL-structured MODEL / CLIP / VAE built in-process in well under a
second). ComfyUI must be importable and ``comfy.cli_args.args.cpu`` set before use.
Nothing here is part of the pack itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sizes:
    """The knobs that make a model tiny or full size; the block layout never changes."""

    model_channels: int
    heads: int
    clip_l_hidden: int
    clip_l_layers: int
    clip_g_hidden: int = 0
    clip_g_layers: int = 0
    vae_ch: int = 128


SD15_FULL = Sizes(model_channels=320, heads=8, clip_l_hidden=768, clip_l_layers=12)
SD15_TINY = Sizes(model_channels=32, heads=2, clip_l_hidden=64, clip_l_layers=2, vae_ch=32)
SDXL_TINY = Sizes(
    model_channels=32,
    heads=2,
    clip_l_hidden=32,
    clip_l_layers=3,
    clip_g_hidden=64,
    clip_g_layers=3,
    vae_ch=32,
)


def sd15_unet_config(s: Sizes) -> dict:
    # The layout ComfyUI's model detection reports for an SD1.5 checkpoint.
    return {
        "use_checkpoint": False,
        "image_size": 32,
        "out_channels": 4,
        "use_spatial_transformer": True,
        "legacy": False,
        "adm_in_channels": None,
        "in_channels": 4,
        "model_channels": s.model_channels,
        "num_res_blocks": [2, 2, 2, 2],
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "channel_mult": [1, 2, 4, 4],
        "transformer_depth_middle": 1,
        "use_linear_in_transformer": False,
        "context_dim": s.clip_l_hidden,
        "num_heads": s.heads,
        "num_head_channels": -1,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "use_temporal_resblock": False,
        "use_temporal_attention": False,
    }


def sdxl_unet_config(s: Sizes) -> dict:
    # SDXL's layout (attention in levels 1 and 2, linear proj_in) with fewer transformer blocks.
    return {
        "use_checkpoint": False,
        "image_size": 32,
        "out_channels": 4,
        "use_spatial_transformer": True,
        "legacy": False,
        "num_classes": "sequential",
        "adm_in_channels": s.clip_g_hidden + 6 * 256,
        "in_channels": 4,
        "model_channels": s.model_channels,
        "num_res_blocks": [2, 2, 2],
        "transformer_depth": [0, 0, 1, 1, 2, 2],
        "channel_mult": [1, 2, 4],
        "transformer_depth_middle": 2,
        "use_linear_in_transformer": True,
        "context_dim": s.clip_l_hidden + s.clip_g_hidden,
        "num_head_channels": -1,
        "num_heads": s.heads,
        "transformer_depth_output": [0, 0, 0, 1, 1, 1, 2, 2, 2],
        "use_temporal_resblock": False,
        "use_temporal_attention": False,
    }


def clip_text_config(hidden: int, layers: int, heads: int) -> dict:
    # Keeps the real 49408-token vocabulary so ComfyUI's tokenizer works unchanged.
    return {
        "hidden_act": "quick_gelu" if hidden <= 768 else "gelu",
        "hidden_size": hidden,
        "intermediate_size": hidden * 4,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "max_position_embeddings": 77,
        "projection_dim": hidden,
        "vocab_size": 49408,
        "layer_norm_eps": 1e-5,
        "eos_token_id": 49407,
        "bos_token_id": 0,
        "pad_token_id": 1,
        "model_type": "clip_text_model",
    }


def vae_config(ch: int) -> dict:
    return {
        "embed_dim": 4,
        "ddconfig": {
            "double_z": True,
            "z_channels": 4,
            "resolution": 256,
            "in_channels": 3,
            "out_ch": 3,
            "ch": ch,
            "ch_mult": [1, 2, 4, 4],
            "num_res_blocks": 2,
            "attn_resolutions": [],
            "dropout": 0.0,
        },
    }


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Fan-in scaled normal weights, norms 1, biases 0: activations stay finite through the net."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if p.ndim == 0:
                continue
            if leaf == "bias":
                p.zero_()
            elif p.ndim == 1:
                p.fill_(1.0)
            else:
                fan_in = max(1, p[0].numel())
                if "embedding" in name:
                    fan_in = 1
                p.copy_(
                    torch.randn(p.shape, generator=g) / math.sqrt(fan_in) * (0.02 if fan_in == 1 else 1.0)
                )


# --- ComfyUI objects ---------------------------------------------------------------------


def _clip_classes(s: Sizes, sdxl: bool):
    import comfy.sd1_clip as sd1

    l_cfg = clip_text_config(s.clip_l_hidden, s.clip_l_layers, s.heads)

    class TinyClipL(sd1.SDClipModel):
        def __init__(self, device="cpu", dtype=None, model_options=None, **kw):
            if sdxl:
                kw.update(layer="hidden", layer_idx=-2, layer_norm_hidden_state=False)
            super().__init__(
                device=device,
                dtype=dtype,
                textmodel_json_config=l_cfg,
                model_options=model_options or {},
                **kw,
            )

    if not sdxl:

        class TinySD1Clip(sd1.SD1ClipModel):
            def __init__(self, device="cpu", dtype=None, model_options=None, **kw):
                super().__init__(
                    device=device, dtype=dtype, model_options=model_options or {}, clip_model=TinyClipL, **kw
                )

        return TinySD1Clip, sd1.SD1Tokenizer

    import comfy.sdxl_clip as sdxl_clip

    g_cfg = clip_text_config(s.clip_g_hidden, s.clip_g_layers, s.heads)
    g_cfg["hidden_act"] = "gelu"

    class TinyClipG(sd1.SDClipModel):
        def __init__(self, device="cpu", dtype=None, model_options=None, **kw):
            opts = {**(model_options or {}), "model_name": "clip_g"}
            super().__init__(
                device=device,
                dtype=dtype,
                layer="hidden",
                layer_idx=-2,
                textmodel_json_config=g_cfg,
                special_tokens={"start": 49406, "end": 49407, "pad": 0},
                layer_norm_hidden_state=False,
                return_projected_pooled=True,
                model_options=opts,
            )

    class TinySDXLClip(sdxl_clip.SDXLClipModel):
        def __init__(self, device="cpu", dtype=None, model_options=None):
            torch.nn.Module.__init__(self)
            self.clip_l = TinyClipL(device=device, dtype=dtype, model_options=model_options)
            self.clip_g = TinyClipG(device=device, dtype=dtype, model_options=model_options)
            self.dtypes = {dtype}

    return TinySDXLClip, sdxl_clip.SDXLTokenizer


@dataclass
class ComfyModels:
    model: object  # comfy.model_patcher.ModelPatcher
    clip: object  # comfy.sd.CLIP
    vae: object  # comfy.sd.VAE
    family: str


def build(family: str = "sd15", s: Sizes | None = None, seed: int = 0) -> ComfyModels:
    """MODEL, CLIP and VAE with random weights, structured like SD1.5 or SDXL, on the CPU."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models as sm
    import comfy.supported_models_base as smb

    sdxl = family == "sdxl"
    s = s or (SDXL_TINY if sdxl else SD15_TINY)
    unet_config = sdxl_unet_config(s) if sdxl else sd15_unet_config(s)
    config = (sm.SDXL if sdxl else sm.SD15)(unet_config)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    randomize_(model.diffusion_model, seed)
    model.eval()
    patcher = comfy.model_patcher.ModelPatcher(
        model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )

    clip_cls, tok_cls = _clip_classes(s, sdxl)
    target = smb.ClipTarget(tok_cls, clip_cls)
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32})
    randomize_(clip.cond_stage_model, seed + 1)

    vae = comfy.sd.VAE(sd=_vae_state_dict(s.vae_ch, seed + 2), config={"params": vae_config(s.vae_ch)})
    return ComfyModels(model=patcher, clip=clip, vae=vae, family=family)


def flux_model(seed: int = 0, hidden: int = 64, depth: int = 2, single: int = 2, dtype=torch.float32):
    """A tiny Flux-structured MODEL (ModelPatcher, random weights; no text encoders), its weights
    stored in ``dtype`` (float8_e4m3fn, bfloat16 and float16 computed in float32, as on a CPU).

    ComfyUI's Flux key map names its fused weights in diffusers' split form (q, k, v as slices of
    qkv, through offsets) and attaches a function to some targets (norm_out: scale and shift
    swapped), so LoRAs for it take the paths an SD model never does.
    """
    import comfy.supported_models as sm

    heads = 2
    head_dim = hidden // heads
    axes = [head_dim - 2 * (head_dim * 3 // 8), head_dim * 3 // 8, head_dim * 3 // 8]
    unet_config = {
        "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 32,
        "context_in_dim": 32, "hidden_size": hidden, "mlp_ratio": 4.0, "num_heads": heads,
        "depth": depth, "depth_single_blocks": single, "axes_dim": axes, "theta": 10000,
        "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
    }  # fmt: skip
    unet_config.update(_flux_version_fields())
    return _dit_patcher(sm.Flux, unet_config, seed, dtype)


def _flux_version_fields() -> dict:
    """Flux config fields that only some ComfyUI versions have: newer ones (0.8+) require
    ``txt_ids_dims`` (text positions written into these rope axes; none for Flux.1, as ComfyUI's
    own model detection sets it), older ones refuse it as an unknown argument."""
    import dataclasses

    from comfy.ldm.flux.model import FluxParams

    names = {f.name for f in dataclasses.fields(FluxParams)}
    return {"txt_ids_dims": []} if "txt_ids_dims" in names else {}


def wan_model(seed: int = 0, dim: int = 64, layers: int = 2):
    """A tiny Wan 2.1 text-to-video MODEL (ModelPatcher, random weights; no text encoder)."""
    import comfy.supported_models as sm

    unet_config = {
        "image_model": "wan2.1", "model_type": "t2v", "dim": dim, "ffn_dim": 2 * dim, "freq_dim": 32,
        "text_dim": 32, "num_heads": 2, "num_layers": layers, "in_dim": 16, "out_dim": 16,
    }  # fmt: skip
    return _dit_patcher(sm.WAN21_T2V, unet_config, seed)


def sd3_model(seed: int = 0, depth: int = 2):
    """A tiny SD3-structured MODEL (MMDiT, hidden size 64 x depth; no text encoders). Like Flux, its
    key map addresses q, k, v as slices of fused weights and passes some changes through functions."""
    import comfy.supported_models as sm

    hidden = 64 * depth
    unet_config = {
        "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": depth, "num_patches": 64 * 64,
        "pos_embed_max_size": 64, "adm_in_channels": 64,
        "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 32, "out_features": hidden}},
    }  # fmt: skip
    return _dit_patcher(sm.SD3, unet_config, seed)


def _dit_patcher(config_class, unet_config: dict, seed: int, dtype=torch.float32):
    import comfy.model_management as mm
    import comfy.model_patcher

    config = config_class(unet_config)
    config.set_inference_dtype(dtype, None if dtype == torch.float32 else torch.float32)
    model = config.get_model({})
    randomize_(model.diffusion_model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # buffers a checkpoint would fill (SD3's pos_embed) start as torch.empty
        for _, buf in model.diffusion_model.named_buffers():
            if buf.is_floating_point():
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.02)
    model.eval()
    return comfy.model_patcher.ModelPatcher(
        model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )


def _vae_state_dict(ch: int, seed: int) -> dict:
    from comfy.ldm.models.autoencoder import AutoencoderKL

    cfg = vae_config(ch)
    vae = AutoencoderKL(ddconfig=cfg["ddconfig"], embed_dim=cfg["embed_dim"])
    randomize_(vae, seed)
    return vae.state_dict()
