"""Hostile LoRA files (issue #14): nothing in a file hangs, exhausts or crashes the loader.

Each case was first written against the old code and failed there (hung, raised a raw error, or
loaded silently); the comment on each test says how.
"""

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from hostile_lora import diffusers_lora, kohya, split_file, write, write_raw
from safetensors.torch import load_file

from lora_foundry.lora_core.apply import loader
from lora_foundry.lora_core.files import lorafile, metadata
from lora_foundry.lora_core.files.detect import FamilyGuess
from lora_foundry.lora_core.files.lorafile import LoraFileError, read_lora_file

BOMB = r"(\w+\.?)+!"  # exponential backtracking on any long dotted path
ATTN = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
UNKNOWN = FamilyGuess("unknown", "test")


# --- 1. alpha_pattern keys are never run as regular expressions ----------------------------


@pytest.mark.timeout(20)  # the old code compiled BOMB and ran it on every path: it never returned
def test_regex_bomb_in_diffusers_header_is_not_run(tmp_path):
    config = {"unet.lora_alpha": 8, "unet.alpha_pattern": {BOMB: 4, "to_v": 2}}
    p = write(
        tmp_path / "bomb.safetensors",
        diffusers_lora([f"{ATTN}.to_q", f"{ATTN}.to_v"]),
        {"lora_adapter_metadata": json.dumps(config)},
    )
    lora = loader._load(str(p))
    alphas = {n: a.alpha for n, a in lora.parsed.modules.items()}
    assert alphas == {f"unet.{ATTN}.to_q": 8.0, f"unet.{ATTN}.to_v": 2.0}
    note = next(n for n in lora.parsed.notes if "alpha_pattern" in n)
    assert repr(BOMB) in note and "regular expression" in note and "keep lora_alpha" in note


@pytest.mark.timeout(20)
def test_regex_bomb_in_adapter_config_is_not_run(tmp_path):
    sd = {
        f"base_model.model.{k.removeprefix('unet.')}": v for k, v in diffusers_lora([f"{ATTN}.to_q"]).items()
    }
    p = write(tmp_path / "adapter_model.safetensors", sd)
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 6, "alpha_pattern": {BOMB: 1}}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    lora = loader._load(str(p))
    assert [a.alpha for a in lora.parsed.modules.values()] == [6.0]
    assert any(repr(BOMB) in n for n in lora.parsed.notes)


def test_alpha_pattern_keys_match_as_peft_matches_them():
    """The keys diffusers and PEFT write (module-path suffixes), and the simple wildcards people
    add by hand, pick the same alpha as PEFT's own rule (peft.utils.other.get_pattern_key: the
    first key for which ``re.match(rf"(.*\\.)?({key})$", path)`` succeeds), run here on these
    trusted keys; the installed peft is checked to still use that rule (importing it takes 10 s)."""
    peft_rule = 'match = re.match(rf"(.*\\.)?({key})$", key_to_match)'
    assert (
        peft_rule in (Path(importlib.util.find_spec("peft").origin).parent / "utils" / "other.py").read_text()
    )

    def get_pattern_key(keys, path):
        return next((k for k in keys if re.match(rf"(.*\.)?({k})$", path)), path)

    from lora_foundry.lora_core.files.metadata import _number
    from lora_foundry.lora_core.files.peft_patterns import read_alpha_pattern

    pattern = {
        "down_blocks.0.attentions.0.proj_in": 3,
        "to_v": 5,
        "^mid_block.*to_q": 7,
        "up_blocks.*attn2.to_out.0": 11,
        "attn1.to_k$": 13,
        "transformer_blocks.0.ff.net.2": 17,
    }
    paths = [
        "down_blocks.0.attentions.0.proj_in",
        "down_blocks.1.attentions.0.proj_in",
        f"{ATTN}.to_v",
        f"{ATTN}.to_k",
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
        "x.mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
        "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_out.0",
        "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_out.0",
        "down_blocks.2.attentions.1.transformer_blocks.0.ff.net.2",
        "not_to_v",
        "to_v",
    ]
    read = read_alpha_pattern(pattern, _number)
    assert read.skipped == ()
    for path in paths:
        key = get_pattern_key(pattern.keys(), path)
        expected = float(pattern[key]) if key in pattern else None
        assert read.alpha_for(path) == expected, path


def test_an_alpha_that_overflows_is_not_taken():
    config = {"unet.lora_alpha": 1e308, "unet.use_rslora": True}
    read = metadata.diffusers_alphas({"lora_adapter_metadata": json.dumps(config)}, {"unet.a.to_q": 16})
    assert read.alphas == {}  # 1e308 * sqrt(16) is inf: the module keeps scale 1, as without a config


# --- 2. header metadata: only what the pack reads, each value and the sum capped -------------


def test_huge_header_values_are_dropped_with_a_note(tmp_path):
    # The old reader kept every value: a 65 MB header cost ~450 MB per cached file.
    huge_tags = json.dumps({"ds": {"x" * (metadata.MAX_TAG_VALUE + 10): 1}})
    meta = {"ss_tag_frequency": huge_tags, "junk": "y" * 20_000_000, "ss_network_dim": "2"}
    p = write(tmp_path / "fat.safetensors", kohya(), meta)
    f = read_lora_file(p)
    assert f.metadata == {"ss_network_dim": "2"}
    assert len(f.notes) == 1 and "'ss_tag_frequency'" in f.notes[0] and "ignored" in f.notes[0]
    lora = loader._load(str(p))
    assert lora.triggers == () and f.notes[0] in lora.parsed.notes
    tensor_bytes = sum(t.numel() * t.element_size() for t in kohya().values())
    assert lora.nbytes == tensor_bytes + len("2")  # what the cache holds of it: no header text


def test_metadata_kept_is_what_the_pack_reads_within_the_caps(monkeypatch):
    monkeypatch.setattr(metadata, "MAX_TOTAL", 60)  # characters of keys and values
    raw = {
        "ss_a": "1234",  # 8
        "modelspec.title": "abcd",  # 19
        "lora_adapter_metadata": "{}",  # 23
        "ss_b": "1234567",  # 11: would pass the total of 60
        "other": "x",
        "ss_nested": [[["deep"]]],
        "ss_num": 3,  # 7
    }
    read = metadata.bounded_metadata(raw)
    assert read.kept == {
        "ss_a": "1234",
        "modelspec.title": "abcd",
        "lora_adapter_metadata": "{}",
        "ss_num": "3",
    }
    assert read.dropped == (("ss_b", 7),)
    monkeypatch.setattr(metadata, "MAX_KEYS", 2)
    assert list(metadata.bounded_metadata(raw).kept) == ["ss_a", "modelspec.title"]


def test_a_header_of_many_small_keys_keeps_a_few(tmp_path):
    meta = {f"ss_k{i}": "v" for i in range(metadata.MAX_KEYS + 500)}
    f = read_lora_file(write(tmp_path / "keys.safetensors", kohya(), meta))
    assert len(f.metadata) == metadata.MAX_KEYS and set(f.metadata) <= set(meta)  # header order: the writer's
    assert len(f.notes) == 4 and f.notes[-1] == "... and 497 more header metadata keys ignored"


def test_trigger_words_equal_a_full_sort():
    counts = {f"Tag{i % 40}" if i % 3 else f"tag{i % 40}": (i * 7919) % 13 for i in range(400)}
    meta = {
        "ss_tag_frequency": json.dumps({"a": counts, "b": {"tag1": 5}}),
        "modelspec.trigger_phrase": "TAG3, x",
    }
    total: dict[str, int] = {}
    for tags in ({k: v for k, v in counts.items()}, {"tag1": 5}):
        for k, v in tags.items():
            total[k] = total.get(k, 0) + v
    ranked = ["TAG3", "x"] + sorted(total, key=lambda k: -total[k])  # sorted() is stable on ties
    seen, expected = set(), []
    for w in ranked:
        if w.lower() not in seen:
            seen.add(w.lower())
            expected.append(w)
    for limit in (0, 1, 5, 30, 100):
        assert metadata.trigger_words(meta, limit) == expected[:limit]


# --- 3. deeply nested JSON -------------------------------------------------------------------


def test_deeply_nested_header_is_a_named_error(tmp_path):
    header, data = split_file(kohya())
    text = json.dumps(header)[:-1] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}"
    p = write_raw(tmp_path / "deep.safetensors", text, data)
    # old code: a raw RecursionError
    with pytest.raises(LoraFileError, match=r"deep\.safetensors.*nested too deeply.*download the file again"):
        loader._load(str(p))


def test_nested_json_inside_header_values_and_config_is_ignored(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    meta = {"ss_tag_frequency": deep, "lora_adapter_metadata": deep}
    p = write(tmp_path / "adapter_model.safetensors", kohya(), meta)
    (tmp_path / "adapter_config.json").write_text(deep)
    lora = loader._load(str(p))
    assert lora.triggers == () and set(lora.parsed.modules) == {"lora_unet_a"}


# --- 4. rank 0 -------------------------------------------------------------------------------


RANK0 = {
    "LoRA": {**kohya(rank=0), "lora_unet_a.alpha": torch.tensor(1.0)},
    "LoHa": {"lora_unet_a.hada_w1_a": torch.ones(4, 0), "lora_unet_a.hada_w1_b": torch.ones(0, 3),
             "lora_unet_a.hada_w2_a": torch.ones(4, 0), "lora_unet_a.hada_w2_b": torch.ones(0, 3),
             "lora_unet_a.alpha": torch.tensor(1.0)},
    "LoKr": {"lora_unet_a.lokr_w1": torch.ones(2, 1), "lora_unet_a.lokr_w2_a": torch.ones(2, 0),
             "lora_unet_a.lokr_w2_b": torch.ones(0, 3), "lora_unet_a.alpha": torch.tensor(1.0)},
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(RANK0))
def test_rank_zero_is_refused_by_name(tmp_path, kind):
    # old code: loaded, then ZeroDivisionError (alpha / rank) when ComfyUI applied the patch
    p = write(tmp_path / f"r0_{kind}.safetensors", RANK0[kind])
    with pytest.raises(LoraFileError, match=rf"r0_{kind}\.safetensors: module 'lora_unet_a' has rank 0"):
        loader._load(str(p))


# --- 5. non-float factors --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.uint8, torch.int64])
def test_non_float_factors_are_refused_by_name(tmp_path, dtype):
    p = write(tmp_path / "ints.safetensors", kohya(dtype=dtype))
    name = str(dtype).removeprefix("torch.")
    # old code: loaded silently, the integers read as weights
    with pytest.raises(
        LoraFileError, match=rf"ints\.safetensors: tensor 'lora_unet_a\.lora_(up|down)\.weight' is {name}"
    ):
        loader._load(str(p))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.float16])
def test_integer_alpha_and_float8_factors_still_load(tmp_path, dtype):
    sd = {**kohya(rank=2), "lora_unet_a.alpha": torch.tensor(8, dtype=dtype)}
    sd["lora_unet_a.lora_up.weight"] = sd["lora_unet_a.lora_up.weight"].to(torch.float8_e4m3fn)
    p = write(tmp_path / "ok.safetensors", sd)
    a = loader._load(str(p)).parsed.modules["lora_unet_a"]
    assert a.alpha == 8.0 and a.up.dtype == torch.float8_e4m3fn


# --- 8. errors from a file are LoraFileErrors naming it --------------------------------------


def test_file_gone_or_unreadable_is_a_named_error(tmp_path, monkeypatch):
    cache = loader._LoraCache()
    # old code: a raw FileNotFoundError from os.stat
    with pytest.raises(LoraFileError, match=r"gone\.safetensors: cannot be read"):
        cache.get(str(tmp_path / "gone.safetensors"))
    p = write(tmp_path / "locked.safetensors", kohya())

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(lorafile, "open", refuse, raising=False)
    with pytest.raises(LoraFileError, match=r"locked\.safetensors: could not be read \(Permission denied\)"):
        read_lora_file(p)


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}, "dtype 'C64'"),
        ({"dtype": "F32", "shape": [-1, 2], "data_offsets": [0, 8]}, "not the non-negative integers"),
        ({"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]}, "not the non-negative integers"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, "claims bytes 8..0"),
        ({"dtype": "F32", "shape": [0, 2**40], "data_offsets": [0, 0]}, "not the non-negative integers"),
    ],
)
def test_bad_header_entries_are_named(tmp_path, entry, message):
    p = write_raw(tmp_path / "odd.safetensors", json.dumps({"t": entry}), b"\0" * 8)
    with pytest.raises(LoraFileError, match=rf"odd\.safetensors.*'t'.*{message}|odd\.safetensors.*{message}"):
        read_lora_file(p)


def test_too_many_tensors_is_a_named_error(tmp_path, monkeypatch):
    monkeypatch.setattr(lorafile, "MAX_TENSORS", 3)
    p = write(tmp_path / "many.safetensors", {f"k{i}": torch.zeros(1) for i in range(4)})
    with pytest.raises(LoraFileError, match=r"many\.safetensors: the header lists more than 3 tensors"):
        read_lora_file(p)


def test_factors_that_do_not_fit_together_name_file_and_module(tmp_path):
    sd = {"lora_unet_a.lora_up.weight": torch.ones(4, 2), "lora_unet_a.lora_down.weight": torch.ones(3, 3)}
    # old code: a raw ValueError without the file's name
    with pytest.raises(LoraFileError, match=r"mis\.safetensors: module 'lora_unet_a': LoRA rank mismatch"):
        loader._load(str(write(tmp_path / "mis.safetensors", sd)))


@pytest.mark.parametrize(
    "sd, message",
    [
        ({"m.weight": torch.ones(4), "m.on_input": torch.zeros(0)}, "'m.on_input' should be one flag"),
        ({"img_in.lora_A.weight": torch.ones(2), "img_in.lora_B.weight": torch.tensor(1.0),
          "single_blocks.0.norm.key_norm.scale": torch.ones(2)}, "in a lora layout it has at least 2"),
        ({"x.lora_up.weight": torch.ones(4, 2), "x.lora_down.weight": torch.ones(2, 3),
          "x.reshape_weight": torch.tensor([4.5, 3.0])}, "'x.reshape_weight' should list the sizes"),
        ({"x.lora_up.weight": torch.ones(4, 2), "x.lora_down.weight": torch.ones(2, 3),
          "x.dora_scale": torch.tensor(2.0)}, "'x.dora_scale' has shape \\(\\)"),
    ],
)  # fmt: skip
def test_malformed_layouts_are_named(tmp_path, sd, message):
    # old code: IndexError (empty flag, 0-D factor, 0-D dora_scale) or a silent reshape of 4
    with pytest.raises(LoraFileError, match=rf"bad\.safetensors: .*{message}"):
        loader._load(str(write(tmp_path / "bad.safetensors", sd)))


def test_reader_equals_safetensors_on_every_dtype_and_misaligned_data(tmp_path):
    sd = {
        "f32": torch.randn(3, 5),
        "f16": torch.randn(7).half(),
        "bf16": torch.randn(2, 2, 3).bfloat16(),
        "f8": torch.randn(9).to(torch.float8_e5m2),
        "i64": torch.arange(5),
        "u8": torch.arange(3, dtype=torch.uint8),
        "b": torch.tensor([True, False]),
        "empty": torch.zeros(0, 4),
    }
    p = write(tmp_path / "all.safetensors", sd)
    ours, theirs = read_lora_file(p).tensors, load_file(str(p))
    assert set(ours) == set(theirs)
    for k in sd:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(
            ours[k].view(torch.uint8), theirs[k].view(torch.uint8)
        )
    # a float32 tensor starting at byte 2 of the data section (no writer aligns it so)
    values = torch.tensor([1.5, -2.0, 3.25])
    header = json.dumps({"pad": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                         "x": {"dtype": "F32", "shape": [3], "data_offsets": [2, 14]}})  # fmt: skip
    p = write_raw(tmp_path / "odd_offset.safetensors", header, b"\1\2" + values.numpy().tobytes())
    assert torch.equal(read_lora_file(p).tensors["x"], values)
