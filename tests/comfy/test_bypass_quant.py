"""Bypass mode on a scaled-fp8 base loaded by ComfyUI core: sampling never builds a dequantized copy of
a weight (each quantized weight stays the same fp8 tensor, bytes untouched, no ModelPatcher backup),
while patch mode does; and the result equals the LoRA patched onto the dequantized weights in fp32."""

from __future__ import annotations

import comfy.model_management
import comfy.supported_models as sm
import comfy.utils
import lora_factory as lf
import model_factory
import pytest
import quant_models as qm
import torch
from patch_compare import modules, write
from sampling import sample, sd15_conds

from lora_foundry.nodes.lora_apply import BYPASS, PATCH
from lora_foundry.nodes.stack import ApplyLoraStack

pytestmark = pytest.mark.timeout(300)
STACK = (("bq_a.safetensors", 0.3), ("bq_b.safetensors", -0.2), ("bq_c.safetensors", 0.25))


@pytest.fixture(scope="module", params=qm.LAYOUTS)
def quantized(request, sd15, tmp_path_factory, loras_dir):
    """(a loader of fresh MODELs from a scaled-fp8 checkpoint of sd15's UNet, the same UNet in fp32 holding
    exactly the dequantized values, the stack's entries). Each test loads its own MODEL: on 0.12.1 a
    model whose patched fp8 weights were restored once fails its next load in-process ("Cannot set
    version_counter for inference tensor", core's QuantizedTensor re-wrap), which is no bypass matter."""
    layout = request.param
    if layout == "metadata" and not hasattr(comfy.utils, "convert_old_quants"):
        pytest.skip("this ComfyUI (before 0.8) reads its own older mixed-precision keys, not weight_scale")
    path = qm.write_checkpoint(sd15, tmp_path_factory.mktemp("bq") / f"{layout}.safetensors", layout)
    model = qm.load_checkpoint(path, sm.SD15)
    reference = model_factory.build("sd15").model  # same structure, fp32; its weights set below
    layers = dict(model.model.named_modules())
    with torch.no_grad():
        for name, m in reference.model.named_modules():
            if isinstance(getattr(m, "weight", None), torch.Tensor) and qm.is_quantized(layers[name].weight):
                m.weight.copy_(qm.dequantized(layers[name]))
        ref_sd = reference.model.diffusion_model.state_dict()
        for key, v in model.model.diffusion_model.state_dict().items():
            if key in ref_sd and v.dtype == torch.float32:  # biases and norms, kept in fp32 by the quantizer
                ref_sd[key].copy_(v)
    mods = modules(sd15)
    for i, (name, _) in enumerate(STACK):
        write(loras_dir, name, lf.kohya_lora(lf.random_factors(mods, rank=4 * (i + 1), seed=90 + i)))
    return (lambda: qm.load_checkpoint(path, sm.SD15)), reference, [(n, s, s) for n, s in STACK]


def _quant_layers(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.model.named_modules()
            if isinstance(getattr(m, "weight", None), torch.Tensor) and qm.is_quantized(m.weight)}  # fmt: skip


def _fingerprint(model) -> dict[str, tuple]:
    """Each quantized layer's weight: its storage's address, dtype and a checksum of its raw bytes (not the
    Parameter object: ComfyUI 0.12 re-wraps a QuantizedTensor parameter when it moves the model, around
    the same storage)."""
    out = {}
    for name, m in _quant_layers(model).items():
        w = m.weight
        raw = w._qdata if hasattr(w, "_qdata") else w  # a QuantizedTensor keeps its fp8 data inside
        raw = raw if isinstance(raw, torch.Tensor) and raw.dtype != torch.float32 else w.data
        out[name] = (raw.dtype, raw.untyped_storage().data_ptr(), raw.view(torch.uint8).sum().item())
    return out


def test_bypass_never_dequantizes_a_weight(quantized):
    load, _, entries = quantized
    model = load()
    before = _fingerprint(model)
    assert len(before) > 100, "the base is not quantized: the test is moot"
    bm = ApplyLoraStack().execute(model, entries, apply_mode=BYPASS)["result"][0]
    comfy.model_management.unload_all_models()
    sample(bm, *sd15_conds())  # loaded and sampled; ComfyUI keeps it loaded on the CPU
    assert not bm.patches and not bm.backup, "bypass mode built patched weight copies"
    assert _fingerprint(model) == before, "a quantized weight was replaced or rewritten"
    # not moot: patch mode on the same base does replace the weights with patched (re-quantized) copies
    pm = ApplyLoraStack().execute(model, entries, apply_mode=PATCH)["result"][0]
    sample(pm, *sd15_conds())
    assert pm.backup and _fingerprint(model) != before
    comfy.model_management.unload_all_models()  # core restores its backup
    assert _fingerprint(model) == before


def test_bypass_on_fp8_equals_the_lora_on_its_dequantized_weights(quantized):
    load, reference, entries = quantized
    model = load()
    comfy.model_management.unload_all_models()
    conds = sd15_conds()
    bypassed = sample(ApplyLoraStack().execute(model, entries, apply_mode=BYPASS)["result"][0], *conds)
    expected = sample(ApplyLoraStack().execute(reference, entries)["result"][0], *conds)
    base = sample(model, *conds)
    effect = (expected - base).abs().max().item()
    assert effect > 1e-2, f"the LoRAs changed too little: moot ({effect})"
    assert (bypassed - expected).abs().max().item() <= 1e-4 * max(1.0, expected.abs().max().item())
