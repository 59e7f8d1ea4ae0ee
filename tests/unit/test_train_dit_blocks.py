"""DiT block specs (lora_core.train.dit_blocks): the family's own numbering, checked against counts."""

import pytest
from torch import nn

from lora_foundry.lora_core.train.dit_blocks import block_of, group_counts, in_blocks, parse_dit_blocks
from lora_foundry.lora_core.train.network import Target

FLUX = group_counts({"double_blocks": 19, "single_blocks": 38, "img_in": 0})


def test_counts_and_paths():
    assert FLUX == {"double": 19, "single": 38}
    assert block_of("diffusion_model.double_blocks.3.img_attn.qkv") == ("double", 3)
    assert block_of("diffusion_model.layers.12.attention.qkv") == ("layer", 12)
    assert block_of("diffusion_model.final_layer.linear") is None


def test_ranges_groups_and_selection():
    assert parse_dit_blocks("", FLUX) is None
    got = parse_dit_blocks("double0-2, single37 double5", FLUX)
    assert got == {("double", 0), ("double", 1), ("double", 2), ("double", 5), ("single", 37)}
    assert parse_dit_blocks("single", FLUX) == {("single", i) for i in range(38)}
    lin = nn.Linear(1, 1)
    targets = [Target(f"t{i}", p, lin) for i, p in enumerate(
        ["double_blocks.1.img_attn.qkv", "single_blocks.37.linear1", "final_layer.linear"])]  # fmt: skip
    assert [t.name for t in in_blocks(targets, parse_dit_blocks("single37", FLUX))] == ["t1"]
    assert in_blocks(targets, None) == targets


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("double19", r"'double19' is past the model's last block: its blocks are double0-18, single0-37"),
        ("double0-99999999999", r"past the model's last block"),
        ("mid", r"'mid' is not a block of this model"),
        ("joint3", r"'joint3' is not a block of this model"),
    ],
)
def test_bad_entries_name_the_valid_range(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_dit_blocks(spec, FLUX)
