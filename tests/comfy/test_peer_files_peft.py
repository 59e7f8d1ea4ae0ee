"""LoRA files written by PEFT / diffusers (LoRA with rsLoRA and alpha, OFT, DoRA; saved files
and folders), loaded with Load LoRA.

The PEFT models wrap tiny diffusers / transformers models holding the very weights of the tiny
ComfyUI SD1.5 model (tests/peer_models.py, the ``peer`` fixture), so three answers can be
compared: ours, ComfyUI core's, and PEFT's own merged weight. LyCORIS files:
test_peer_files_lycoris.py.
"""

from __future__ import annotations

import copy
import json
import re

import comfy.sd
import peer_models
import pytest
import torch
from patch_compare import assert_same, matched_count, patched, run_ours
from safetensors.torch import load_file, save_file

peft = pytest.importorskip("peft")

PEFT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def random_peft_lora(peer, config, seed: int):
    """A PeftModel around a copy of the peer UNet with random LoRA A and B (PEFT starts B at zero)
    and, for DoRA, magnitudes moved off the weight's row norms PEFT starts them at."""
    model = peft.get_peft_model(copy.deepcopy(peer[0]), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(torch.rand(p.shape, generator=g) * 0.4 + 0.8)
            elif ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


@pytest.fixture(scope="module")
def peft_unet(peer):
    """LoRA on attention."""
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=PEFT_TARGETS, init_lora_weights=False)
    return random_peft_lora(peer, config, 21)


def peft_to_kohya(sd: dict[str, torch.Tensor], prefix: str, rank: int) -> dict[str, torch.Tensor]:
    """The same factors under kohya names, which core reads for every UNet layer."""
    out = {}
    for key, t in sd.items():
        path, ab = re.fullmatch(re.escape(prefix) + r"(.*)\.lora_([AB])\.weight", key).groups()
        name = "lora_unet_" + path.replace(".", "_")
        out[f"{name}.lora_{'down' if ab == 'A' else 'up'}.weight"] = t
        out[f"{name}.alpha"] = torch.tensor(float(rank))
    return out


def peft_truth(models, peft_model) -> dict[str, torch.Tensor]:
    """ComfyUI key -> weight after PEFT's own merge_and_unload, for the weights LoRA touches."""
    merged = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    umap = peer_models.unet_key_to_comfy(models)
    return {
        umap[k]: v.float() for k, v in merged.items() if k.endswith(".weight") and k.split(".")[-2] in
        ("to_q", "to_k", "to_v", "0") and ".attn" in k
    }  # fmt: skip


@pytest.mark.parametrize("layout", ["diffusers", "peft"])
def test_peft_unet_lora_equal_core_on_kohya_names_and_peft_merge(sd15, peft_unet, loras_dir, layout):
    from diffusers import StableDiffusionPipeline

    sd = peft.get_peft_model_state_dict(peft_unet)  # keys "base_model.model.<path>.lora_A.weight"
    assert sd and all(k.startswith("base_model.model.") for k in sd)
    n_modules = len(sd) // 2
    if layout == "diffusers":
        unet_sd = {k[len("base_model.model.") :]: v for k, v in sd.items()}
        folder = loras_dir / "diffusers_peft"
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=unet_sd, safe_serialization=True)
        name, prefix = "diffusers_peft/pytorch_lora_weights.safetensors", "unet."
    else:
        name, prefix = "peft_raw.safetensors", "base_model.model."
        save_file({k: v.contiguous() for k, v in sd.items()}, str(loras_dir / name))
    written = load_file(loras_dir / name)
    assert all(k.startswith(prefix) for k in written)

    m, c, report = run_ours(sd15, name, 0.8, -0.6)
    assert "NOT applied" not in report, report
    assert matched_count(report) == n_modules == len(m.patches) and not c.patcher.patches
    core, _ = comfy.sd.load_lora_for_models(sd15.model, None, peft_to_kohya(written, prefix, 4), 0.8, 0)
    assert_same(patched(m), patched(core))

    m1, _, _ = run_ours(sd15, name, 1.0, 1.0)
    assert_same(patched(m1), peft_truth(sd15, peft_unet))


@pytest.mark.parametrize("rslora", [False, True])
def test_diffusers_header_alpha_scales_as_diffusers_loads(sd15, peer, loras_dir, rslora):
    """A diffusers file whose header carries its PEFT config (lora_alpha 8 at rank 4, to_v at 2 by
    alpha_pattern, rsLoRA or not) equals PEFT's merge; core ignores the header (scale 1)."""
    from diffusers import StableDiffusionPipeline

    config = peft.LoraConfig(r=4, lora_alpha=8, alpha_pattern={"to_v": 2}, use_rslora=rslora,
                             target_modules=PEFT_TARGETS, init_lora_weights=False)  # fmt: skip
    model = random_peft_lora(peer, config, 24)
    unet_sd = {k[len("base_model.model.") :]: v for k, v in peft.get_peft_model_state_dict(model).items()}
    folder = loras_dir / f"diffusers_alpha_{rslora}"
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=unet_sd, unet_lora_adapter_metadata=config.to_dict(), safe_serialization=True
    )
    name = f"diffusers_alpha_{rslora}/pytorch_lora_weights.safetensors"
    m, _, report = run_ours(sd15, name, 1.0, 1.0)
    assert f"{len(unet_sd) // 2} modules scaled by the lora_alpha" in report, report
    truth = peft_truth(sd15, model)
    assert_same(patched(m), truth)
    core, _ = comfy.sd.load_lora_for_models(
        sd15.model, None, peft_to_kohya(load_file(loras_dir / name), "unet.", 4), 1.0, 0
    )
    assert any((patched(core)[k] - v).abs().max() > 1e-3 for k, v in truth.items())


def test_peft_saved_folder_takes_alpha_from_its_adapter_config(sd15, peer, loras_dir):
    """A folder PEFT's save_pretrained wrote (adapter_model.safetensors + adapter_config.json,
    lora_alpha 8 at rank 4): equal to PEFT's merge; an edited config is read again; a broken one
    leaves the file at scale 1, as core reads it."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=PEFT_TARGETS, init_lora_weights=False)
    model = random_peft_lora(peer, config, 25)
    folder = loras_dir / "peft_folder"
    model.save_pretrained(folder, safe_serialization=True)
    name = "peft_folder/adapter_model.safetensors"
    m, _, report = run_ours(sd15, name, 1.0, 1.0)
    assert "adapter_config.json beside the file" in report, report
    assert_same(patched(m), peft_truth(sd15, model))

    written = load_file(loras_dir / name)
    at_scale_1, _ = comfy.sd.load_lora_for_models(
        sd15.model, None, peft_to_kohya(written, "base_model.model.", 4), 1.0, 0
    )
    settings = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(settings | {"lora_alpha": 4}))
    assert_same(patched(run_ours(sd15, name, 1.0, 1.0)[0]), patched(at_scale_1))
    (folder / "adapter_config.json").write_text("{broken")
    m, _, report = run_ours(sd15, name, 1.0, 1.0)
    assert "adapter_config" not in report
    assert_same(patched(m), patched(at_scale_1))


# --- PEFT OFT (v2) ---------------------------------------------------------------------------

PEFT_OFT_TARGETS = [*PEFT_TARGETS, "conv1"]  # attention linears and the resnets' 3x3 convs


@pytest.fixture(scope="module", params=[False, True], ids=["per_block", "block_share"])
def peft_oft_unet(peer, request):
    """A PeftModel around a copy of the peer UNet, PEFT OFT (blocks of 4) with random rotations."""
    config = peft.OFTConfig(r=0, oft_block_size=4, target_modules=PEFT_OFT_TARGETS, block_share=request.param)
    model = peft.get_peft_model(copy.deepcopy(peer[0]), config)
    g = torch.Generator().manual_seed(22)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".oft_R." in name:  # PEFT starts from the identity (zeros)
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def peft_file_equals_its_merge(
    models, peft_model, loras_dir, name: str, layout: str, marker: str, label: str
):
    """Saves a PeftModel's adapter under PEFT (``base_model.model.``) or diffusers (``unet.``) names
    and loads it with Load LoRA: PEFT's own merge_and_unload at strength 1, W + s (merged - W) at
    s = 0.4, on every module holding ``marker`` (linear and conv layers both among them)."""
    sd = peft.get_peft_model_state_dict(peft_model)
    markers = [k for k in sd if marker in k]
    assert markers and all(k.startswith("base_model.model.") for k in sd)
    prefix = "base_model.model." if layout == "peft" else "unet."
    written = {prefix + k[len("base_model.model.") :]: v.contiguous() for k, v in sd.items()}
    save_file(written, str(loras_dir / name))

    merged = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    umap = peer_models.unet_key_to_comfy(models)
    touched = {k[len("base_model.model.") :].split(marker)[0] + ".weight" for k in markers}
    truth = {umap[k]: merged[k].float() for k in touched}
    assert any(t.dim() == 4 for t in truth.values()) and any(t.dim() == 2 for t in truth.values())

    m, c, report = run_ours(models, name, 1.0, 1.0)
    assert label in report and "NOT applied" not in report, report
    assert matched_count(report) == len(markers) == len(m.patches) and not c.patcher.patches
    assert_same(patched(m), truth)

    base = models.model.model.state_dict()
    part, _, _ = run_ours(models, name, 0.4, 0.0)
    assert_same(patched(part), {k: base[k].float() + 0.4 * (v - base[k].float()) for k, v in truth.items()})
    return sd


@pytest.mark.parametrize("layout", ["peft", "diffusers"])
def test_peft_oft_equals_peft_merge(sd15, peft_oft_unet, loras_dir, layout, request):
    """PEFT's OFT file (``oft_R``), which core 0.3.75 does not read."""
    name = f"peft_oft_{request.node.callspec.id}.safetensors"
    sd = peft_file_equals_its_merge(sd15, peft_oft_unet, loras_dir, name, layout, ".oft_R.weight", "PEFT OFT")
    assert all(k.endswith(".oft_R.weight") for k in sd)


# --- PEFT DoRA ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def peft_dora_unet(peer):
    """DoRA on attention linears and 3x3 convs."""
    config = peft.LoraConfig(
        r=4, lora_alpha=4, use_dora=True, target_modules=PEFT_OFT_TARGETS, init_lora_weights=False
    )
    return random_peft_lora(peer, config, 23)


@pytest.mark.parametrize("layout", ["peft", "diffusers"])
def test_peft_dora_equals_peft_merge(sd15, peft_dora_unet, loras_dir, layout):
    """PEFT's DoRA (``lora_magnitude_vector``), which core 0.3.75 drops (it applies the plain LoRA part)."""
    name = f"peft_dora_{layout}.safetensors"
    marker = ".lora_magnitude_vector"
    sd = peft_file_equals_its_merge(sd15, peft_dora_unet, loras_dir, name, layout, marker, "(DoRA), rank 4")
    assert len(sd) == 3 * sum(marker in k for k in sd)  # A, B and the magnitude of each module
