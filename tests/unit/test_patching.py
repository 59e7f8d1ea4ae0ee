"""The fused stack patch equals applying its terms one after another."""

import torch

from lora_foundry.lora_core.adapters import DiffAdapter, LohaAdapter, LoraAdapter, apply
from lora_foundry.lora_core.apply.patching import Term, apply_terms, prepare


def _lora(out, inp, r, seed, alpha=None, dora=False):
    g = torch.Generator().manual_seed(seed)
    return LoraAdapter(
        up=torch.randn(out, r, generator=g),
        down=torch.randn(r, inp, generator=g),
        alpha=alpha,
        dora_scale=(torch.rand(out, 1, generator=g) + 0.5) if dora else None,
    )


def _sequential(terms, w):
    for t in terms:
        w = apply(t.adapter, w, t.strength)
    return w


def test_plain_loras_fuse_into_one_product():
    w = torch.randn(12, 10)
    terms = [
        Term(_lora(12, 10, 4, 1, alpha=2.0), 0.7),
        Term(_lora(12, 10, 8, 2), -0.3),
        Term(_lora(12, 10, 2, 3, 1.0), 1.5),
    ]
    expected = w.clone()
    for t in terms:  # independent: (alpha / r) * B @ A per term
        a = t.adapter
        scale = (a.alpha if a.alpha is not None else a.rank) / a.rank
        expected += t.strength * scale * (a.up @ a.down)
    got = apply_terms(terms, w)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(got, _sequential(terms, w), atol=1e-5)


def test_mixed_kinds_and_dora_keep_order():
    w = torch.randn(8, 6)
    g = torch.Generator().manual_seed(5)
    loha = LohaAdapter(*(torch.randn(s, generator=g) for s in [(8, 2), (2, 6), (8, 2), (2, 6)]), alpha=2.0)
    terms = [
        Term(_lora(8, 6, 3, 1), 0.5),
        Term(loha, 0.4),
        Term(_lora(8, 6, 2, 2, dora=True), 0.8),  # not a plain sum: splits the fused runs
        Term(DiffAdapter(torch.randn(8, 6, generator=g)), 0.2),
        Term(_lora(8, 6, 4, 3), 1.0),
    ]
    assert torch.allclose(apply_terms(terms, w), _sequential(terms, w), atol=1e-5)


def test_input_untouched_and_dtype_kept():
    w = torch.randn(6, 4, dtype=torch.float16)
    before = w.clone()
    out = apply_terms([Term(_lora(6, 4, 2, 1), 1.0)], w)
    assert out.dtype == torch.float16 and torch.equal(w, before)


def test_zero_strength_is_a_no_op():
    w = torch.randn(6, 4)
    assert torch.equal(apply_terms([Term(_lora(6, 4, 2, 1), 0.0)], w), w)


def test_prepare_fuses_each_run_of_plain_loras_once():
    g = torch.Generator().manual_seed(9)
    loha = LohaAdapter(*(torch.randn(s, generator=g) for s in [(8, 2), (2, 6), (8, 2), (2, 6)]), alpha=2.0)
    a, b, c = _lora(8, 6, 3, 1), _lora(8, 6, 2, 2), _lora(8, 6, 4, 3)
    steps = prepare(
        [Term(a, 0.5), Term(b, 1.0), Term(loha, 0.4), Term(_lora(8, 6, 2, 4, dora=True), 1.0), Term(c, 2.0)]
    )
    kinds = [type(s).__name__ for s in steps]
    assert kinds == ["FusedLora", "Term", "Term", "FusedLora"]
    up, down, alpha = steps[0].scaled("cpu")
    assert up.shape == (8, 5) and down.shape == (5, 6)  # ranks 3 + 2
    assert torch.allclose(alpha * up @ down, 0.5 * (a.up @ a.down) + b.up @ b.down, atol=1e-5)
    up, down, alpha = prepare([Term(a, 0.5), Term(b, 0.5)])[0].scaled("cpu")  # one strength: alpha
    assert alpha == 0.5 and up is steps[0].factors.up and down is steps[0].factors.down


def test_strength_change_reuses_the_concatenated_factors():
    a, b = _lora(12, 10, 4, 1, alpha=2.0), _lora(12, 10, 3, 2)
    first = prepare([Term(a, 0.5), Term(b, 1.0)])
    second = prepare([Term(a, -0.8), Term(b, 0.3)])
    assert second[0].factors is first[0].factors, "a strength change built the factors again"
    w = torch.randn(12, 10)
    for s_a, s_b in [(0.5, 1.0), (-0.8, 0.3)]:
        terms = [Term(a, s_a), Term(b, s_b)]
        assert torch.allclose(apply_terms(terms, w), _sequential(terms, w), atol=1e-5)
    other = prepare([Term(b, 1.0), Term(a, 1.0)])  # another order is another concatenation
    assert other[0].factors is not first[0].factors


def test_strengths_fold_into_the_smaller_factor():
    w_tall, w_wide = torch.randn(40, 6), torch.randn(6, 40)
    for w in (w_tall, w_wide):  # (out, R) is larger for the tall weight, (R, in) for the wide one
        terms = [Term(_lora(*w.shape, 3, 7), 0.6), Term(_lora(*w.shape, 2, 8, alpha=1.0), -1.4)]
        assert torch.allclose(apply_terms(terms, w), _sequential(terms, w), atol=1e-5)


def test_factors_are_freed_with_the_last_patch_using_them():
    import gc
    import weakref

    a = _lora(8, 6, 2, 1)
    steps = prepare([Term(a, 0.5), Term(_lora(8, 6, 2, 2), 1.0)])
    ref = weakref.ref(steps[0].factors)
    del steps
    gc.collect()
    assert ref() is None, "the factor cache kept concatenated factors no patch uses"


def test_half_precision_files_fuse_in_their_own_dtype_with_float32_results():
    """fp16 / bf16 factors are concatenated as they are (half the memory of float32 copies); the
    alpha / rank scales and strengths are applied in float32 when the weight is patched."""
    w = torch.randn(24, 16)
    for dtype in (torch.float16, torch.bfloat16):
        a, b = _lora(24, 16, 4, 5, alpha=3.0), _lora(24, 16, 2, 6, alpha=0.5)
        a, b = (LoraAdapter(up=x.up.to(dtype), down=x.down.to(dtype), alpha=x.alpha) for x in (a, b))
        terms = [Term(a, 0.8), Term(b, -1.3)]
        (fused,) = prepare(terms)
        assert fused.factors.up.dtype == fused.factors.down.dtype == dtype
        assert torch.equal(fused.factors.up[:, :4], a.up)  # stored exactly, scale not folded in
        expected = (
            w + 0.8 * 0.75 * (a.up.float() @ a.down.float()) - 1.3 * 0.25 * (b.up.float() @ b.down.float())
        )
        torch.testing.assert_close(apply_terms(terms, w), expected, atol=1e-5, rtol=1e-5)
    mixed = prepare([Term(_lora(24, 16, 4, 7), 1.0), Term(LoraAdapter(up=a.up, down=a.down), 1.0)])
    assert mixed[0].factors.up.dtype == torch.float32  # files of two dtypes: float32
