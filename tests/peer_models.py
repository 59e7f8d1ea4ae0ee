"""Tiny diffusers / transformers models with the structure of our tiny ComfyUI models.

Peer tools (LyCORIS, PEFT) build their networks on these, by their own module names; the
files they save are then loaded onto the ComfyUI models of scripts/model_factory.py. Built
from configs only (no hub download). Also: mapping a peer model's weight key to the ComfyUI
key of the same weight, through ComfyUI's own diffusers<->ldm map.
"""

from __future__ import annotations

import model_factory
import torch

SD15 = model_factory.SD15_TINY
SDXL = model_factory.SDXL_TINY


def _build(make, seed: int | None):
    """Random weights from ``seed``; with None, weights on 'meta' (to be assigned, no init cost)."""
    if seed is not None:
        module = make()
        model_factory.randomize_(module, seed)
        return module.eval()
    with torch.device("meta"):
        return make().eval()


def sd15_unet(seed: int | None = 0, s: model_factory.Sizes = SD15):
    """diffusers UNet2DConditionModel laid out like model_factory's SD1.5 UNet."""
    from diffusers import UNet2DConditionModel

    mult = (1, 2, 4, 4)
    return _build(
        lambda: UNet2DConditionModel(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=tuple(s.model_channels * m for m in mult),
            layers_per_block=2,
            cross_attention_dim=s.clip_l_hidden,
            attention_head_dim=s.heads,  # diffusers' SD1.5 quirk: this is the number of heads
            norm_num_groups=32,
        ),
        seed,
    )


class TextEncoder(torch.nn.Module):
    """A CLIPTextModel seen through ``text_model``, the module paths trainers (sd-scripts) name.

    transformers 5 dropped the ``text_model`` level from CLIPTextModel; LoRA files in the wild
    come from transformers 4 and say ``lora_te_text_model_encoder_layers_...``.
    """

    def __init__(self, text_model: torch.nn.Module):
        super().__init__()
        self.text_model = getattr(text_model, "text_model", text_model)


def sd15_text_encoder(seed: int | None = 1, s: model_factory.Sizes = SD15) -> TextEncoder:
    """transformers CLIPTextModel with the config of model_factory's SD1.5 CLIP-L."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = model_factory.clip_text_config(s.clip_l_hidden, s.clip_l_layers, s.heads)
    cfg.pop("model_type")
    return _build(lambda: TextEncoder(CLIPTextModel(CLIPTextConfig(**cfg))), seed)


def sd15_peers(models):
    """(UNet, TextEncoder) holding copies of the ComfyUI SD1.5 models' weights: one network, two spellings."""
    unet, te = sd15_unet(None), sd15_text_encoder(None)
    load_comfy_weights(models, unet, te)
    return unet, te


def sdxl_unet(s: model_factory.Sizes = SDXL):
    """diffusers UNet2DConditionModel laid out like model_factory's SDXL UNet (on 'meta')."""
    from diffusers import UNet2DConditionModel

    return _build(
        lambda: UNet2DConditionModel(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(s.model_channels, s.model_channels * 2, s.model_channels * 4),
            layers_per_block=2,
            transformer_layers_per_block=(1, 1, 2),
            cross_attention_dim=s.clip_l_hidden + s.clip_g_hidden,
            attention_head_dim=s.heads,  # the number of heads, as in SD1.5
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=s.clip_g_hidden + 6 * 256,
            norm_num_groups=32,
        ),
        None,
    )


def sdxl_peers(models, s: model_factory.Sizes = SDXL):
    """(UNet, CLIPTextModel, CLIPTextModelWithProjection) holding the ComfyUI SDXL models' weights.

    The text encoders are transformers' own classes as diffusers' SDXL pipeline holds them (in
    transformers 5 the first has no ``text_model`` level, the second keeps it)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def encoder(cls, hidden, layers):
        cfg = model_factory.clip_text_config(hidden, layers, s.heads)
        cfg.pop("model_type")
        return _build(lambda: cls(CLIPTextConfig(**cfg)), None)

    unet = sdxl_unet(s)
    te1 = encoder(CLIPTextModel, s.clip_l_hidden, s.clip_l_layers)
    te2 = encoder(CLIPTextModelWithProjection, s.clip_g_hidden, s.clip_g_layers)
    load_comfy_weights(models, unet)
    _load_encoder(models, te1, sdxl_clip_key_to_comfy(te1, "clip_l"))
    _load_encoder(models, te2, sdxl_clip_key_to_comfy(te2, "clip_g"))
    return unet, te1, te2


def sdxl_clip_key_to_comfy(encoder: torch.nn.Module, part: str):
    """A function: key of ``encoder`` (a transformers CLIP text model) -> the ComfyUI SDXL CLIP key."""
    flat = not hasattr(encoder, "text_model")  # transformers 5 CLIPTextModel

    def to_comfy(key: str) -> str:
        return f"{part}.transformer." + ("text_model." + key if flat else key)

    return to_comfy


def _load_encoder(models, encoder: torch.nn.Module, to_comfy) -> None:
    csd = models.clip.cond_stage_model.state_dict()
    encoder.load_state_dict({k: csd[to_comfy(k)].clone() for k in encoder.state_dict()}, assign=True)
    for emb in [m for m in encoder.modules() if hasattr(m, "position_ids")]:
        if emb.position_ids.is_meta:  # a non-persistent buffer: not in any state dict
            emb.position_ids = torch.arange(emb.position_ids.shape[1]).expand((1, -1))
    left = [n for n, t in [*encoder.named_parameters(), *encoder.named_buffers()] if t.is_meta]
    assert not left, f"weights the ComfyUI model does not have: {left[:5]}"


def load_comfy_weights(models, unet=None, te=None) -> None:
    """Copy the ComfyUI models' weights into the peer models (every peer weight must have one)."""
    if unet is not None:
        msd = models.model.model.state_dict()
        umap = unet_key_to_comfy(models)
        unet.load_state_dict({k: msd[umap[k]].clone() for k in unet.state_dict()}, assign=True)
    if te is not None:
        csd = models.clip.cond_stage_model.state_dict()
        te.load_state_dict({k: csd[clip_key_to_comfy(k)].clone() for k in te.state_dict()}, assign=True)
        emb = te.text_model.embeddings
        if emb.position_ids.is_meta:  # a non-persistent buffer: not in any state dict
            emb.position_ids = torch.arange(emb.position_ids.shape[1]).expand((1, -1))
    for module in (unet, te):
        if module is not None:
            left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
            assert not left, f"weights the ComfyUI model does not have: {left[:5]}"


def unet_key_to_comfy(models) -> dict[str, str]:
    """diffusers UNet weight key -> ComfyUI MODEL key, e.g. 'diffusion_model.input_blocks.1.1....'."""
    import comfy.utils

    config = models.model.model.model_config.unet_config
    return {d: "diffusion_model." + ldm for d, ldm in comfy.utils.unet_to_diffusers(config).items()}


def clip_key_to_comfy(key: str) -> str:
    """TextEncoder key ('text_model.encoder...') -> ComfyUI SD1.5 CLIP key."""
    return "clip_l.transformer." + key


def comfy_weight_key(models, part: str, path: str) -> str:
    """The ComfyUI key of the weight of module ``path`` of a peer model ('unet' or 'te', SD1.5)."""
    if part == "unet":
        return unet_key_to_comfy(models)[path + ".weight"]
    return clip_key_to_comfy(path + ".weight")


def effective_weight(module: torch.nn.Module, org: torch.nn.Module) -> torch.Tensor:
    """The weight a module's forward applies (a peer tool's adapter wrapped around ``org``, a
    Linear or a Conv2d), read off unit inputs, less the bias."""
    with torch.no_grad():
        if isinstance(org, torch.nn.Linear):
            eye = torch.eye(org.in_features)
            return (module(eye) - module(torch.zeros(1, org.in_features))).T.float()
        # a conv: one unit impulse per input channel and window position, placed where output
        # position (o, o) sees exactly one whole window through the conv's padding and stride
        c_in, (kh, kw) = org.in_channels, org.kernel_size
        (p, _), (st, _) = org.padding, org.stride
        o = -(-p // st)
        q = o * st - p
        probe = torch.zeros(c_in * kh * kw, c_in, q + kh, q + kw)
        probe[:, :, q:, q:] = torch.eye(c_in * kh * kw).reshape(-1, c_in, kh, kw)
        y = module(probe) - module(torch.zeros_like(probe[:1]))
        return y[:, :, o, o].T.reshape(org.out_channels, c_in, kh, kw).float()


def peer_to_comfy(models, unet_keys=(), clip_keys=()) -> dict[str, str]:
    """Peer weight keys ('unet.<key>' / 'te.<key>') to ComfyUI keys; raises on a key ComfyUI lacks."""
    umap = unet_key_to_comfy(models)
    out = {}
    for k in unet_keys:
        if k not in umap:
            raise KeyError(f"diffusers UNet key {k} has no ComfyUI counterpart")
        out["unet." + k] = umap[k]
    clip_sd = models.clip.cond_stage_model.state_dict()
    for k in clip_keys:
        ck = clip_key_to_comfy(k)
        if ck not in clip_sd:
            raise KeyError(f"CLIP key {k} has no ComfyUI counterpart ({ck})")
        out["te." + k] = ck
    return out


def weight_deltas(before: torch.nn.Module | dict, after: torch.nn.Module | dict, atol: float = 0.0):
    """{key: after - before} for the weights a merge changed (float32)."""
    b = before if isinstance(before, dict) else before.state_dict()
    a = after if isinstance(after, dict) else after.state_dict()
    out = {}
    for k, v in a.items():
        if k in b and v.shape == b[k].shape and v.is_floating_point():
            d = v.float() - b[k].float()
            if d.abs().max().item() > atol:
                out[k] = d
    return out
