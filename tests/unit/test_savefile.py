"""Writing LoRA files: exact keys, dtypes, metadata, atomic and no silent overwrite."""

import hashlib
import json

import pytest
import safetensors
import safetensors.torch
import torch

from lora_foundry.lora_core.adapters import LoraAdapter
from lora_foundry.lora_core.files import savefile
from lora_foundry.lora_core.files.savefile import (
    MergeSource,
    addnet_hashes,
    kohya_metadata,
    safe_output_name,
    save_lora,
)

MODULES = {
    "lora_unet_mid_block_attentions_0_proj_in": LoraAdapter(torch.randn(8, 2), torch.randn(2, 6), 2.0),
    "lora_te_text_model_encoder_layers_0_mlp_fc1": (torch.randn(12, 2), torch.randn(2, 8), 1.0),
    "lora_unet_conv_in": LoraAdapter(torch.randn(4, 2, 1, 1), torch.randn(2, 3, 3, 3), 2.0),
}
META = {"ss_network_module": "networks.lora", "ss_network_dim": "2"}


def read(path):
    with safetensors.safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()  # noqa: SIM118 (not a dict)


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize(
    "dtype, expected", [("fp16", torch.float16), ("bf16", torch.bfloat16), (torch.float32, torch.float32)]
)
def test_round_trip_keys_dtypes_metadata(tmp_path, dtype, expected):
    path = save_lora(tmp_path / "out.safetensors", MODULES, META, dtype)
    tensors, meta = read(path)
    assert set(tensors) == {
        f"{n}.{k}" for n in MODULES for k in ("lora_up.weight", "lora_down.weight", "alpha")
    }
    assert all(t.dtype == expected for t in tensors.values())
    assert tensors["lora_unet_conv_in.lora_down.weight"].shape == (2, 3, 3, 3)
    assert tensors["lora_unet_mid_block_attentions_0_proj_in.alpha"].dim() == 0
    assert float(tensors["lora_unet_mid_block_attentions_0_proj_in.alpha"]) == 2.0
    up = MODULES["lora_unet_mid_block_attentions_0_proj_in"].up
    assert torch.equal(tensors["lora_unet_mid_block_attentions_0_proj_in.lora_up.weight"], up.to(expected))
    assert meta == META
    assert leftovers(tmp_path) == []


def test_non_contiguous_input_is_written(tmp_path):
    up = torch.randn(2, 8).T  # (8, 2), not contiguous
    path = save_lora(tmp_path / "t.safetensors", {"lora_unet_x": (up, torch.randn(2, 6), 2.0)}, {}, "fp32")
    assert torch.equal(read(path)[0]["lora_unet_x.lora_up.weight"], up)


def test_refuses_to_overwrite_and_leaves_file_untouched(tmp_path):
    path = tmp_path / "keep.safetensors"
    path.write_bytes(b"user data")
    with pytest.raises(FileExistsError, match=r"keep.safetensors already exists.*overwrite=True"):
        save_lora(path, MODULES, META, "fp16")
    assert path.read_bytes() == b"user data" and leftovers(tmp_path) == []
    save_lora(path, MODULES, META, "fp16", overwrite=True)
    assert set(read(path)[0]) and leftovers(tmp_path) == []


def test_target_created_meanwhile_is_not_clobbered(tmp_path, monkeypatch):
    path = tmp_path / "race.safetensors"
    real_save = safetensors.torch.save_file

    def save_then_race(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        path.write_bytes(b"other writer")  # appears after our existence check

    monkeypatch.setattr(savefile.safetensors.torch, "save_file", save_then_race)
    with pytest.raises(FileExistsError):
        save_lora(path, MODULES, META, "fp16")
    assert path.read_bytes() == b"other writer" and leftovers(tmp_path) == []


def test_failure_mid_write_leaves_no_temp_and_old_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "old.safetensors"
    path.write_bytes(b"previous version")

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(savefile.safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_lora(path, MODULES, META, "fp16", overwrite=True)
    assert path.read_bytes() == b"previous version" and leftovers(tmp_path) == []


def test_missing_folder_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_lora(tmp_path / "nope" / "x.safetensors", MODULES, META)


@pytest.mark.parametrize(
    "modules, meta, dtype, message",
    [
        (MODULES, {"ss_network_dim": 2}, "fp16", "'ss_network_dim' is int.*strings"),
        (MODULES, META, "int8", "dtype must be one of fp16, bf16, fp32"),
        ({"a.b": MODULES["lora_unet_conv_in"]}, META, "fp16", "not a kohya module name"),
        ({"x": (torch.zeros(4, 2), torch.zeros(3, 5), 1.0)}, META, "fp16", "do not chain"),
        ({"x": (torch.zeros(4, 2), torch.zeros(2, 5), float("nan"))}, META, "fp16", "finite"),
    ],
)
def test_bad_arguments(tmp_path, modules, meta, dtype, message):
    with pytest.raises(ValueError, match=message):
        save_lora(tmp_path / "bad.safetensors", modules, meta, dtype)
    assert list(tmp_path.iterdir()) == []


def test_hashes_match_the_kohya_definition(tmp_path):
    path = save_lora(tmp_path / "h.safetensors", MODULES, META, "fp16", add_hashes=True)
    tensors, meta = read(path)
    data = safetensors.torch.save(tensors, {k: v for k, v in meta.items() if k.startswith("ss_")})
    n = int.from_bytes(data[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + n :]).hexdigest()
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == addnet_hashes(tensors, META)
    assert len(meta["sshs_legacy_hash"]) == 8


@pytest.mark.parametrize(
    "name, expected",
    [("merged", "merged.safetensors"), ("a.SAFETENSORS", "a.SAFETENSORS"), (" x ", "x.safetensors")],
)
def test_safe_output_name(name, expected):
    assert safe_output_name(name) == expected


@pytest.mark.parametrize("name", ["", "..", "a/b", "a\\b", "../x", "x..y", "C:x", ".hidden"])
def test_safe_output_name_rejects(name):
    with pytest.raises(ValueError, match="`output_name`"):
        safe_output_name(name)


def test_kohya_metadata_keys():
    meta = kohya_metadata(
        network_dim=64,
        network_alpha=64.0,
        base_model_version="sd_v1",
        output_name="my_merge",
        v2=False,
        conv_dim=16,
        tag_frequency={"10_cat": {"cat": 10}},
        merged_from=[MergeSource("a.safetensors", 0.7), MergeSource("b.safetensors", -0.3, "ab12")],
        merge_method="svd",
        merge_rank=64,
        modelspec_architecture="stable-diffusion-v1/lora",
        timestamp=0.0,
    )
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("64", "64.0")
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": 16, "conv_alpha": 16}
    assert json.loads(meta["ss_tag_frequency"]) == {"10_cat": {"cat": 10}}
    record = json.loads(meta["lora_foundry.merge"])
    assert record["method"] == "svd" and record["rank"] == 64
    assert record["sources"][1] == {"name": "b.safetensors", "weight": -0.3, "sha256": "ab12"}
    assert meta["modelspec.merged_from"] == "a.safetensors, b.safetensors"
    assert meta["modelspec.date"].startswith("1970-01-01")


def test_kohya_metadata_minimum():
    assert kohya_metadata(network_dim=8, network_alpha=8) == {
        "ss_network_module": "networks.lora",
        "ss_network_dim": "8",
        "ss_network_alpha": "8",
    }
