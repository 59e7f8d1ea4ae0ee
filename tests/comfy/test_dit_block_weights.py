"""Block weights on DiT models: the readable form and the Inspire pack's Flux vector (its LoRA Block
Weight node, ltdrdata/ComfyUI-Inspire-Pack inspire/lora_block_weight.py: BASE, then one number per
double block, then per single block, in block order), with block counts read from the model.
Expected weights: core's full-strength patch, each block's change scaled by its weight here."""

from __future__ import annotations

import comfy.sd
import comfy.utils
import model_factory
import pytest
import torch
from patch_compare import patched, write

from lora_foundry.nodes.load_lora import LoadLoraModelOnly


def kohya_file(model, loras_dir, name: str, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.model.state_dict().items():
        if k.endswith(".weight") and v.ndim == 2 and "blocks." in k:
            n = "lora_unet_" + k[len("diffusion_model.") : -len(".weight")].replace(".", "_")
            out |= {f"{n}.lora_down.weight": torch.randn(2, v.shape[1], generator=g) * 0.1,
                    f"{n}.lora_up.weight": torch.randn(v.shape[0], 2, generator=g) * 0.1}  # fmt: skip
    return write(loras_dir, name, out)


def expected(model, loras_dir, name: str, weight_of) -> dict:
    sd = comfy.utils.load_torch_file(str(loras_dir / name), safe_load=True)
    full = patched(comfy.sd.load_lora_for_models(model, None, sd, 1.0, 0)[0])
    base = model.model.state_dict()
    return {k: base[k].float() + weight_of(k) * (w - base[k].float()) for k, w in full.items()}


def assert_close(ours: dict, want: dict) -> None:
    assert set(ours) == set(want) and ours
    for k in want:
        assert torch.allclose(ours[k], want[k], atol=1e-5), k


@pytest.fixture(scope="module")
def flux_full_depth():
    return model_factory.flux_model(depth=19, single=38)  # Flux.1's 19 double and 38 single blocks


def _flux_weight(key: str) -> float:
    if ".double_blocks." in key:
        return 0.5
    i = int(key.split(".single_blocks.")[1].split(".")[0])
    return 1.0 if i <= 10 else 0.0


def test_flux_readable_and_inspire_vector_mean_the_same(flux_full_depth, loras_dir):
    model = flux_full_depth
    name = kohya_file(model, loras_dir, "bw_flux.safetensors", 91)
    want = expected(model, loras_dir, name, _flux_weight)
    readable = LoadLoraModelOnly().execute(model, name, 1.0, "double=0.5, single0-10=1, single11-37=0")
    assert_close(patched(readable["result"][0]), want)
    vector = ",".join(["1"] + ["0.5"] * 19 + ["1"] * 11 + ["0"] * 27)  # 58 numbers
    inspire = LoadLoraModelOnly().execute(model, name, 1.0, vector)
    assert_close(patched(inspire["result"][0]), want)


def test_block_counts_come_from_the_model(loras_dir):
    """A 2-block Wan takes block0 / block1 and refuses block2, naming the blocks it has."""
    wan = model_factory.wan_model(layers=2)
    name = kohya_file(wan, loras_dir, "bw_wan.safetensors", 92)
    ours = LoadLoraModelOnly().execute(wan, name, 1.0, "block0=0, block1=0.25")
    want = expected(wan, loras_dir, name, lambda k: 0.0 if ".blocks.0." in k else 0.25)
    assert_close(patched(ours["result"][0]), want)
    with pytest.raises(RuntimeError, match=r"block2 is not a block of this model; its blocks are block0-1"):
        LoadLoraModelOnly().execute(wan, name, 1.0, "block2=1")
    with pytest.raises(RuntimeError, match=r"need 3 numbers"):
        LoadLoraModelOnly().execute(wan, name, 1.0, "1,0,0,0")


def test_sd3_joint_blocks(loras_dir):
    sd3 = model_factory.sd3_model(depth=2)
    name = kohya_file(sd3, loras_dir, "bw_sd3.safetensors", 93)
    ours = LoadLoraModelOnly().execute(sd3, name, 1.0, "joint=0.3, joint1=2")
    want = expected(sd3, loras_dir, name, lambda k: 2.0 if ".joint_blocks.1." in k else 0.3)
    assert_close(patched(ours["result"][0]), want)


@pytest.mark.parametrize(
    ("family", "spec", "container", "group"),
    [("flux2", "double=0.5, single1=0", "single_blocks", "single"),
     ("chroma", "double=0.5, single1=0", "single_blocks", "single"),
     ("zimage", "layer=0.5, layer1=0", "layers", "layer"),
     ("qwen_image", "block=0.5, block1=0", "transformer_blocks", "block")],
)  # fmt: skip
def test_other_dit_families(family, spec, container, group, loras_dir):
    """Each family's own block lists, by the group names the docs give; weights outside them (Z-Image's
    refiners, embedders) keep the default 1."""
    from dit_files import model_of

    model = model_of(family)
    name = kohya_file(model, loras_dir, f"bw_{family}.safetensors", 94)
    if family == "zimage":  # its blocks are "layers"; kohya_file takes "blocks." keys only
        g = torch.Generator().manual_seed(95)
        out = {}
        for k, v in model.model.state_dict().items():
            if k.endswith(".weight") and v.ndim == 2 and ("layers." in k or "refiner." in k):
                n = "lora_unet_" + k[len("diffusion_model.") : -len(".weight")].replace(".", "_")
                out |= {f"{n}.lora_down.weight": torch.randn(2, v.shape[1], generator=g) * 0.1,
                        f"{n}.lora_up.weight": torch.randn(v.shape[0], 2, generator=g) * 0.1}  # fmt: skip
        name = write(loras_dir, name, out)

    def weight_of(key: str) -> float:
        path = key.removeprefix("diffusion_model.")
        if not path.startswith(container + ".") and not path.startswith(("double_blocks.", "single_blocks.")):
            return 1.0
        if path.startswith(f"{container}.1."):
            return 0.0
        return 0.5 if group != "single" or path.startswith("double_blocks.") else 1.0

    ours = LoadLoraModelOnly().execute(model, name, 1.0, spec)
    assert_close(patched(ours["result"][0]), expected(model, loras_dir, name, weight_of))
