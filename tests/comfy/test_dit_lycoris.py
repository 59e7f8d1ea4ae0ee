"""LyCORIS LoHa and LoKr files in the kohya / musubi-tuner DiT naming (``lora_unet_`` + the module path
with underscores, e.g. ``lora_unet_double_blocks_0_img_attn_qkv.hada_w1_a``) on tiny Flux and Wan
models: every module matched, and the weights equal ComfyUI core's loader on the same file (core reads
LoHa and LoKr under these names through its key map)."""

from __future__ import annotations

import comfy.sd
import comfy.utils
import model_factory
import pytest
import torch
from dit_files import block_paths, model_of
from patch_compare import assert_same, patched, write

from lora_foundry.nodes.load_lora import LoadLoraModelOnly

_MODELS: dict = {}


def model(family: str):
    if family not in _MODELS:
        _MODELS[family] = model_factory.flux_model() if family == "flux" else model_of(family)
    return _MODELS[family]


def loha(shapes: dict, seed: int, rank: int = 4) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for path, (o, i) in shapes.items():
        name = "lora_unet_" + path.replace(".", "_")
        out |= {f"{name}.hada_w1_a": torch.randn(o, rank, generator=g) * 0.1,
                f"{name}.hada_w1_b": torch.randn(rank, i, generator=g) * 0.1,
                f"{name}.hada_w2_a": torch.randn(o, rank, generator=g) * 0.1,
                f"{name}.hada_w2_b": torch.randn(rank, i, generator=g) * 0.1,
                f"{name}.alpha": torch.tensor(2.0)}  # fmt: skip
    return out


def lokr(shapes: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for path, (o, i) in shapes.items():
        assert o % 2 == 0 and i % 2 == 0
        name = "lora_unet_" + path.replace(".", "_")
        out |= {f"{name}.lokr_w1": torch.randn(2, 2, generator=g) * 0.3,
                f"{name}.lokr_w2": torch.randn(o // 2, i // 2, generator=g) * 0.1}  # fmt: skip
    return out


@pytest.mark.parametrize("kind", ["loha", "lokr"])
@pytest.mark.parametrize("family", ["flux", "wan"])
def test_lycoris_in_dit_kohya_names_equals_core(family, kind, loras_dir):
    m = model(family)
    shapes = block_paths(m)
    sd = (loha if kind == "loha" else lokr)(shapes, seed=31)
    name = write(loras_dir, f"{family}_{kind}.safetensors", sd)
    out = LoadLoraModelOnly().execute(m, name, 0.7)
    report = out["ui"]["text"][0]
    assert f"matched: unet {len(shapes)}" in report and "NOT applied" not in report, report
    assert ("LoHa" if kind == "loha" else "LoKr") in report, report
    core_sd = comfy.utils.load_torch_file(str(loras_dir / name), safe_load=True)
    core = comfy.sd.load_lora_for_models(m, None, core_sd, 0.7, 0)[0]
    assert len(core.patches) == len(shapes)  # core read every module too: the comparison is not moot
    assert_same(patched(out["result"][0]), patched(core))
