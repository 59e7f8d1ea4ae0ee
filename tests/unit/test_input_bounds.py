"""Bounds on text inputs: block specs checked against the model's block count before anything is
built, LoRA Stack rows capped in count and bytes, and errors that name the input and the fix."""

import json

import pytest

from lora_foundry.lora_core.apply.block_weights import (
    MAX_SPEC_CHARS,
    SD_COUNTS,
    SDXL_COUNTS,
    BlockCounts,
    parse_block_weights,
)
from lora_foundry.lora_core.apply.stack import (
    MAX_ROWS,
    MAX_ROWS_BYTES,
    MAX_STACK_ENTRIES,
    read_rows,
    read_stack,
)
from lora_foundry.lora_core.train.network import parse_blocks


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "spec, counts, message",
    [
        (
            "in0-99999999999",
            SD_COUNTS,
            r"`blocks` entry 'IN0-99999999999': IN99999999\.\.\. .*input blocks are IN00-IN11",
        ),
        ("in0-" + "9" * 2000, SD_COUNTS, r"`blocks` entry .*input blocks are IN00-IN11"),
        ("mid, out0-9", SDXL_COUNTS, r"`blocks` entry 'OUT0-9': OUT9 .*output blocks are OUT00-OUT08"),
        ("in12", SD_COUNTS, r"IN12 is not a block of this model; its input blocks are IN00-IN11"),
        (
            "in1," * 1000,
            SD_COUNTS,
            rf"`blocks` is 4000 characters long; a block spec is at most {MAX_SPEC_CHARS}",
        ),
    ],
)
def test_block_ranges_outside_the_model_are_refused(spec, counts, message):
    with pytest.raises(ValueError, match=message):
        parse_blocks(spec, counts)


def test_block_ranges_inside_the_model_are_expanded_against_its_count():
    tiny = BlockCounts(input=4, middle=3, output=5)
    assert parse_blocks("in", tiny) == {"IN00", "IN01", "IN02", "IN03"}
    assert parse_blocks("out4-1, mid", tiny) == {"OUT01", "OUT02", "OUT03", "OUT04", "MID"}
    assert parse_blocks("in0-8", SDXL_COUNTS) == {f"IN{i:02d}" for i in range(9)}
    with pytest.raises(ValueError, match="IN00-IN03"):
        parse_blocks("in4", tiny)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "spec, counts, message",
    [
        ("IN99999999999=1", None, r"`block_weights` entry 'IN99999999999=1': .*input blocks are IN00-IN11"),
        (
            "in=1, OUT09=0",
            SDXL_COUNTS,
            r"OUT09 is not a block of this model; its output blocks are OUT00-OUT08",
        ),
        ("MID03=0.5", None, r"middle blocks are MID00-MID02"),
        ("in=1e999", None, r"'in=1e999' is not a finite number"),
        ("1,inf" + ",1" * 15, "SD1.x", r"'inf' is not a number"),
        ("in=" + "1" * 3000 + "x", None, r"`block_weights` is 3004 characters long"),
    ],
)
def test_block_weights_outside_the_model_are_refused(spec, counts, message):
    with pytest.raises(ValueError, match=message):
        parse_block_weights(spec, "SD1.x" if counts is None else None, counts)


def test_block_weights_inside_the_model_still_parse():
    bw = parse_block_weights("in=0.5, IN08=0.2, MID02=0, OUT08=1.5", counts=SDXL_COUNTS)
    assert bw.blocks == {"IN08": 0.2, "MID02": 0.0, "OUT08": 1.5} and bw.groups == {"IN": 0.5}


@pytest.mark.timeout(10)
def test_long_number_no_longer_backtracks():
    """The old value pattern took quadratic time on a long run of digits (8,000: about 1 s);
    within the length cap the parse is now immediate, a hang guard makes a regression fail."""
    for _ in range(200):
        with pytest.raises(ValueError, match="cannot read"):
            parse_block_weights("in=" + "1" * (MAX_SPEC_CHARS - 4) + "x")


def rows_text(n, lora="a.safetensors", **extra):
    return json.dumps([{"lora": lora, "on": True, "strength_model": 0.5, **extra} for _ in range(n)])


def test_rows_are_capped_in_number():
    assert len(read_rows(rows_text(MAX_ROWS))) == MAX_ROWS
    with pytest.raises(
        ValueError, match=rf"rows_json has {MAX_ROWS + 1} rows; at most {MAX_ROWS}.*chain a second"
    ):
        read_rows(rows_text(MAX_ROWS + 1))


def test_rows_are_capped_in_bytes_before_parsing():
    big = json.dumps([{"lora": "x" * (MAX_ROWS_BYTES)}])
    with pytest.raises(
        ValueError, match=rf"rows_json is {len(big)} bytes; at most {MAX_ROWS_BYTES // 1024} KiB"
    ):
        read_rows(big)


@pytest.mark.parametrize(
    "text, message",
    [
        ("[" * 50_000 + "]" * 50_000, "not valid JSON"),  # deep nesting: RecursionError in the parser
        ("[" + "9" * 5000 + "]", "not valid JSON"),  # an integer past Python's 4300-digit limit
        ('[{"lora": "a", "strength_model": NaN}]', "finite numbers"),
        ('[{"lora": "a", "strength_clip": 1e999}]', "finite numbers"),
        ('[{"lora": "a", "block_weights": ["in", 1]}]', "block_weights must be a text"),
        ('[{"lora": "a", "block_weights": "' + "1," * MAX_SPEC_CHARS + '"}]', "block_weights must be a text"),
    ],
)
def test_hostile_rows_give_named_errors(text, message):
    with pytest.raises(ValueError, match=rf"rows_json.*{message}"):
        read_rows(text)


def test_stack_entries_are_capped_and_strengths_checked():
    items = [("a.safetensors", 1.0, 1.0)] * MAX_STACK_ENTRIES
    assert len(read_stack(items)) == MAX_STACK_ENTRIES
    with pytest.raises(
        ValueError, match=rf"has {MAX_STACK_ENTRIES + 1} entries; at most {MAX_STACK_ENTRIES}"
    ):
        read_stack(items + [("b.safetensors", 1.0, 1.0)])
    with pytest.raises(ValueError, match="LORA_STACK entry 1: strengths must be finite numbers"):
        read_stack([("a", 1, 1), ("b", float("nan"), 1)])
