"""The tiny Flux model the tests build is configured as ComfyUI configures a Flux.1 checkpoint it
detects from the weights, on every ComfyUI the suite runs on (0.8+ added the required field
FluxParams.txt_ids_dims; 0.3.75 refuses it)."""

from __future__ import annotations

import dataclasses

import comfy.model_detection
import dit_factory
import pytest
from comfy.ldm.flux.model import FluxParams

# Fields ComfyUI's detection reads from the weights; the others it fills with full-size defaults
# (axes_dim, num_heads, theta), which a tiny model cannot share.
FROM_WEIGHTS = (
    "in_channels", "vec_in_dim", "context_in_dim", "hidden_size", "depth", "depth_single_blocks",
    "guidance_embed", "patch_size", "qkv_bias", "out_channels",
)  # fmt: skip


def test_flux_params_equal_what_comfyui_detects_from_its_weights(flux):
    model = flux.model.diffusion_model
    detected = comfy.model_detection.detect_unet_config(model.state_dict(), "")
    params = dataclasses.asdict(model.params)
    assert detected["image_model"] == "flux"
    assert {k: params[k] for k in FROM_WEIGHTS} == {k: detected[k] for k in FROM_WEIGHTS}
    has_field = "txt_ids_dims" in {f.name for f in dataclasses.fields(FluxParams)}
    # Where this ComfyUI has the field, its detection sets it for Flux.1 and the factory agrees.
    assert ("txt_ids_dims" in detected) == has_field
    if has_field:
        assert params["txt_ids_dims"] == detected["txt_ids_dims"]


# Per family, the fields ComfyUI's detection reads from the weights (comfy/model_detection.py); the
# others it sets to the full-size model's values (HiDream's block counts, Chroma's approximator).
READ_FROM_WEIGHTS = {
    "zimage": ("dim", "cap_feat_dim", "n_layers"),
    "qwen_image": ("in_channels", "num_layers"),
    "chroma": ("hidden_size", "context_in_dim", "depth", "depth_single_blocks"),
    "flux2": ("in_channels", "hidden_size", "context_in_dim", "depth", "depth_single_blocks"),
    "hidream": ("in_channels",),
    "ltxv": ("num_layers", "cross_attention_dim"),
    "hunyuan_video15": ("in_channels", "hidden_size", "context_in_dim", "depth", "vision_in_dim"),
}


@pytest.mark.parametrize("family", sorted(dit_factory.CONFIGS))
def test_dit_factory_models_are_what_comfyui_detects(family):
    """ComfyUI's detection, run on the tiny model's weights, picks the same model class and the
    same values for the fields it reads from the weights."""
    import comfy.model_detection

    model = dit_factory.dit_model(family)
    sd = model.model.diffusion_model.state_dict()
    detected = comfy.model_detection.detect_unet_config(sd, "")
    config = comfy.model_detection.model_config_from_unet_config(detected, sd)
    import comfy.supported_models as sm

    # ZImage is Lumina2 matched on the full width (dim 3840): the tiny one is detected as its parent.
    assert issubclass(getattr(sm, dit_factory.CONFIGS[family][0]), type(config)), type(config).__name__
    assert type(config).__name__ == dit_factory.CONFIGS[family][0] or family == "zimage"
    built = model.model.model_config.unet_config
    from_weights = READ_FROM_WEIGHTS[family]
    assert {k: detected[k] for k in from_weights} == {k: built[k] for k in from_weights}
