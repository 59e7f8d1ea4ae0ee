"""A short, reproducible fuzz of the text inputs a graph controls: parse_blocks, parse_block_weights
and read_rows either succeed or raise a ValueError with a message; nothing else, and never a hang.

Fixed budget: derandomize=True (the same examples on every run) and max_examples sized so the
file runs in about 10-20 s here; a timeout guard turns a hang into a failure.
"""

import json
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_foundry.lora_core.apply.block_weights import (
    SD_COUNTS,
    SDXL_COUNTS,
    BlockCounts,
    parse_block_weights,
)
from lora_foundry.lora_core.apply.stack import StackEntry, read_rows
from lora_foundry.lora_core.train.network import parse_blocks

FUZZ = settings(
    derandomize=True,
    max_examples=1500,
    deadline=2000,  # ms per example: only a hang guard, the timeouts below bound the whole test
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    database=None,
)

# Pieces of real specs, so the examples reach deep into the parsers, not only their first check.
TOKENS = st.sampled_from(
    ["in", "out", "mid", "base", "default", "IN", "OUT04", "MID01", "in4-8", "out0-5", "in0-99999999999",
     "=", "=0.5", "=1e999", "=-1", ",", ", ", " ", "-", ":", "%", "1", "0.25", ".5", "e5", "nan", "inf",
     "ALL", "SD-INS", "SDXL-OUTALL", "MIDD:", "9" * 30, "\n", "\x00", "é"]
)  # fmt: skip
SPECS = st.one_of(
    st.lists(TOKENS, max_size=40).map("".join),
    st.text(alphabet=string.printable, max_size=200),
    st.text(max_size=60),
)
COUNTS = st.one_of(
    st.none(),
    st.sampled_from([SD_COUNTS, SDXL_COUNTS]),
    st.builds(BlockCounts, st.integers(0, 13), st.integers(0, 4), st.integers(0, 13)),
)


def named_error_or_success(call):
    try:
        return call()
    except ValueError as error:
        assert str(error).strip(), "a ValueError without a message"
        return None


@pytest.mark.timeout(60)
@FUZZ
@given(spec=SPECS, counts=COUNTS)
def test_parse_blocks(spec, counts):
    result = named_error_or_success(lambda: parse_blocks(spec, counts))
    if result is not None:
        limit = counts or SD_COUNTS
        assert len(result) <= limit.input + limit.output + 2  # every name a real block (+ MID, BASE)


@pytest.mark.timeout(60)
@FUZZ
@given(spec=SPECS, family=st.sampled_from([None, "SD1.x", "SDXL", "unknown", "Flux"]), counts=COUNTS)
def test_parse_block_weights(spec, family, counts):
    named_error_or_success(lambda: parse_block_weights(spec, family, counts))


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=30)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=15), inner, max_size=4)
    ),
    max_leaves=20,
)
ROW_KEYS = st.sampled_from(["lora", "on", "strength_model", "strength_clip", "block_weights", "extra"])
ROWS = st.lists(st.dictionaries(ROW_KEYS, JSON_VALUES, max_size=6), max_size=8)


@pytest.mark.timeout(60)
@settings(FUZZ, max_examples=400)  # nested JSON examples cost more to generate
@given(
    text=st.one_of(
        ROWS.map(json.dumps),
        JSON_VALUES.map(json.dumps),
        st.text(alphabet='[]{}",:0123456789.eE-+ truefalsnNaI', max_size=200),
    )
)
def test_read_rows(text):
    result = named_error_or_success(lambda: read_rows(text))
    if result is not None:
        assert all(isinstance(e, StackEntry) and isinstance(e.block_weights, str) for e in result)
