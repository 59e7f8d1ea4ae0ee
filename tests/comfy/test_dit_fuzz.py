"""Hidden from nothing (issue #19): each DiT layout the loader reads, its module names renamed the ways
trainers are known to vary them (prefix present or absent or another trainer's, ``.default`` adapter
names, lora_A / lora_down / lora.down spellings, dots or underscores, alpha or none), mixed within one
file, plus a few names no model has. The loader must match every real module to the right weight and
name every unmatched one in the report: never a silent partial load."""

from __future__ import annotations

import random

import comfy.sd
import comfy.utils
import pytest
import torch
from dit_files import CONVERTERS, FAMILIES, block_paths, factors, model_of, tensors
from patch_compare import assert_same, patched, write

from lora_foundry.lora_core.apply.stack import StackEntry
from lora_foundry.nodes.lora_apply import apply_entries, plan_entries

DOTTED = ("diffusion_model.", "transformer.", "", "model.diffusion_model.", "base_model.model.")
UNDERSCORED = ("lora_unet_", "lora_transformer_", "lycoris_")
SUFFIXES = (
    ("lora_A.weight", "lora_B.weight"),
    ("lora_down.weight", "lora_up.weight"),
    ("lora_A.default.weight", "lora_B.default.weight"),
    ("lora.down.weight", "lora.up.weight"),
)


def _base_layouts(family: str, model) -> dict[str, dict[str, tuple]]:
    """Layout -> {module path (no prefix): (A, B)}: ComfyUI's own paths, and diffusers' (its converter)."""
    f = factors(block_paths(model), seed=95)
    out = {"comfyui": f}
    if family in CONVERTERS:
        import diffusers.loaders.lora_conversion_utils as conversion

        converted = getattr(conversion, CONVERTERS[family])(
            dict(tensors({f"diffusion_model.{p}": ab for p, ab in f.items()}))
        )
        pairs: dict[str, dict] = {}
        for k, v in converted.items():
            module, _, suffix = k.removeprefix("transformer.").rpartition(".lora_")
            pairs.setdefault(module, {})[suffix] = v
        out["diffusers"] = {m: (s["A.weight"], s["B.weight"]) for m, s in pairs.items()}
    return out


def _renamed(paths: dict[str, tuple], rng: random.Random) -> tuple[dict, dict[str, str]]:
    """(file tensors, {file module name: canonical path}) with every module spelled at random."""
    out, names = {}, {}
    for path, (a, b) in paths.items():
        if rng.random() < 0.5:
            name = rng.choice(DOTTED) + path
        else:
            name = rng.choice(UNDERSCORED) + path.replace(".", "_")
        down, up = rng.choice(SUFFIXES)
        out |= {f"{name}.{down}": a, f"{name}.{up}": b}
        if down.startswith("lora_down") and rng.random() < 0.5:
            out[f"{name}.alpha"] = torch.tensor(float(a.shape[0]))  # alpha = rank: the same scale as none
        names[name] = path
    return out, names


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", FAMILIES)
def test_renamed_layouts_match_fully_or_name_what_did_not(family, loras_dir):
    model = model_of(family)
    rng = random.Random(f"fuzz-{family}")
    for layout, paths in _base_layouts(family, model).items():
        for round_ in range(3):
            file, names = _renamed(paths, rng)
            strangers = {f"lora_unet_no_such_block_{round_}_{i}" for i in range(rng.randint(0, 3))}
            for s in strangers:
                file |= {f"{s}.lora_down.weight": torch.zeros(2, 4), f"{s}.lora_up.weight": torch.zeros(4, 2)}
            name = write(loras_dir, f"fuzz_{family}_{layout}_{round_}.safetensors", file)
            report = plan_entries("Load LoRA", model, None, [StackEntry(name, 0.6, 1.0)]).plans[0].report
            assert set(report.unmatched) == strangers, (
                layout,
                round_,
                sorted(set(report.unmatched) - strangers)[:5],
            )
            assert report.total_matched == len(names), report.text()
            if strangers:
                assert f"NOT applied: {len(strangers)} modules" in report.text()
            # the right weights: as core loads the un-renamed layout
            reference = write(loras_dir, f"fuzz_{family}_{layout}_ref.safetensors",
                              tensors({f"{('diffusion_model.' if layout == 'comfyui' else 'transformer.')}{p}": ab
                                       for p, ab in paths.items()}))  # fmt: skip
            ours = apply_entries("Load LoRA", model, None, [StackEntry(name, 0.6, 1.0)])[0]
            if layout == "comfyui":
                sd = comfy.utils.load_torch_file(str(loras_dir / reference), safe_load=True)
                want = patched(comfy.sd.load_lora_for_models(model, None, sd, 0.6, 0)[0])
            else:  # core may not read the diffusers names (Wan): ours on them, checked in test_dit_layouts
                want = patched(apply_entries("Load LoRA", model, None, [StackEntry(reference, 0.6, 1.0)])[0])
            assert_same(patched(ours), want)
