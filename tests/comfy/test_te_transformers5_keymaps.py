"""Every text encoder ComfyUI has a LoRA key map for (SD1.x, SD2.x, SDXL and its refiner, SD3,
Flux) reads its CLIP layers in the names transformers 5 gives them (no ``text_model`` level),
issue #21. The key maps are ComfyUI's own (comfy.lora.model_lora_keys_clip) on its own text
encoder classes, built full size on the 'meta' device.
"""

from __future__ import annotations

import importlib
import re

import comfy.lora
import pytest
import torch

from lora_foundry.lora_core.apply.keymap import resolve

# (label, module, class): ComfyUI's own text encoder classes, built on 'meta' (full size, no memory).
FAMILIES = [
    ("SD1.x CLIP-L", "comfy.sd1_clip", "SD1ClipModel"),
    ("SD2.x OpenCLIP-H", "comfy.text_encoders.sd2_clip", "SD2ClipModel"),
    ("SDXL CLIP-L + CLIP-G", "comfy.sdxl_clip", "SDXLClipModel"),
    ("SDXL Refiner CLIP-G", "comfy.sdxl_clip", "SDXLRefinerClipModel"),
    ("SD3 CLIP-L + CLIP-G + T5", "comfy.text_encoders.sd3_clip", "SD3ClipModel"),
    ("Flux CLIP-L + T5", "comfy.text_encoders.flux", "FluxClipModel"),
]
CLIP_LAYER = r"clip_[lgh]\.transformer\.text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])\.weight"
TE4_NAME = r"(text_encoder(_2)?\.text_model\.encoder\.layers\.|lora_(te|te1|te2|prior_te)_text_model_encoder_layers_)"


@pytest.mark.parametrize(("label", "module", "cls"), FAMILIES, ids=[f[0] for f in FAMILIES])
def test_every_clip_layer_of_every_family_reads_in_the_transformers5_spelling(label, module, cls):
    """Each transformers 4 CLIP name ComfyUI's key map holds (diffusers text_encoder. / text_encoder_2.,
    kohya lora_te_ / te1_ / te2_ / prior_te_) has a flat twin that resolves to the same weight, and the
    flat names reach every CLIP layer weight of the model; T5's names are left alone."""
    with torch.device("meta"):
        model = getattr(importlib.import_module(module), cls)(device="meta")
    key_map = comfy.lora.model_lora_keys_clip(model, {})
    te4 = [n for n in key_map if re.match(TE4_NAME, n)]
    flat = {n.replace("text_model.", "", 1).replace("text_model_", "", 1): n for n in te4}
    assert not set(flat) & set(key_map)  # ComfyUI itself knows none of the flat names
    res = resolve(flat, key_map)
    assert res.unmatched == () and set(res.transformers5) == set(flat)
    assert res.matched == {n5: key_map[n4] for n5, n4 in flat.items()}
    layers = {k for k in model.state_dict() if re.fullmatch(CLIP_LAYER, k)}
    assert layers and set(res.matched.values()) == layers, label  # every CLIP layer weight

    t5 = [n for n in key_map if n.startswith("lora_te") and "_encoder_block_" in n]
    assert bool(t5) == ("T5" in label)
    res_t5 = resolve(t5, key_map)
    assert res_t5.matched == {n: key_map[n] for n in t5} and res_t5.transformers5 == ()
