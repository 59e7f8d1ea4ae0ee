"""Shared by the DiT layout tests: the tiny model of each family, its block weights' paths, LoRA
tensors built from (A, B) factors under any module names, and ``check``: our Load LoRA on one file
against core's loader on its twin."""

from __future__ import annotations

import comfy.lora
import comfy.sd
import comfy.utils
import dit_factory
import model_factory
import torch
from patch_compare import assert_same, patched, write

from lora_foundry.nodes.load_lora import LoadLoraModelOnly

FAMILIES = ("wan", "zimage", "qwen_image", "chroma", "flux2", "hidream", "ltxv")
NAMES = {"wan": "Wan 2.1", "zimage": "Z-Image", "qwen_image": "Qwen-Image", "chroma": "Chroma",
         "flux2": "Flux.2", "flux": "Flux", "sd3": "SD3", "hidream": "HiDream", "ltxv": "LTX-Video", "hunyuan_video15": "HunyuanVideo 1.5"}  # fmt: skip
# diffusers' own converter from the ComfyUI / original names of each family
CONVERTERS = {"wan": "_convert_non_diffusers_wan_lora_to_diffusers",
              "flux2": "_convert_non_diffusers_flux2_lora_to_diffusers",
              "qwen_image": "_convert_non_diffusers_qwen_lora_to_diffusers",
              "hidream": "_convert_non_diffusers_hidream_lora_to_diffusers",
              "ltxv": "_convert_non_diffusers_ltxv_lora_to_diffusers"}  # fmt: skip
SUFFIXES = {"peft": ("lora_A.weight", "lora_B.weight"), "kohya": ("lora_down.weight", "lora_up.weight")}
_MODELS: dict = {}


def model_of(family: str):
    if family not in _MODELS:
        _MODELS[family] = model_factory.wan_model() if family == "wan" else dit_factory.dit_model(family)
    return _MODELS[family]


def trained_model(family: str):
    """The tiny ComfyUI model Train LoRA trains for ``family`` in the tests: Flux as
    model_factory.flux_model(), Z-Image at the width its modulation needs
    (dit_factory.ZIMAGE_TRAINABLE), else model_of(family); dit_peer.trained_peer is its diffusers twin."""
    if family == "flux":
        return model_factory.flux_model()
    if family == "zimage":
        import comfy.supported_models as sm

        return model_factory._dit_patcher(sm.ZImage, dict(dit_factory.ZIMAGE_TRAINABLE), 0)
    return model_of(family)


def core_map(model) -> dict:
    return comfy.lora.model_lora_keys_unet(model.model, {})


def block_paths(model) -> dict[str, tuple[int, int]]:
    """ComfyUI path -> shape of each 2-D weight in the model's blocks (what trainers train)."""
    sd = model.model.state_dict()
    return {k[len("diffusion_model.") : -len(".weight")]: tuple(v.shape) for k, v in sd.items()
            if k.startswith("diffusion_model.") and k.endswith(".weight") and v.ndim == 2
            and any(b in k for b in ("blocks.", "layers."))}  # fmt: skip


def factors(shapes: dict[str, tuple[int, int]], seed: int, rank: int = 4) -> dict[str, tuple]:
    g = torch.Generator().manual_seed(seed)
    return {p: (torch.randn(rank, s[1], generator=g) * 0.1, torch.randn(s[0], rank, generator=g) * 0.1)
            for p, s in shapes.items()}  # fmt: skip


def tensors(named: dict[str, tuple], style: str = "peft", alpha: float | None = None) -> dict:
    down, up = SUFFIXES[style]
    out = {}
    for name, (a, b) in named.items():
        out |= {f"{name}.{down}": a, f"{name}.{up}": b}
        if alpha is not None:
            out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


def core_loads(model, loras_dir, name: str, strength: float):
    sd = comfy.utils.load_torch_file(str(loras_dir / name), safe_load=True)
    return comfy.sd.load_lora_for_models(model, None, sd, strength, 0)[0]


def check(model, loras_dir, family: str, file: dict, twin: dict, tag: str, expect: str, strength=0.8) -> str:
    """Ours on ``file`` equals core on ``twin`` (whose every module core's map names); returns the report."""
    modules = {k.rsplit(".lora_", 1)[0].removesuffix(".alpha") for k in twin}
    missing = sorted(m for m in modules if m not in core_map(model))
    assert not missing, f"the twin is not core-readable (test bug): {missing[:3]}"
    name = write(loras_dir, f"{family}_{tag}.safetensors", file)
    twin_name = write(loras_dir, f"{family}_{tag}_twin.safetensors", twin)
    out = LoadLoraModelOnly().execute(model, name, strength)
    report = out["ui"]["text"][0]
    n = len({k.rsplit(".lora_", 1)[0] for k in file if ".lora_" in k})
    assert f"matched: unet {n}" in report and "NOT applied" not in report, report
    assert f"layout: {expect} {NAMES[family]} LoRA" in report, report
    assert_same(patched(out["result"][0]), patched(core_loads(model, loras_dir, twin_name, strength)))
    return report
