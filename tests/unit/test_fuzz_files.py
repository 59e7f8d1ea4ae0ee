"""Fuzzing what a LoRA file feeds the pack (issue #14): mutated files, random header JSON and
PEFT configs give a load or one of the pack's named errors, never anything else, and quickly.

Fixed budget and derandomized, so CI runs the same examples every time (~20 s on 2 busy cores). A
load that succeeds is also planned against the weights the unmutated file fits and its patches
applied: what passes the checks must be computable.
"""

from __future__ import annotations

import contextlib
import json
import re
import string
import struct
from datetime import timedelta

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from lora_foundry.lora_core.apply import loader
from lora_foundry.lora_core.apply.loader import LoraMismatchError, plan_lora
from lora_foundry.lora_core.apply.patching import apply_terms
from lora_foundry.lora_core.files.detect import FamilyGuess
from lora_foundry.lora_core.files.formats import _SUFFIXES, parse_lora
from lora_foundry.lora_core.files.layouts import convert_layout
from lora_foundry.lora_core.files.lorafile import LoraFileError, read_lora_file
from lora_foundry.lora_core.files.metadata import (
    adapter_config_alphas,
    diffusers_alphas,
    tag_frequency,
    trigger_words,
)
from lora_foundry.lora_core.files.peft_patterns import matches, read_key

FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=timedelta(seconds=3),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
NAMED = (LoraFileError, LoraMismatchError)
g = torch.Generator().manual_seed(0)


def r(*shape):
    return torch.randn(*shape, generator=g) * 0.1


# Small valid files, each with the weight shapes its modules fit (the "model" a load is planned on).
BASES = {
    "kohya": (
        {"lora_unet_a.lora_up.weight": r(4, 2), "lora_unet_a.lora_down.weight": r(2, 3),
         "lora_unet_a.alpha": torch.tensor(1.0), "lora_te_b.lora_up.weight": r(4, 2, 1, 1),
         "lora_te_b.lora_down.weight": r(2, 3, 1, 1), "lora_te_b.lora_mid.weight": r(2, 2, 3, 3)},
        {"ss_tag_frequency": json.dumps({"d": {"cat": 3, "dog": 1}}), "modelspec.trigger_phrase": "tok"},
        {"lora_unet_a": (4, 3), "lora_te_b": (4, 3, 3, 3)},
    ),
    "diffusers": (
        {"unet.x.to_q.lora_A.weight": r(2, 3), "unet.x.to_q.lora_B.weight": r(4, 2),
         "unet.x.to_v.lora_A.weight": r(2, 3), "unet.x.to_v.lora_B.weight": r(4, 2)},
        {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 4, "unet.alpha_pattern": {"to_v": 2}})},
        {"unet.x.to_q": (4, 3), "unet.x.to_v": (4, 3)},
    ),
    "lycoris": (
        {"lora_unet_h.hada_w1_a": r(4, 2), "lora_unet_h.hada_w1_b": r(2, 3), "lora_unet_h.hada_w2_a": r(4, 2),
         "lora_unet_h.hada_w2_b": r(2, 3), "lora_unet_h.alpha": torch.tensor(2),
         "lora_unet_k.lokr_w1": r(2, 2), "lora_unet_k.lokr_w2_a": r(2, 1), "lora_unet_k.lokr_w2_b": r(1, 3),
         "lora_unet_k.dora_scale": r(4, 1) + 1, "diffusion_model.n.diff": r(4), "diffusion_model.n.diff_b": r(4),
         "lora_unet_o.oft_blocks": r(2, 2, 2), "lora_unet_i.weight": r(3), "lora_unet_i.on_input": torch.tensor(1)},
        {"ss_network_dim": "2"},
        {"lora_unet_h": (4, 3), "lora_unet_k": (4, 6), "diffusion_model.n": (4,), "lora_unet_o": (4, 3),
         "lora_unet_i": (4, 3)},
    ),
    "flux_control": (
        {"img_in.lora_A.weight": r(2, 8), "img_in.lora_B.weight": r(4, 2), "img_in.lora_B.bias": r(4),
         "single_blocks.0.norm.key_norm.scale": r(4)},
        {},
        {"diffusion_model.img_in": (4, 4), "diffusion_model.single_blocks.0.norm.key_norm.scale": (4,)},
    ),
}  # fmt: skip
DTYPES = ["F32", "F16", "BF16", "F64", "I32", "I64", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "C64", "X"]
WIDTH = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I32": 4, "I64": 8, "I8": 1, "U8": 1, "BOOL": 1,
         "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


def split(tensors, meta):
    blob = save(tensors, metadata=meta or None)
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), bytearray(blob[8 + n :])


def divisors_shape(draw, nbytes: int, width: int) -> list[int]:
    """A shape whose bytes are exactly nbytes at this width (a retyped tensor that still passes
    the reader's size check, so the parser sees it), or any shape when none fits."""
    if nbytes % width:
        return draw(st.lists(st.integers(0, 9), max_size=4))
    numel = nbytes // width
    dims = []
    for _ in range(draw(st.integers(0, 3))):
        options = [d for d in range(1, numel + 1) if numel % d == 0]
        d = draw(st.sampled_from(options))
        dims.append(d)
        numel //= d
    return [*dims, numel] if numel != 1 or not dims else dims


@st.composite
def mutated_file(draw):
    base = draw(st.sampled_from(sorted(BASES)))
    tensors, meta, _ = BASES[base]
    header, data = split(tensors, meta)
    keys = [k for k in header if k != "__metadata__"]
    for _ in range(draw(st.integers(1, 3))):
        op = draw(
            st.sampled_from(["retype", "reshape", "rename", "drop", "entry", "metadata", "bytes", "cut"])
        )
        key = draw(st.sampled_from(keys))
        entry = header.get(key)
        if not (isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list)):
            entry = None  # an earlier step replaced it with random JSON
        if op == "retype" and entry is not None:
            dtype = draw(st.sampled_from(DTYPES))
            start, end = entry["data_offsets"]
            entry.update(dtype=dtype, shape=divisors_shape(draw, end - start, WIDTH.get(dtype, 1)))
        elif op == "reshape" and entry is not None and entry.get("dtype") in WIDTH:
            start, end = entry["data_offsets"]
            entry["shape"] = divisors_shape(draw, end - start, WIDTH[entry["dtype"]])
        elif op == "rename" and key in header:
            module = draw(st.sampled_from(["lora_unet_a", "lora_unet_h", "unet.x.to_v", "img_in", "m", ""]))
            header[module + draw(st.sampled_from(sorted(_SUFFIXES) + [".weight", ""]))] = header.pop(key)
        elif op == "drop":
            header.pop(key, None)
        elif op == "entry":
            header[key] = draw(JSON)
        elif op == "metadata":
            header["__metadata__"] = draw(st.dictionaries(st.sampled_from(
                ["ss_tag_frequency", "lora_adapter_metadata", "modelspec.trigger_phrase", "ss_network_dim", "x"]),
                st.text(max_size=30) | JSON.map(json.dumps), max_size=3))  # fmt: skip
        elif op == "bytes" and data:
            for _ in range(draw(st.integers(1, 8))):
                data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    raw = json.dumps(header).encode()
    blob = struct.pack("<Q", len(raw)) + raw + bytes(data)
    if draw(st.booleans()) and draw(st.booleans()):  # a quarter of the files cut or grown
        at = draw(st.integers(0, len(blob)))
        blob = blob[:at] + draw(st.binary(max_size=16))
    return base, blob


def check_load(path, base):
    """Read, convert, parse and load; then plan on the base's weights and apply every patch."""
    try:
        f = read_lora_file(path)
    except LoraFileError:
        f = None
    if f is not None:
        tensors, _ = convert_layout(f.tensors)
        with contextlib.suppress(LoraFileError):
            parse_lora(tensors, "fuzz")
    loader.CACHE._items.clear()
    try:
        lora = loader._load(str(path))
        shapes = {f"w.{m}.weight": s for m, s in BASES[base][2].items()}
        shapes |= {f"w.{m}.bias": s[:1] for m, s in BASES[base][2].items()}
        key_maps = {"unet": {m: f"w.{m}.weight" for m in BASES[base][2]}}
        plan = plan_lora(lora, key_maps, {"unet": 0.7}, FamilyGuess("unknown", "fuzz"), "", {"unet": shapes})
    except NAMED:
        return
    for target, terms in plan.patches["unet"].items():
        apply_terms(terms, torch.ones(shapes[target]))


@settings(FUZZ, max_examples=1500)
@given(mutated_file())
@pytest.mark.timeout(120)
def test_mutated_files_load_or_fail_by_name(tmp_path_factory, case):
    base, blob = case
    path = tmp_path_factory.getbasetemp() / "fuzz.safetensors"
    path.write_bytes(blob)
    check_load(path, base)


@settings(FUZZ, max_examples=60)
@given(st.binary(max_size=300))
@pytest.mark.timeout(60)
def test_random_bytes_fail_by_name(tmp_path_factory, blob):
    path = tmp_path_factory.getbasetemp() / "noise.safetensors"
    path.write_bytes(blob)
    with pytest.raises(LoraFileError):
        loader._load(str(path))


REGEXY = st.text(alphabet=string.ascii_lowercase[:4] + "._*^$+?()[]{}|\\w!-0", max_size=14)
PATHS = st.lists(st.text(alphabet="abcd_0", min_size=1, max_size=5), min_size=1, max_size=6).map(".".join)


@settings(FUZZ, max_examples=300)
@given(
    st.dictionaries(st.sampled_from(["unet.lora_alpha", "unet.alpha_pattern", "unet.use_rslora", "x"]),
                    JSON | st.dictionaries(REGEXY, JSON | st.floats(), max_size=6), max_size=4),
    st.dictionaries(PATHS.map("unet.".__add__), st.integers(1, 64), max_size=5),
)  # fmt: skip
@pytest.mark.timeout(60)
def test_header_configs_give_finite_alphas_quickly(config, ranks):
    for read in (
        diffusers_alphas({"lora_adapter_metadata": json.dumps(config)}, ranks),
        adapter_config_alphas(json.dumps({k.removeprefix("unet."): v for k, v in config.items()}),
                               {"base_model.model." + n[5:]: rank for n, rank in ranks.items()}),
    ):  # fmt: skip
        assert set(read.alphas) <= set(ranks) | {"base_model.model." + n[5:] for n in ranks}
        assert all(isinstance(a, float) and abs(a) < float("inf") for a in read.alphas.values())


@settings(FUZZ, max_examples=150)
@given(JSON, st.text(max_size=40))
@pytest.mark.timeout(60)
def test_tag_readers_never_raise(value, phrase):
    meta = {"ss_tag_frequency": json.dumps(value), "modelspec.trigger_phrase": phrase}
    counts = tag_frequency(meta)
    words = trigger_words(meta, 5)
    assert len(words) <= 5 and all(isinstance(n, (int, float)) for n in counts.values())


# The subset of pattern syntax the pack reads, as tokens: each renders to the key's text and to
# the regex that means the same on module paths ('.' a literal dot there), the oracle here.
TOKENS = st.sampled_from(
    [("a", "a"), ("b", "b"), ("_", "_"), ("0", "0"), (".", r"\."), (".*", ".*"), (r"\.", r"\.")]
)


@settings(FUZZ, max_examples=300)
@given(st.booleans(), st.lists(TOKENS, max_size=8), PATHS)
@pytest.mark.timeout(60)
def test_pattern_subset_matches_like_the_regex_it_stands_for(anchored, tokens, path):
    key = ("^" if anchored else "") + "".join(t for t, _ in tokens)
    oracle = ("^" if anchored else "") + "".join(rx for _, rx in tokens)
    read = read_key(key)
    assert read is not None
    assert matches(read, path) == bool(re.match(rf"(.*\.)?({oracle})$", path)), (key, path)
