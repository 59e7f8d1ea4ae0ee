"""LoRA files of the DiT trainers (issue #19) on tiny models of each family ComfyUI runs: Wan, Z-Image,
Qwen-Image, Chroma, Flux.2, HiDream, LTX-Video. Every module of each file must match, and the weights
must equal what ComfyUI core loads from the file's core-readable twin: the same tensors under the names
core's key map holds (its ``diffusion_model.<path>`` names, or the source a peer converted from).

Where the names come from:
- kohya / musubi-tuner: ``lora_unet_`` + the module path with underscores, ``lora_down``/``lora_up`` and
  ``.alpha`` (musubi-tuner networks/lora.py; for Z-Image the diffusers paths, split to_q/to_k/to_v, as
  networks/convert_z_image_lora_to_comfy.py in kohya-ss/musubi-tuner reads them).
- ai-toolkit: ``diffusion_model.`` + the ComfyUI path, PEFT lora_A/lora_B (its ComfyUI-format save).
- diffusers / SimpleTuner: ``transformer.`` + diffusers paths, written here by diffusers itself: its
  converters (diffusers.loaders.lora_conversion_utils) turn the ComfyUI-named file into diffusers names,
  or PEFT's adapter on a tiny diffusers transformer is saved by the pipeline's ``save_lora_weights``.
- OneTrainer: ``lora_transformer_`` + the diffusers path with underscores; SimpleTuner LyCORIS:
  ``lycoris_`` + the same (ComfyUI's comfy/lora.py names both); DiffSynth-Studio: the bare diffusers path
  (ComfyUI 0.12's key map: "DiffSynth lora format").
"""

from __future__ import annotations

import pytest
import torch
from dit_files import (
    CONVERTERS,
    FAMILIES,
    block_paths,
    check,
    core_loads,
    core_map,
    factors,
    model_of,
    tensors,
)
from patch_compare import assert_same, patched, write

from lora_foundry.nodes.load_lora import LoadLoraModelOnly


@pytest.mark.parametrize("family", (*FAMILIES, "hunyuan_video15"))
def test_comfyui_path_layouts(family, loras_dir):
    """ai-toolkit (diffusion_model. PEFT), kohya / musubi-tuner (lora_unet_ with alpha) and bare paths."""
    model = model_of(family)
    f = factors(block_paths(model), seed=81)
    twin_peft = tensors({f"diffusion_model.{p}": ab for p, ab in f.items()})
    twin_kohya = tensors({f"diffusion_model.{p}": ab for p, ab in f.items()}, "kohya", alpha=2.0)
    check(model, loras_dir, family, twin_peft, twin_peft, "aitk", "ai-toolkit / ComfyUI-style")
    kohya = tensors({"lora_unet_" + p.replace(".", "_"): ab for p, ab in f.items()}, "kohya", alpha=2.0)
    check(model, loras_dir, family, kohya, twin_kohya, "kohya", "kohya-style (sd-scripts / musubi-tuner)")
    bare = tensors(dict(f.items()))
    check(model, loras_dir, family, bare, twin_peft, "bare", "DiffSynth-Studio")


def _diffusers_twin_of_converted(family: str, model):
    """(diffusers-named file made by diffusers' converter, the ComfyUI-named source it converted)."""
    import diffusers.loaders.lora_conversion_utils as conversion

    source = tensors({f"diffusion_model.{p}": ab for p, ab in factors(block_paths(model), seed=82).items()})
    converted = getattr(conversion, CONVERTERS[family])(dict(source))
    assert all(k.startswith("transformer.") for k in converted) and len(converted) >= len(source)
    return converted, source


def _diffusers_twin_of_peft(family: str, model, folder, header_alpha: bool = False):
    """(diffusers' own LoRA file from PEFT on a tiny diffusers model, the same tensors under core's names;
    with ``header_alpha`` the twin carries the header's alpha as .alpha keys, which core reads)."""
    import dit_peer
    from safetensors.torch import load_file

    cmap, sd = core_map(model), model.model.state_dict()

    def core_name(path):  # the name core's map gives this diffusers path, if any
        return next((p + path for p in ("transformer.", "diffusion_model.", "") if p + path in cmap), None)

    def shape(path):
        name = core_name(path)
        if name is None:
            return None
        target = cmap[name]
        key, offset = (target, None) if isinstance(target, str) else target[:2]
        return (offset[2] if offset else sd[key].shape[0], sd[key].shape[1]) if sd[key].ndim == 2 else None

    path, pairs = dit_peer.peft_lora_file(family, folder, shape, seed=83, header_alpha=header_alpha)
    assert len(pairs) >= 8, f"PEFT targeted only {sorted(pairs)}"
    named = {core_name(p): ab for p, ab in pairs.items()}
    twin = tensors(named, "kohya", alpha=2.0) if header_alpha else tensors(named)
    return load_file(str(path)), twin


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_layouts(family, loras_dir, tmp_path):
    """diffusers / SimpleTuner (transformer.), OneTrainer (lora_transformer_), SimpleTuner LyCORIS
    (lycoris_), musubi-tuner on diffusers paths (lora_unet_) and DiffSynth-Studio (bare) names."""
    model = model_of(family)
    if family in CONVERTERS:
        file, twin = _diffusers_twin_of_converted(family, model)
    else:
        file, twin = _diffusers_twin_of_peft(family, model, tmp_path)
    check(model, loras_dir, family, file, twin, "diffusers", "diffusers / SimpleTuner / ai-toolkit")
    by_module = {}
    for k, v in file.items():
        module, _, suffix = k.removeprefix("transformer.").rpartition(".lora_")
        by_module.setdefault(module, {})[suffix] = v
    pairs = {m: (s["A.weight"], s["B.weight"]) for m, s in by_module.items()}
    flat = {m.replace(".", "_"): ab for m, ab in pairs.items()}
    for prefix, expect in (("lora_transformer_", "OneTrainer"), ("lycoris_", "SimpleTuner LyCORIS"),
                           ("lora_unet_", "kohya-style (sd-scripts / musubi-tuner)")):  # fmt: skip
        renamed = tensors({prefix + m: ab for m, ab in flat.items()})
        check(model, loras_dir, family, renamed, twin, prefix.strip("_"), expect)
    check(model, loras_dir, family, tensors(pairs), twin, "diffsynth", "DiffSynth-Studio")


def test_musubi_hunyuan_video_15_split_qkv(loras_dir):
    """musubi-tuner's HunyuanVideo 1.5 model splits img_attn_qkv / txt_attn_qkv into _q, _k, _v (kohya-ss/
    musubi-tuner hunyuan_video_1_5_models.py splits ComfyUI's packed weights on load) and names the rest as
    diffusion-pipe does (img_attn_proj, img_mlp.fc1, img_mod.linear: ComfyUI's comfy/lora.py). Its twin:
    the q, k, v LoRAs fused exactly, as musubi-tuner's Z-Image converter fuses them (down stacked, up
    block-diagonal, alpha times 3)."""
    model = model_of("hunyuan_video15")
    sd = model.model.state_dict()
    g = torch.Generator().manual_seed(84)
    file, twin = {}, {}
    rank, alpha = 4, 2.0

    def pair(rows, cols):
        return torch.randn(rank, cols, generator=g) * 0.1, torch.randn(rows, rank, generator=g) * 0.1

    for i in range(2):
        for side in ("img", "txt"):
            qkv = sd[f"diffusion_model.double_blocks.{i}.{side}_attn.qkv.weight"]
            h = qkv.shape[0] // 3
            parts = {x: pair(h, qkv.shape[1]) for x in "qkv"}
            file |= tensors({f"lora_unet_double_blocks_{i}_{side}_attn_{x}": ab for x, ab in parts.items()},
                            "kohya", alpha)  # fmt: skip
            down = torch.cat([parts[x][0] for x in "qkv"])
            up = torch.block_diag(*[parts[x][1] for x in "qkv"])
            twin |= tensors(
                {f"diffusion_model.double_blocks.{i}.{side}_attn.qkv": (down, up)}, "kohya", 3 * alpha
            )
            for theirs, ours in (("attn_proj", "attn.proj"), ("mlp_fc1", "mlp.0"), ("mlp_fc2", "mlp.2"),
                                 ("mod_linear", "mod.lin")):  # fmt: skip
                w = sd[f"diffusion_model.double_blocks.{i}.{side}_{ours}.weight"]
                ab = pair(*w.shape)
                file |= tensors({f"lora_unet_double_blocks_{i}_{side}_{theirs}": ab}, "kohya", alpha)
                twin |= tensors({f"diffusion_model.double_blocks.{i}.{side}_{ours}": ab}, "kohya", alpha)
    meta = {"ss_network_module": "networks.lora_hv_1_5"}
    name = write(loras_dir, "hv15_musubi.safetensors", file, meta)
    twin_name = write(loras_dir, "hv15_musubi_twin.safetensors", twin)
    out = LoadLoraModelOnly().execute(model, name, 0.7)
    report = out["ui"]["text"][0]
    assert "matched: unet 28" in report and "NOT applied" not in report, report
    assert "layout: musubi-tuner HunyuanVideo 1.5 LoRA (lora_unet_ names)" in report, report
    assert_same(patched(out["result"][0]), patched(core_loads(model, loras_dir, twin_name, 0.7)))


@pytest.mark.parametrize("family", ("zimage", "chroma"))
def test_diffusers_header_alpha(family, loras_dir, tmp_path):
    """diffusers' file with the PEFT config in its header (lora_alpha 2, rank 4): scaled by 2/4 as diffusers
    loads it, equal to core on the twin with that alpha as .alpha keys (core alone ignores the header)."""
    from safetensors import safe_open

    model = model_of(family)
    file, twin = _diffusers_twin_of_peft(family, model, tmp_path, header_alpha=True)
    with safe_open(str(tmp_path / "pytorch_lora_weights.safetensors"), "pt") as f:
        metadata = f.metadata()
    assert "lora_adapter_metadata" in metadata
    name = write(loras_dir, f"{family}_header_alpha.safetensors", file, metadata)
    twin_name = write(loras_dir, f"{family}_header_alpha_twin.safetensors", twin)
    out = LoadLoraModelOnly().execute(model, name, 0.9)
    assert "scaled by the lora_alpha in the file's diffusers header" in out["ui"]["text"][0]
    assert_same(patched(out["result"][0]), patched(core_loads(model, loras_dir, twin_name, 0.9)))
