"""Reading files: good ones load, every kind of bad one gives a LoraFileError naming file and key."""

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from lora_foundry.lora_core.files.lorafile import LoraFileError, read_lora_file

SD = {"lora_unet_a.lora_up.weight": torch.ones(4, 2), "lora_unet_a.lora_down.weight": torch.ones(2, 3)}


def test_safetensors_with_metadata(tmp_path):
    p = tmp_path / "good.safetensors"
    save_file(SD, str(p), metadata={"ss_network_dim": "2"})
    f = read_lora_file(p)
    assert set(f.tensors) == set(SD) and f.metadata == {"ss_network_dim": "2"} and f.path == str(p)


def test_pt_weights_only(tmp_path):
    p = tmp_path / "good.pt"
    torch.save(SD, p)
    assert set(read_lora_file(p).tensors) == set(SD)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickle_with_code_is_refused(tmp_path):
    p = tmp_path / "evil.ckpt"
    torch.save({"a": _Evil()}, p)
    with pytest.raises(LoraFileError, match=r"evil\.ckpt.*refused.*safetensors"):
        read_lora_file(p)


def test_non_tensor_entry(tmp_path):
    p = tmp_path / "odd.pt"
    torch.save({"lora_unet_a.lora_up.weight": torch.ones(2), "epoch": 3}, p)
    with pytest.raises(LoraFileError, match=r"odd\.pt.*'epoch'.*not a tensor"):
        read_lora_file(p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad, word", [("nan", "NaN"), ("inf", "Inf"), ("-inf", "Inf")])
def test_nan_inf_named(tmp_path, bad, word, dtype):
    p = tmp_path / "diverged.safetensors"
    sd = dict(SD)
    sd["lora_unet_a.lora_down.weight"] = torch.tensor([[1.0, float(bad), 0.0]], dtype=dtype)
    save_file(sd, str(p))
    with pytest.raises(
        LoraFileError, match=rf"diverged\.safetensors.*lora_unet_a\.lora_down\.weight.*{word}"
    ):
        read_lora_file(p)


def test_empty_truncated_random(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file(SD, str(good))
    data = good.read_bytes()
    cases = {
        "empty.safetensors": (b"", "empty"),
        "short.safetensors": (b"abc", "too short"),
        "trunc.safetensors": (data[:-5], "truncated"),
        "noise.safetensors": (os.urandom(256), "not a valid safetensors"),
        "noise.pt": (os.urandom(256), "not a readable PyTorch file"),
        "empty.pt": (b"", "empty"),
    }
    for name, (content, msg) in cases.items():
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(LoraFileError, match=rf"{name.replace('.', '[.]')}.*{msg}"):
            read_lora_file(p)


def test_header_lying_about_sizes(tmp_path):
    header = {"k": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 16]}}
    raw = json.dumps(header).encode()
    p = tmp_path / "liar.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 16)
    with pytest.raises(LoraFileError, match=r"liar\.safetensors.*'k'.*64 bytes"):
        read_lora_file(p)


def test_other_extensions_and_missing(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"123")
    with pytest.raises(LoraFileError, match=r"x\.gguf.*unsupported file type"):
        read_lora_file(p)
    with pytest.raises(LoraFileError, match="no such file"):
        read_lora_file(tmp_path / "missing.safetensors")
    assert issubclass(LoraFileError, ValueError)
