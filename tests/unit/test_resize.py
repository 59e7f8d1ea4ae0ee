"""Resize modes against a dense SVD of the same delta."""

import pytest
import torch

from lora_foundry.lora_core.adapters import LoraAdapter
from lora_foundry.lora_core.merge.resize import resize, resize_modules, select_rank

SPECTRUM = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25])


def known_spectrum(out: int = 20, inp: int = 16, seed: int = 0):
    """up (out, 6) and down (6, in) whose product has singular values SPECTRUM."""
    g = torch.Generator().manual_seed(seed)
    q_out, _ = torch.linalg.qr(torch.randn(out, 6, generator=g))
    q_in, _ = torch.linalg.qr(torch.randn(inp, 6, generator=g))
    mix = torch.linalg.qr(torch.randn(6, 6, generator=g))[0]  # scramble so up/down are not already an SVD
    return q_out @ torch.diag(SPECTRUM) @ mix, mix.T @ q_in.T


def optimum_error(k: int) -> float:
    return float((SPECTRUM[k:] ** 2).sum().sqrt() / (SPECTRUM**2).sum().sqrt())


@pytest.mark.parametrize(
    "mode, value, expected",
    [
        ("fixed", 3, 3),
        ("fixed", 99, 6),
        ("sv_ratio", 0.2, 3),
        ("sv_ratio", 1.0, 1),
        ("energy", 0.93, 2),
        ("energy", 0.95, 3),
    ],
)
def test_modes_pick_the_expected_rank(mode, value, expected):
    up, down = known_spectrum()
    result = resize(up, down, mode, value)
    assert (
        result.rank == expected and result.up.shape == (20, expected) and result.down.shape == (expected, 16)
    )
    delta = up.double() @ down.double()
    err = float((result.up.double() @ result.down.double() - delta).norm() / delta.norm())
    assert err == pytest.approx(optimum_error(expected), abs=1e-5)
    assert result.rel_error == pytest.approx(optimum_error(expected), abs=1e-6)
    kept = float((SPECTRUM[:expected] ** 2).sum() / (SPECTRUM**2).sum())
    assert result.energy_kept == pytest.approx(kept, rel=1e-6)


def test_energy_mode_keeps_at_least_the_fraction():
    s = SPECTRUM.double()
    for value in (0.5, 0.8, 0.99, 0.999, 1.0):
        k = select_rank(s, "energy", value)
        assert float((s[:k] ** 2).sum() / (s**2).sum()) >= value - 1e-9
        assert k == 1 or float((s[: k - 1] ** 2).sum() / (s**2).sum()) < value


def test_zero_module_keeps_one_zero_component():
    result = resize(torch.zeros(5, 3), torch.zeros(3, 4), "energy", 0.9)
    assert result.rank == 1 and result.up.abs().max() == 0 and result.energy_kept == 1.0


def test_resize_keeps_dtype_and_does_not_mutate():
    up, down = known_spectrum()
    up16, down16 = up.half(), down.half()
    copy = up16.clone()
    result = resize(up16, down16, "fixed", 2)
    assert result.up.dtype == torch.float16 and torch.equal(up16, copy)


@pytest.mark.parametrize(
    "mode, value, message",
    [
        ("fixed", 0, "positive integer; got 0"),
        ("fixed", 2.5, "positive integer; got 2.5"),
        ("sv_ratio", 10, r"in \(0, 1\].*1/N"),
        ("energy", 0.0, "fraction of Frobenius energy"),
        ("energy", 1.2, "got 1.2"),
        ("rank", 4, "mode must be one of"),
    ],
)
def test_bad_arguments(mode, value, message):
    up, down = known_spectrum()
    with pytest.raises(ValueError, match=message):
        resize(up, down, mode, value)


def test_resize_rejects_unchained_factors():
    with pytest.raises(ValueError, match="up \\(out, r\\) and down \\(r, in\\)"):
        resize(torch.zeros(4, 3), torch.zeros(2, 5), "fixed", 1)


def test_resize_modules_applies_alpha_and_keeps_conv_shape():
    up, down = known_spectrum()
    g = torch.Generator().manual_seed(3)
    conv_up, conv_down = torch.randn(8, 4, 1, 1, generator=g), torch.randn(4, 5, 3, 3, generator=g)
    modules = {
        "lora_unet_lin": LoraAdapter(up=up, down=down, alpha=3.0),  # scale 3 / 6
        "lora_unet_conv": LoraAdapter(up=conv_up, down=conv_down, alpha=4.0),
    }
    result = resize_modules(modules, "fixed", 2)
    lin = result.modules["lora_unet_lin"]
    assert lin.alpha == 2.0 and lin.up.shape == (20, 2)
    delta = 0.5 * up.double() @ down.double()
    err = float((lin.up.double() @ lin.down.double() - delta).norm() / delta.norm())
    assert err == pytest.approx(optimum_error(2), abs=1e-5)
    conv = result.modules["lora_unet_conv"]
    assert conv.up.shape == (8, 2, 1, 1) and conv.down.shape == (2, 5, 3, 3)
    report = result.reports["lora_unet_conv"]
    assert (report.old_rank, report.new_rank) == (4, 2) and 0 < report.energy_kept <= 1


def test_resize_modules_names_the_bad_module():
    bad = {"lora_unet_bad": LoraAdapter(up=torch.zeros(4, 2, 3, 3), down=torch.zeros(2, 3, 3, 3), alpha=2.0)}
    with pytest.raises(ValueError, match="module 'lora_unet_bad': .*1x1"):
        resize_modules(bad, "fixed", 1)
