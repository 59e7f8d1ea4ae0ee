"""Flux LoRAs on a tiny Flux MODEL: diffusers names that address slices of fused weights (q, k, v
of qkv through offsets), a target with a function (norm_out: scale and shift swapped), and
kohya names on the fused weights. Ours must give core's weights for each, alone and stacked."""

from __future__ import annotations

import comfy.lora
import comfy.sd
import comfy.utils
import pytest
import torch
from patch_compare import assert_same, patched, write

from lora_foundry.nodes.load_lora import LoadLoraModelOnly
from lora_foundry.nodes.stack import ApplyLoraStack


def core_loader(model, loras_dir, name: str, strength: float):
    """ComfyUI core's LoraLoaderModelOnly, minus the node class."""
    sd = comfy.utils.load_torch_file(str(loras_dir / name), safe_load=True)
    return comfy.sd.load_lora_for_models(model, None, sd, strength, 0)[0]


def _targets(model, prefix: str) -> dict[str, tuple[str, tuple | None, object]]:
    """LoRA module name -> (weight key, offset, function) for 2-D weights, from ComfyUI's key map."""
    sd = model.model.state_dict()
    out = {}
    for name, target in comfy.lora.model_lora_keys_unet(model.model, {}).items():
        if not name.startswith(prefix):
            continue
        key, offset, function = (target, None, None) if isinstance(target, str) else (*target, None)[:3]
        if key in sd and key.endswith(".weight") and sd[key].ndim == 2:
            out[name] = (key, offset, function)
    return out


def _lora(model, prefix: str, up_key: str, down_key: str, seed: int, rank: int = 4) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = model.model.state_dict()
    tensors = {}
    for name, (key, offset, _) in _targets(model, prefix).items():
        rows = offset[2] if offset is not None else sd[key].shape[0]
        tensors[f"{name}.{down_key}"] = torch.randn(rank, sd[key].shape[1], generator=g) * 0.1
        tensors[f"{name}.{up_key}"] = torch.randn(rows, rank, generator=g) * 0.1
        if up_key == "lora_up.weight":
            tensors[f"{name}.alpha"] = torch.tensor(float(rank) / 2)
    return tensors


@pytest.fixture(scope="module")
def flux_loras(flux, loras_dir):
    diffusers = _lora(flux, "transformer.", "lora_B.weight", "lora_A.weight", seed=61)
    kohya = _lora(flux, "lora_unet_", "lora_up.weight", "lora_down.weight", seed=62)
    return write(loras_dir, "flux_diffusers.safetensors", diffusers), write(
        loras_dir, "flux_kohya.safetensors", kohya
    )


def test_the_key_map_really_uses_slices_and_functions(flux):
    targets = _targets(flux, "transformer.")
    assert any(offset is not None for _, offset, _ in targets.values()), "no slice targets: test is moot"
    assert any(fn is not None for _, _, fn in targets.values()), "no function targets: test is moot"


@pytest.mark.parametrize("which", [0, 1], ids=["diffusers", "kohya"])
def test_flux_lora_equals_core(flux, flux_loras, loras_dir, which):
    name = flux_loras[which]
    core = core_loader(flux, loras_dir, name, 0.7)
    out = LoadLoraModelOnly().execute(flux, name, 0.7)
    report = out["ui"]["text"][0]
    assert "model Flux" in report and "LoRA Flux" in report, report
    modules = len(_targets(flux, ("transformer.", "lora_unet_")[which]))
    assert f"matched: unet {modules}" in report and "unmatched" not in report.lower(), report
    assert_same(patched(out["result"][0]), patched(core))


def test_flux_stack_equals_chained_core(flux, flux_loras, loras_dir):
    a, b = flux_loras
    m = core_loader(core_loader(flux, loras_dir, a, 0.6), loras_dir, b, -0.4)
    ours = ApplyLoraStack().execute(flux, [(a, 0.6, 1.0), (b, -0.4, 1.0)])["result"][0]
    assert_same(patched(ours), patched(m))


def test_flux_model_load_patches_the_slices(flux, flux_loras, loras_dir):
    """The real load path (ModelPatcher.patch_model on narrowed views), then restored."""
    a, b = flux_loras
    core = core_loader(core_loader(flux, loras_dir, a, 0.8), loras_dir, b, 0.5)
    ours = ApplyLoraStack().execute(flux, [(a, 0.8, 1.0), (b, 0.5, 1.0)])["result"][0]
    base = {k: v.clone() for k, v in flux.model.state_dict().items()}
    weights = {}
    for side, patcher in (("core", core), ("ours", ours)):
        patcher.patch_model()
        weights[side] = {k: comfy.utils.get_attr(patcher.model, k).detach().clone() for k in patcher.patches}
        patcher.unpatch_model()
    assert_same(weights["ours"], weights["core"])
    qkv = "diffusion_model.double_blocks.0.img_attn.qkv.weight"
    assert not torch.equal(weights["ours"][qkv], base[qkv]), "the fused qkv weight was not patched"
    after = flux.model.state_dict()
    assert all(torch.equal(after[k], base[k]) for k in base), "the base model was changed"


@pytest.mark.parametrize("method", ["concat", "svd"])
def test_flux_stack_merges_into_a_file_core_loads(flux, flux_loras, loras_dir, method):
    from lora_foundry.nodes.merge import MergeLoras

    a, b = flux_loras
    entries = [(a, 0.6, 1.0), (b, -0.4, 1.0)]
    args = dict(
        conv_rank=0, density=0.5, seed=0, save_dtype="fp32", output_name=f"flux_{method}", overwrite=True
    )
    name, report = MergeLoras().execute(flux, entries, method, 64, **args)["result"]
    stack = ApplyLoraStack().execute(flux, entries)["result"][0]
    merged = core_loader(flux, loras_dir, name, 1.0)
    assert_same(patched(merged), patched(stack))
