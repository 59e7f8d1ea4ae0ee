"""Bad LoRA files through the Load LoRA node: each raises one clear error, never runs code,
never changes the user's file.

A clear error: a RuntimeError starting "[Load LoRA]" that names the file (and the key, where
one key is at fault) and says what to do about it.
"""

from __future__ import annotations

import json
import os
import random
import struct

import lora_factory as lf
import pytest
import torch
from patch_compare import modules, write

from lora_foundry.nodes.load_lora import LoadLora

ADVICE = ("download", "re-save", "get a", "pick", "use ", "put the file", "check the name", "must be")
TO_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def load(models, name):
    return LoadLora().execute(models.model, name, 1.0, 1.0, clip=models.clip)["result"]


def clear_error(models, name, *must_name: str) -> str:
    with pytest.raises(RuntimeError) as e:
        load(models, name)
    msg = str(e.value)
    assert msg.startswith("[Load LoRA]"), msg
    for part in (os.path.basename(name), *must_name):
        assert part in msg, f"{part!r} not in: {msg}"
    assert any(a in msg.lower() for a in ADVICE), f"no advice in: {msg}"
    return msg


def good_lora(models, seed=0) -> dict[str, torch.Tensor]:
    return lf.kohya_lora(lf.random_factors(modules(models), seed=seed))


def safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def test_truncated_file(sd15, loras_dir):
    write(loras_dir, "whole.safetensors", good_lora(sd15))
    raw = (loras_dir / "whole.safetensors").read_bytes()
    (loras_dir / "truncated.safetensors").write_bytes(raw[: len(raw) * 2 // 3])
    assert "truncated" in clear_error(sd15, "truncated.safetensors")


def test_random_bytes(sd15, loras_dir):
    (loras_dir / "noise.safetensors").write_bytes(random.Random(0).randbytes(4096))
    clear_error(sd15, "noise.safetensors")


def test_random_bytes_with_a_plausible_header_length(sd15, loras_dir):
    noise = random.Random(1).randbytes(4096)
    (loras_dir / "noise2.safetensors").write_bytes(struct.pack("<Q", 100) + noise)
    clear_error(sd15, "noise2.safetensors")


@pytest.mark.parametrize(
    "seed", [0, 2, 20, 195]
)  # the safe unpickler: UnpicklingError, IndexError, KeyError, ...
def test_random_bytes_as_pickle(sd15, loras_dir, seed):
    (loras_dir / f"noise_{seed}.pt").write_bytes(random.Random(seed).randbytes(256))
    assert "not a readable PyTorch file" in clear_error(sd15, f"noise_{seed}.pt")


def test_header_lies_about_offsets(sd15, loras_dir):
    key = f"{TO_Q}.lora_up.weight"
    header = {key: {"dtype": "F32", "shape": [32, 4], "data_offsets": [0, 512]}}
    (loras_dir / "lying_offsets.safetensors").write_bytes(safetensors_bytes(header, bytes(128)))
    clear_error(sd15, "lying_offsets.safetensors", key)


def test_header_lies_about_shape(sd15, loras_dir):
    key = f"{TO_Q}.lora_down.weight"
    header = {key: {"dtype": "F32", "shape": [4, 64], "data_offsets": [0, 512]}}  # 4*64*4 = 1024 bytes
    (loras_dir / "lying_shape.safetensors").write_bytes(safetensors_bytes(header, bytes(512)))
    clear_error(sd15, "lying_shape.safetensors", key)


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_tensor_names_the_key(sd15, loras_dir, bad):
    sd = good_lora(sd15, seed=1)
    key = f"{TO_Q}.lora_up.weight"
    sd[key] = sd[key].clone()
    sd[key][3, 1] = float(bad)
    name = write(loras_dir, f"{bad}.safetensors", sd)
    msg = clear_error(sd15, name, key)
    assert ("NaN" if bad == "nan" else "Inf") in msg


def test_tensor_that_does_not_fit_its_weight(sd15, loras_dir):
    sd = good_lora(sd15, seed=2)
    w = sd15.model.model.state_dict()[
        "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    ]
    sd[f"{TO_Q}.lora_down.weight"] = torch.randn(4, w.shape[1] + 16)  # wrong in-dim
    name = write(loras_dir, "wrong_in_dim.safetensors", sd)
    clear_error(sd15, name, TO_Q)


@pytest.mark.parametrize("part", ["blocks", "rescale"])
def test_butterfly_that_does_not_fit_its_weight(sd15, loras_dir, part):
    sd = lf.boft_lora(modules(sd15), seed=3)
    rows = sd[f"{TO_Q}.oft_blocks"].shape[1] * sd[f"{TO_Q}.oft_blocks"].shape[2]
    if part == "blocks":  # one block short of the weight's rows
        sd[f"{TO_Q}.oft_blocks"] = sd[f"{TO_Q}.oft_blocks"][:, 1:]
    else:
        sd[f"{TO_Q}.rescale"] = torch.ones(rows + 4, 1)
    name = write(loras_dir, f"bad_boft_{part}.safetensors", sd)
    assert "BOFT" in clear_error(sd15, name, TO_Q)


@pytest.mark.parametrize("part", ["blocks", "elements"])
def test_peft_oft_that_does_not_fit_its_weight(sd15, loras_dir, part):
    sd = lf.oftv2_lora(modules(sd15), seed=4)
    key = f"{TO_Q}.oft_R.weight"
    if part == "blocks":  # one block short of the weight's input columns
        sd[key] = sd[key][1:]
    else:  # 5 values are no block's strict upper triangle
        sd[key] = sd[key][:, :5].contiguous()
    name = write(loras_dir, f"bad_oftv2_{part}.safetensors", sd)
    assert "oft_R" in clear_error(sd15, name, TO_Q)


def test_peft_dora_magnitude_that_does_not_fit_its_weight(sd15, loras_dir):
    sd = good_lora(sd15, seed=5)
    rows = sd[f"{TO_Q}.lora_up.weight"].shape[0]
    sd[f"{TO_Q}.lora_magnitude_vector"] = torch.ones(rows + 8)
    name = write(loras_dir, "bad_peft_dora.safetensors", sd)
    assert "lora_magnitude_vector" in clear_error(sd15, name, TO_Q)


@pytest.mark.parametrize("ext", [".safetensors", ".pt"])
def test_empty_file(sd15, loras_dir, ext):
    (loras_dir / f"empty{ext}").write_bytes(b"")
    assert "empty" in clear_error(sd15, f"empty{ext}")


def test_safetensors_with_no_tensors(sd15, loras_dir):
    write(loras_dir, "no_tensors.safetensors", {}, {"ss_base_model_version": "sd_v1"})
    clear_error(sd15, "no_tensors.safetensors")


def test_only_unknown_keys(sd15, loras_dir):
    sd = {"model.layer.kernel": torch.randn(4, 4), "optimizer.step": torch.tensor(3.0)}
    name = write(loras_dir, "unknown_keys.safetensors", sd)
    msg = clear_error(sd15, name, "model.layer.kernel")
    assert "layout this pack reads" in msg and "another model" not in msg  # the file, not the model


def test_adapter_kind_nobody_reads_is_named_as_such(sd15, loras_dir):
    """A LyCORIS T-LoRA (q / p / lambda layers): neither this pack nor core applies it; the error
    says the layout is not read instead of blaming the base model."""
    sd = {f"{TO_Q}.q_layer.weight": torch.randn(4, 32), f"{TO_Q}.p_layer.weight": torch.randn(32, 4),
          f"{TO_Q}.lambda_layer": torch.ones(1, 4), f"{TO_Q}.alpha": torch.tensor(4.0)}  # fmt: skip
    name = write(loras_dir, "tlora.safetensors", sd)
    msg = clear_error(sd15, name, f"{TO_Q}.q_layer.weight")
    assert "layout this pack reads" in msg and "another model" not in msg


class RunsCode:
    """Pickles to a call of os.system: loading it unsafely would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused_and_does_not_run(sd15, loras_dir, tmp_path):
    marker = tmp_path / "code_ran"
    torch.save({f"{TO_Q}.lora_up.weight": torch.zeros(32, 4), "x": RunsCode(marker)}, loras_dir / "evil.pt")
    msg = clear_error(sd15, "evil.pt")
    assert "code" in msg and not marker.exists()


def test_pickle_without_tensors_is_refused(sd15, loras_dir):
    torch.save({"a": 1, "b": [2, 3]}, loras_dir / "not_tensors.pt")
    clear_error(sd15, "not_tensors.pt")


@pytest.mark.parametrize("name", ["lora.pkl", "lora.pt2", "notes.txt"])
def test_unsupported_extension(sd15, loras_dir, name):
    (loras_dir / name).write_bytes(b"\x80\x04K\x01.")  # a pickle of the int 1
    assert "unsupported" in clear_error(sd15, name)


def test_missing_file(sd15):
    clear_error(sd15, "no_such_lora.safetensors")


@pytest.mark.parametrize("broken", [False, True])
def test_users_file_is_untouched(sd15, loras_dir, broken):
    name = write(loras_dir, f"keep_{broken}.safetensors", good_lora(sd15, seed=3), {"ss_network_dim": "4"})
    path = loras_dir / name
    if broken:
        path.write_bytes(path.read_bytes()[:-100])
    os.utime(path, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    before, st = path.read_bytes(), path.stat()
    if broken:
        clear_error(sd15, name)
    else:
        load(sd15, name)
    after = path.stat()
    assert path.read_bytes() == before
    assert (after.st_mtime_ns, after.st_size, after.st_mode) == (st.st_mtime_ns, st.st_size, st.st_mode)
    assert sorted(p.name for p in loras_dir.iterdir() if p.name.startswith(f"keep_{broken}")) == [name]
