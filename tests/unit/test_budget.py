"""Memory estimates: the counts behind them (checked against what torch allocates), the refusal
only above the available memory, and a message that names the inputs, the figures and the fix."""

import pytest
import torch

from lora_foundry.lora_core import budget
from lora_foundry.lora_core.budget import (
    MemoryBudgetError,
    MemoryNeed,
    TrainSettings,
    check_fits,
    factors_need,
    format_bytes,
    image_need,
    lora_value_count,
    train_need,
    unet_skip_values,
)
from lora_foundry.lora_core.train.network import LoraNetwork, Target

SD15_CONFIG = {"model_channels": 320, "channel_mult": [1, 2, 4, 4], "num_res_blocks": 2}


def test_check_fits_refuses_only_above_available():
    need = MemoryNeed(parts=(("a", 600), ("b", 400)), inputs="`rank` 8", fix="lower `rank`")
    check_fits(need, 1000, "cpu")
    check_fits(need, None, "cpu")  # unknown: never refuse
    with pytest.raises(MemoryBudgetError, match=r"^`rank` 8 need at least 1000 bytes \(a 600 bytes, b 400 bytes\), "
                       r"but only 999 bytes is available on cpu: lower `rank`$"):  # fmt: skip
        check_fits(need, 999, "cpu")
    assert issubclass(MemoryBudgetError, ValueError)


@pytest.mark.parametrize(
    "n, text", [(512, "512 bytes"), (1536, "1.5 KiB"), (3 * 2**30, "3.0 GiB"), (2**42, "4096.0 GiB")]
)
def test_format_bytes(n, text):
    assert format_bytes(n) == text


def test_lora_value_count_equals_the_parameters_torch_allocates():
    layers = [torch.nn.Linear(7, 5), torch.nn.Conv2d(3, 6, 3), torch.nn.Conv2d(6, 4, 1)]
    targets = [Target(f"lora_unet_l{i}", f"l{i}", m) for i, m in enumerate(layers)]
    for dora in (False, True):
        net = LoraNetwork(targets, rank=3, alpha=3, dora=dora)
        expected = sum(p.numel() for p in net.parameters())
        assert lora_value_count([tuple(m.weight.shape) for m in layers], 3, dora) == expected


def test_skip_values_of_sd15_at_512():
    # Counted by hand from SD1.5's layout at a 64x64 latent: input conv 320@64², two res blocks
    # 320@64², down 320@32², 2x 640@32², down 640@16², 2x 1280@16², down 1280@8², 2x 1280@8².
    by_hand = 3 * 320 * 64 * 64 + 320 * 32 * 32 + 2 * 640 * 32 * 32 + 640 * 16 * 16
    by_hand += 2 * 1280 * 16 * 16 + 1280 * 8 * 8 + 2 * 1280 * 8 * 8
    assert unet_skip_values(SD15_CONFIG, 64, 64) == by_hand
    assert unet_skip_values({"not": "a unet"}, 64, 64) == 0


def test_train_need_parts_and_a_setting_that_cannot_fit():
    shapes = [(320, 320), (320, 768)] * 16
    small = TrainSettings(
        rank=16, dora=False, optimizer="AdamW", batch_size=1, resolution=512, targets="attention"
    )
    need = train_need(shapes, small, SD15_CONFIG)
    parts = dict(need.parts)
    assert parts["LoRA weights, gradients and AdamW state"] == lora_value_count(shapes, 16) * (4 + 4 + 8)
    assert parts["activations the UNet keeps for its decoder"] == unet_skip_values(SD15_CONFIG, 64, 64) * 2
    assert need.total < 2**30  # an ordinary run: far below any machine's memory
    huge = TrainSettings(
        rank=16, dora=False, optimizer="AdamW", batch_size=256, resolution=2048, targets="attention"
    )
    assert train_need(shapes, huge, SD15_CONFIG).total > 48 * 2**30  # the 2048 px x 256: refused
    with pytest.raises(MemoryBudgetError, match=r"`batch_size` 256 at resolution 2048 need at least .*GiB"):
        check_fits(train_need(shapes, huge, SD15_CONFIG), 24 * 2**30, "cuda:0")


def test_optimizer_state_table_names_every_optimizer():
    from lora_foundry.lora_core.train.optim import OPTIMIZERS

    assert set(budget.OPTIMIZER_STATE_BYTES) == set(OPTIMIZERS)


def test_factors_and_image_needs():
    need = factors_need([(10, 20, 4), (30, 30, 2)], "fp16", 100, "x", "y")
    assert dict(need.parts) == {
        "output factors": (4 * 30 + 2 * 60) * (4 + 2),
        "the largest module's dense work": 100,
    }
    assert dict(factors_need([(10, 20, 4)], "fp32", 0, "x", "y").parts)["output factors"] == 4 * 30 * 4
    assert image_need(8192, 8192).total == 2 * 8192 * 8192 * 3
