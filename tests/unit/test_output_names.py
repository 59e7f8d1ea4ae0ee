"""Output names: the byte limit leaves room for the longest file a node writes and its temp name
(proved by writing those files on disk), and control characters are refused, naming the input."""

import pytest
import torch

from lora_foundry.lora_core.files.atomic import NAME_MAX, temp_name
from lora_foundry.lora_core.files.savefile import SUFFIX, safe_output_name, save_lora
from lora_foundry.lora_core.train.state import LONGEST_SUFFIX, CheckpointPlan, write_state

MODULES = {"lora_unet_x": (torch.ones(4, 2), torch.ones(2, 3), 2.0)}


def longest_stem(suffix: str) -> int:
    """Found by search, not by the formula: the longest ASCII stem the check accepts."""
    n = 1
    while True:
        try:
            safe_output_name("a" * (n + 1), suffix)
        except ValueError:
            return n
        n += 1


def test_300_character_name_is_refused_with_the_input_and_the_fix():
    with pytest.raises(ValueError, match=r"`output_name` is 300 bytes long.*at most \d+ bytes.*Shorten"):
        safe_output_name("x" * 300)


def test_longest_accepted_merge_name_really_writes(tmp_path):
    n = longest_stem(SUFFIX)
    name = safe_output_name("m" * n)
    # the temp folder the writer makes is the longest name on disk, and it fits exactly
    assert len(temp_name(name).encode()) == NAME_MAX
    save_lora(tmp_path / name, MODULES, {})
    assert (tmp_path / name).exists()
    with pytest.raises(OSError):  # one byte more would not have been writable: the bound is tight
        (tmp_path / (temp_name(name) + "x")).mkdir()


def test_longest_accepted_run_name_writes_its_longest_state(tmp_path):
    n = longest_stem(LONGEST_SUFFIX)
    name = safe_output_name("r" * n, LONGEST_SUFFIX)[: -len(SUFFIX)]
    plan = CheckpointPlan(tmp_path / name, name)
    plan.folder.mkdir()
    stem = plan.stem(9_999_999_999)  # a 10-digit step: the longest name a run writes
    assert len(temp_name(f"{stem}.trainstate.json").encode()) == NAME_MAX
    write_state(plan.folder / stem, {"x": torch.zeros(1)}, {"step": 1})
    assert (plan.folder / f"{stem}.trainstate.json").exists()


def test_length_counts_utf8_bytes_not_characters():
    n = longest_stem(SUFFIX)
    wide = "é" * (n // 2)  # 2 bytes each: fits
    assert safe_output_name(wide) == wide + SUFFIX
    with pytest.raises(ValueError, match=f"is {2 * (n // 2 + 1)} bytes long"):
        safe_output_name("é" * (n // 2 + 1))


@pytest.mark.parametrize(
    "name",
    ["two\nlines", "tab\there", "nul\0", "bell\x07", "del\x7f", "c1\x85x", "sep\u2028x", "rtl\u202egpj.exe"],
)
def test_control_characters_are_refused(name):
    with pytest.raises(ValueError, match=r"`output_name` .*control character U\+[0-9A-F]{4}.*one line"):
        safe_output_name(name)


def test_a_huge_name_is_quoted_short_in_the_message():
    with pytest.raises(ValueError) as e:
        safe_output_name("a/" * 1_000_000)
    assert len(str(e.value)) < 400 and "2000000 characters" in str(e.value)


@pytest.mark.parametrize("name", ["emoji 🎨 style", "日本語", "a.b-c_d (v2)"])
def test_ordinary_names_still_pass(name):
    assert safe_output_name(name) == name + SUFFIX
