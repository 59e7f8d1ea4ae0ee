"""apply_steps_half_: the stack's sums added to a float16 / bfloat16 weight in place, no float32 copy."""

import pytest
import torch

from lora_foundry.lora_core.adapters import DiffAdapter, LohaAdapter, LoraAdapter
from lora_foundry.lora_core.apply.patching import Term, apply_steps_half_, apply_terms, lora_blocks, prepare

HALF = [torch.bfloat16, torch.float16]


def _lora(out, inp, rank, seed, dtype=torch.float32, alpha=None, dora=False):
    g = torch.Generator().manual_seed(seed)
    return LoraAdapter(
        up=(torch.randn(out, rank, generator=g) * 0.2).to(dtype),
        down=(torch.randn(rank, inp, generator=g) * 0.2).to(dtype),
        alpha=alpha,
        dora_scale=(torch.rand(out, 1, generator=g) + 0.5) if dora else None,
    )


def _exact(terms, w):
    """float64: W + sum of strength * (alpha / rank) * up @ down, from the same factors."""
    out = w.double()
    for t in terms:
        a = t.adapter
        scale = (a.alpha if a.alpha is not None else a.rank) / a.rank
        out += t.strength * scale * (a.up.double() @ a.down.double())
    return out


def _representable(dtype, terms):
    """The terms with factors rounded to ``dtype`` and power-of-two coefficients: then the only
    rounding left is the final one, and a correct result is the exact sum rounded to nearest."""
    return [Term(LoraAdapter(t.adapter.up.to(dtype), t.adapter.down.to(dtype)), t.strength) for t in terms]


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("compute", ["weight", "float32"])
@pytest.mark.parametrize("strengths", [(0.5, -0.25, 2.0), (0.5, 0.5, 0.5)], ids=["own", "shared"])
def test_one_rounding_of_the_exact_sum(dtype, compute, strengths):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 40, generator=g).to(dtype)
    terms = _representable(
        dtype, [Term(_lora(48, 40, r, s), k) for r, s, k in zip((4, 8, 6), (2, 3, 4), strengths, strict=True)]
    )
    work = w.clone()
    out = apply_steps_half_(prepare(terms), work, None if compute == "weight" else torch.float32)
    assert out is work and out.dtype == dtype
    rounded = _exact(terms, w).to(dtype)
    differ = out != rounded
    # float32 accumulation: a value within float32 noise of a tie may land on the other side
    step = rounded.double().abs() * torch.finfo(dtype).eps
    assert ((out.double() - rounded.double()).abs() <= step).all()
    assert differ.float().mean() < 0.01, differ.float().mean()


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_folded_coefficients_and_file_dtypes_beat_rounding_each_term(dtype):
    """fp16 files on a bf16 weight, each term its own strength: against float64, ours is closer than
    adding each term's change rounded to the dtype (what core's adapters do in the weight's dtype)."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 96, generator=g).to(dtype)
    terms = [
        Term(_lora(64, 96, 8, s, torch.float16, alpha=4.0), k) for s, k in ((5, 0.7), (6, -0.3), (7, 1.3))
    ]
    exact = _exact(terms, w)
    ours = apply_steps_half_(prepare(terms), w.clone())
    each = w.clone()
    for t in terms:
        a = t.adapter
        each += ((t.strength * a.alpha / a.rank) * (a.up.to(dtype) @ a.down.to(dtype))).to(dtype)
    ours_err, each_err = (ours.double() - exact).abs(), (each.double() - exact).abs()
    assert ours_err.mean() < each_err.mean() and ours_err.max() <= each_err.max()


def test_small_budget_splits_rows_then_ranks_and_stays_close():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 24, generator=g).to(torch.bfloat16)
    terms = [Term(_lora(64, 24, 16, 8, torch.float16), 0.6), Term(_lora(64, 24, 16, 9, torch.float16), -0.4)]
    (fused,) = prepare(terms)
    whole = lora_blocks(fused, (64, 24), torch.bfloat16, torch.bfloat16, "cpu", 64 * 24 * 2)
    tight = lora_blocks(fused, (64, 24), torch.bfloat16, torch.bfloat16, "cpu", 600)
    assert whole.ranks == 32 and whole.rows < 64  # down cast (32 x 24 x 2 bytes) fits half the budget
    assert tight.ranks < 32 and tight.rows < 64
    for blocks, budget in ((whole, 64 * 24 * 2), (tight, 600)):
        # down rows cast (2 bytes), up rows folded (a float32 product, then cast: 4 + 2 bytes)
        assert blocks.ranks * 24 * 2 + blocks.rows * blocks.ranks * (4 + 2) <= budget
    exact = _exact(terms, w)
    for budget in (None, 600):
        got = apply_steps_half_(prepare(terms), w.clone(), budget=budget)
        assert (
            (got.double() - exact).abs() <= 2 * exact.abs().amax() * torch.finfo(torch.bfloat16).eps
        ).all()


def test_mixed_sums_equal_the_float32_path():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(8, 6, generator=g).to(torch.bfloat16)
    loha = LohaAdapter(*(torch.randn(s, generator=g) for s in [(8, 2), (2, 6), (8, 2), (2, 6)]), alpha=2.0)
    terms = [
        Term(_lora(8, 6, 3, 1), 0.5),
        Term(loha, 0.4),
        Term(DiffAdapter(torch.randn(8, 6, generator=g).half()), 0.2),
        Term(_lora(8, 6, 2, 2), 1.0),
    ]
    ref = apply_terms(terms, w)  # float32 copy, rounded once
    got = apply_steps_half_(prepare(terms), w.clone())
    assert torch.allclose(got.float(), ref.float(), atol=4 * ref.float().abs().max().item() * 2**-8)


def test_a_strided_slice_is_patched_in_place():
    """A column slice (a non-contiguous view) is patched where it lies; the rest is left alone."""
    g = torch.Generator().manual_seed(5)
    full = torch.randn(10, 12, generator=g).to(torch.bfloat16)
    before = full.clone()
    terms = _representable(torch.bfloat16, [Term(_lora(10, 4, 2, 6), 0.5)])
    view = full[:, 4:8]
    assert not view.is_contiguous()
    apply_steps_half_(prepare(terms), view)
    assert torch.equal(full[:, :4], before[:, :4]) and torch.equal(full[:, 8:], before[:, 8:])
    expected = _exact(terms, before[:, 4:8]).to(torch.bfloat16)
    assert ((full[:, 4:8].double() - expected.double()).abs() <= expected.double().abs() * 2**-8).all()


def test_factors_are_never_changed():
    terms = [Term(_lora(6, 5, 2, 7), 1.0), Term(_lora(6, 5, 3, 8), 0.3)]
    kept = [(t.adapter.up.clone(), t.adapter.down.clone()) for t in terms]
    for strengths in ((1.0, 0.3), (0.5, 0.5)):
        steps = prepare([Term(t.adapter, s) for t, s in zip(terms, strengths, strict=True)])
        apply_steps_half_(steps, torch.zeros(6, 5, dtype=torch.float16))
    for t, (up, down) in zip(terms, kept, strict=True):
        assert torch.equal(t.adapter.up, up) and torch.equal(t.adapter.down, down)


def test_refuses_what_it_does_not_compute():
    w = torch.zeros(6, 5, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="float16 / bfloat16"):
        apply_steps_half_(prepare([Term(_lora(6, 5, 2, 1), 1.0)]), torch.zeros(6, 5))
    with pytest.raises(ValueError, match="float16 / bfloat16"):  # DoRA needs the float32 path
        apply_steps_half_(prepare([Term(_lora(6, 5, 2, 1, dora=True), 1.0)]), w)
    with pytest.raises(ValueError, match="float16 / bfloat16"):
        apply_steps_half_(prepare([Term(_lora(6, 5, 2, 1), 1.0)]), w, torch.float16)
