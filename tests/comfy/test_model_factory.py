"""The tiny Flux model the tests build is configured as ComfyUI configures a Flux.1 checkpoint it
detects from the weights, on every ComfyUI the suite runs on (0.8+ added the required field
FluxParams.txt_ids_dims; 0.3.75 refuses it)."""

from __future__ import annotations

import dataclasses

import comfy.model_detection
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
