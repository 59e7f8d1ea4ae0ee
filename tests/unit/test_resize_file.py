"""Resize LoRA opens its source through the one loading path (issue #18): a whole-file layout is
renamed as Load LoRA renames it, and the file is read once."""

import pytest
import safetensors.torch
import torch

from lora_foundry.lora_core.apply import loader, opening
from lora_foundry.lora_core.merge.resize_file import resize_file


def wan_fun_file(path):
    """A Wan "Fun" LoRA: kohya names with a doubled underscore after lora_unet (rank 4)."""
    g = torch.Generator().manual_seed(5)
    tensors = {}
    for name in ("lora_unet__blocks_0_cross_attn_k", "lora_unet__blocks_0_cross_attn_q"):
        tensors[f"{name}.lora_down.weight"] = torch.randn(4, 12, generator=g)
        tensors[f"{name}.lora_up.weight"] = torch.randn(10, 4, generator=g)
        tensors[f"{name}.alpha"] = torch.tensor(4.0)
    safetensors.torch.save_file(tensors, str(path), metadata={"ss_network_dim": "4"})
    return tensors


@pytest.fixture(autouse=True)
def empty_cache():
    loader.CACHE._items.clear()
    yield
    loader.CACHE._items.clear()


def test_a_renamed_layout_is_resized_under_the_names_load_lora_gives_it(tmp_path):
    src = tmp_path / "fun.safetensors"
    original = wan_fun_file(src)
    result = resize_file(str(src), str(tmp_path), "small", "fixed", 2, dtype="fp32")
    written = safetensors.torch.load_file(result.path)
    # Expected names: the doubled underscore dropped, as ComfyUI's Wan Fun rename does.
    expected = {k.replace("lora_unet__", "lora_unet_", 1) for k in original}
    assert set(written) == expected
    assert written["lora_unet_blocks_0_cross_attn_k.lora_up.weight"].shape == (10, 2)


def test_the_source_is_read_once(tmp_path, monkeypatch):
    src = tmp_path / "fun.safetensors"
    wan_fun_file(src)
    reads = []
    real = opening.read_lora_file  # the one place a LoRA file is read for loading
    monkeypatch.setattr(opening, "read_lora_file", lambda path: reads.append(path) or real(path))
    result = resize_file(str(src), str(tmp_path), "small", "fixed", 2, dtype="fp32")
    assert reads == [str(src)]
    assert safetensors.safe_open(result.path, "pt").metadata()["ss_network_dim"] == "2"
