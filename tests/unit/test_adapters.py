"""Adapter math against independent formulas (B @ A * alpha / r, kron, Hadamard, DoRA norms)."""

import pytest
import torch

from lora_foundry.lora_core.adapters import (
    DiffAdapter,
    LohaAdapter,
    LokrAdapter,
    LoraAdapter,
    OftV2Adapter,
    SetAdapter,
    apply,
    delta,
    is_linear,
    oftv2_fit_error,
    scale_of,
    scaled_factors,
)

torch.manual_seed(0)


def r(*shape):
    return torch.randn(*shape)


def test_lora_linear_is_b_at_a_times_alpha_over_rank():
    up, down, w = r(6, 2), r(2, 5), r(6, 5)
    out = apply(LoraAdapter(up=up, down=down, alpha=3.0), w, 0.5)
    torch.testing.assert_close(out, w + 0.5 * (3.0 / 2) * (up @ down))


def test_lora_without_alpha_uses_scale_one():
    up, down, w = r(6, 2), r(2, 5), r(6, 5)
    assert scale_of(LoraAdapter(up=up, down=down)) == 1.0
    torch.testing.assert_close(apply(LoraAdapter(up=up, down=down), w, 1.0), w + up @ down)


def test_conv3x3_locon_and_1x1():
    up, down = r(6, 2, 1, 1), r(2, 4, 3, 3)
    expected = (up.reshape(6, 2) @ down.reshape(2, 36)).reshape(6, 4, 3, 3)
    torch.testing.assert_close(delta(LoraAdapter(up=up, down=down, alpha=2.0), (6, 4, 3, 3)), expected)
    up1, down1 = r(6, 2, 1, 1), r(2, 4, 1, 1)
    expected1 = (up1[:, :, 0, 0] @ down1[:, :, 0, 0]).reshape(6, 4, 1, 1)
    torch.testing.assert_close(delta(LoraAdapter(up=up1, down=down1), (6, 4, 1, 1)), expected1)


def test_tucker_mid():
    up, down, mid = r(6, 2, 1, 1), r(2, 4, 1, 1), r(2, 2, 3, 3)
    expected = torch.zeros(6, 4, 3, 3)
    for h in range(3):
        for k in range(3):
            expected[:, :, h, k] = up[:, :, 0, 0] @ mid[:, :, h, k] @ down[:, :, 0, 0]
    torch.testing.assert_close(
        delta(LoraAdapter(up=up, down=down, mid=mid, alpha=2.0), (6, 4, 3, 3)), expected
    )


def test_loha_is_hadamard_of_two_products():
    w1a, w1b, w2a, w2b = r(6, 2), r(2, 5), r(6, 2), r(2, 5)
    d = delta(LohaAdapter(w1a, w1b, w2a, w2b, alpha=1.0), (6, 5))
    torch.testing.assert_close(d, 0.5 * (w1a @ w1b) * (w2a @ w2b))


def test_loha_tucker():
    w1a, w1b, w2a, w2b, t1, t2 = r(2, 6), r(2, 4), r(2, 6), r(2, 4), r(2, 2, 3, 3), r(2, 2, 3, 3)
    m1 = torch.zeros(6, 4, 3, 3)
    m2 = torch.zeros(6, 4, 3, 3)
    for h in range(3):
        for k in range(3):
            m1[:, :, h, k] = w1a.T @ t1[:, :, h, k] @ w1b
            m2[:, :, h, k] = w2a.T @ t2[:, :, h, k] @ w2b
    d = delta(LohaAdapter(w1a, w1b, w2a, w2b, alpha=4.0, t1=t1, t2=t2), (6, 4, 3, 3))
    torch.testing.assert_close(d, 2.0 * m1 * m2)


@pytest.mark.parametrize(
    "kwargs, expected_scale",
    [
        ({"w1": "full", "w2": "full"}, 1.0),  # no factorised factor: alpha ignored
        ({"w1": "full", "w2": "fact"}, 5.0 / 2),  # rank of w2
        ({"w1": "fact", "w2": "full"}, 5.0 / 1),  # rank of w1
        ({"w1": "fact", "w2": "fact"}, 5.0 / 2),  # w2 wins
    ],
)
def test_lokr_alpha_rule_and_kron(kwargs, expected_scale):
    w1, w1a, w1b = r(2, 3), r(2, 1), r(1, 3)
    w2, w2a, w2b = r(4, 2), r(4, 2), r(2, 2)
    a = {}
    if kwargs["w1"] == "full":
        a["w1"], m1 = w1, w1
    else:
        a["w1_a"], a["w1_b"], m1 = w1a, w1b, w1a @ w1b
    if kwargs["w2"] == "full":
        a["w2"], m2 = w2, w2
    else:
        a["w2_a"], a["w2_b"], m2 = w2a, w2b, w2a @ w2b
    adapter = LokrAdapter(alpha=5.0, **a)
    assert scale_of(adapter) == expected_scale
    torch.testing.assert_close(delta(adapter, (8, 6)), expected_scale * torch.kron(m1, m2))


def test_lokr_conv_tucker():
    w1, w2a, w2b, t2 = r(2, 2), r(2, 3), r(2, 2), r(2, 2, 3, 3)
    w2 = torch.zeros(3, 2, 3, 3)
    for h in range(3):
        for k in range(3):
            w2[:, :, h, k] = w2a.T @ t2[:, :, h, k] @ w2b
    d = delta(LokrAdapter(w1=w1, w2_a=w2a, w2_b=w2b, t2=t2, alpha=1.0), (6, 4, 3, 3))
    torch.testing.assert_close(d, 0.5 * torch.kron(w1[:, :, None, None], w2))


def _dora_reference(w, diff, m, strength, out_axis):
    merged = w + diff
    if out_axis:  # ComfyUI: norm of the original weight's rows
        norm = torch.stack([w[i].norm() for i in range(w.shape[0])]).reshape(-1, 1)
    else:
        norm = torch.stack([merged[:, j].norm() for j in range(w.shape[1])]).reshape(1, -1)
    new = merged * m / (norm + torch.finfo(torch.float32).eps)
    return w + strength * (new - w)


@pytest.mark.parametrize("out_axis", [True, False])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_dora(out_axis, strength):
    up, down, w = r(6, 2), r(2, 5), r(6, 5)
    m = (r(6, 1) if out_axis else r(1, 5)).abs()
    adapter = LoraAdapter(up=up, down=down, alpha=1.0, dora_scale=m)
    assert not is_linear(adapter)
    expected = _dora_reference(w, 0.5 * up @ down, m, strength, out_axis)
    torch.testing.assert_close(apply(adapter, w, strength), expected)
    with pytest.raises(ValueError, match="apply"):
        delta(adapter, (6, 5))


def test_diff_set_and_dtype_preserved_and_input_untouched():
    w = r(3, 4).half()
    before = w.clone()
    d = r(3, 4)
    out = apply(DiffAdapter(d), w, 2.0)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, (w.float() + 2.0 * d).half())
    assert torch.equal(w, before)
    s = r(3, 4)
    torch.testing.assert_close(apply(SetAdapter(s), w, 0.3), s.half())


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="different model"):
        apply(LoraAdapter(up=r(6, 2), down=r(2, 5)), r(7, 5), 1.0)
    with pytest.raises(ValueError, match="rank mismatch"):
        LoraAdapter(up=r(6, 3), down=r(2, 5))


def test_scaled_factors_concatenate_to_sum_of_deltas():
    a = LoraAdapter(up=r(6, 2), down=r(2, 5), alpha=1.0)
    b = LoraAdapter(up=r(6, 3), down=r(3, 5), alpha=6.0)
    (ua, da), (ub, db) = scaled_factors(a), scaled_factors(b)
    fused = torch.cat([ua, ub], dim=1) @ torch.cat([da, db], dim=0)
    torch.testing.assert_close(fused, delta(a, (6, 5)) + delta(b, (6, 5)))


def test_oft_turns_each_block_of_rows_by_an_orthogonal_matrix():
    """Checked without ComfyUI: at strength 1 the rows of each block are rotated (R orthogonal, from
    the Cayley transform of the skew part), so each block's Gram matrix over columns is kept."""
    from lora_foundry.lora_core.adapters import OftAdapter

    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 5, generator=g)
    blocks = torch.randn(2, 4, 4, generator=g) * 0.3
    out = apply(OftAdapter(blocks), w, 1.0)
    for k in range(2):
        a, b = w[4 * k : 4 * k + 4], out[4 * k : 4 * k + 4]
        assert torch.allclose(a.T @ a, b.T @ b, atol=1e-5)  # R^T R = I
    skew = blocks - blocks.transpose(1, 2)
    eye = torch.eye(4)
    r = (eye + skew[0]) @ torch.linalg.inv(eye - skew[0])
    assert torch.allclose(out[:4], r.T @ w[:4], atol=1e-5)
    assert torch.equal(apply(OftAdapter(torch.zeros(2, 4, 4)), w, 1.0), w)  # no skew part: no change
    bounded = apply(OftAdapter(blocks * 100, alpha=0.1), w, 1.0)  # alpha bounds the skew norm
    assert (bounded - w).norm() < (out - w).norm()


def _cayley(blocks: torch.Tensor) -> torch.Tensor:
    skew = blocks - blocks.transpose(-1, -2)
    eye = torch.eye(blocks.shape[-1])
    return (eye + skew) @ torch.linalg.inv(eye - skew)


def test_boft_is_a_product_of_butterfly_rotations():
    """Checked without ComfyUI, by building each level as a dense matrix row by row: level i mixes
    row j with row j + k (k = 2**i * size / 2) in each run of 2k rows; the new weight is
    rescale * (L_last ... L_1) W, and at strength 1 its Gram matrix over columns is kept."""
    from lora_foundry.lora_core.adapters import BoftAdapter

    g = torch.Generator().manual_seed(2)
    levels, size, rows = 3, 4, 16
    w = torch.randn(rows, 5, generator=g)
    blocks = torch.randn(levels, rows // size, size, size, generator=g) * 0.3
    rot = _cayley(blocks)
    total = torch.eye(rows)
    for i in range(levels):
        k = (size // 2) << i
        order = []  # rows in the order the level's blocks see them
        for start in range(0, rows, 2 * k):
            for j in range(k):
                order += [start + j, start + j + k]
        dense = torch.zeros(rows, rows)
        for b in range(rows // size):
            idx = order[b * size : (b + 1) * size]
            dense[torch.tensor(idx)[:, None], torch.tensor(idx)[None, :]] = rot[i, b]
        total = dense @ total
    out = apply(BoftAdapter(blocks), w, 1.0)
    torch.testing.assert_close(out, total @ w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.T @ out, w.T @ w, atol=1e-4, rtol=1e-4)  # orthogonal
    scale = torch.rand(rows, 1, generator=g) + 0.5
    torch.testing.assert_close(
        apply(BoftAdapter(blocks, scale), w, 1.0), scale * (total @ w), atol=1e-5, rtol=1e-5
    )
    assert not is_linear(BoftAdapter(blocks))
    with pytest.raises(ValueError, match="do not cover the weight's 12 rows"):
        apply(BoftAdapter(blocks), torch.randn(12, 5))


def test_one_level_boft_is_oft_of_the_transposed_interleaved_blocks():
    """A butterfly of one level is a diag-OFT whose blocks see their rows interleaved (j, j + size/2):
    BOFT multiplies by R, OFT by R^T = R(blocks^T). Both apply a strength s as s^2 (R - I) W
    (ComfyUI's convention, kept to match it)."""
    from lora_foundry.lora_core.adapters import BoftAdapter, OftAdapter

    g = torch.Generator().manual_seed(3)
    w = torch.randn(8, 6, generator=g)
    blocks = torch.randn(2, 4, 4, generator=g) * 0.3
    perm = torch.tensor([0, 2, 1, 3])  # its own inverse
    as_oft = blocks[:, perm][:, :, perm].transpose(1, 2)
    for s in (1.0, 0.6, -0.5):
        torch.testing.assert_close(
            apply(BoftAdapter(blocks[None]), w, s), apply(OftAdapter(as_oft), w, s), atol=1e-5, rtol=1e-5
        )
    rot = _cayley(blocks)
    out = apply(BoftAdapter(blocks[None]), w, 0.6)
    for b in range(2):
        rows = 4 * b + perm
        torch.testing.assert_close(
            out[rows], w[rows] + 0.36 * (rot[b] - torch.eye(4)) @ w[rows], atol=1e-5, rtol=1e-5
        )


def test_ia3_scales_rows_or_columns():
    """Checked without ComfyUI: W * (1 + s w), w per output row or (on_input) per input column,
    for a linear and a conv weight; a vector of the wrong length is a named error."""
    from lora_foundry.lora_core.adapters import Ia3Adapter

    g = torch.Generator().manual_seed(4)
    w = torch.randn(6, 5, generator=g)
    rows, cols = torch.randn(6, generator=g), torch.randn(5, generator=g)
    torch.testing.assert_close(apply(Ia3Adapter(rows, on_input=False), w, 0.5), w * (1 + 0.5 * rows)[:, None])
    torch.testing.assert_close(apply(Ia3Adapter(cols, on_input=True), w, -0.3), w * (1 - 0.3 * cols)[None, :])
    conv = torch.randn(6, 5, 3, 3, generator=g)
    out = apply(Ia3Adapter(cols.reshape(1, 5, 1, 1), on_input=True), conv, 1.0)
    torch.testing.assert_close(out, conv * (1 + cols)[None, :, None, None])
    assert torch.equal(apply(Ia3Adapter(rows, on_input=False), w, 0.0), w)
    assert not is_linear(Ia3Adapter(rows, on_input=False))
    with pytest.raises(ValueError, match="does not fit the weight"):
        apply(Ia3Adapter(rows, on_input=True), w)


def test_glora_is_w_a1_a2_plus_b1_b2():
    """Checked without ComfyUI: W + s * alpha / r * (W @ a1 @ a2 + b1 @ b2), on a non-square weight."""
    from lora_foundry.lora_core.adapters import GloraAdapter

    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 5, generator=g)
    a1, a2 = torch.randn(5, 2, generator=g), torch.randn(2, 5, generator=g)
    b1, b2 = torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g)
    out = apply(GloraAdapter(a1, a2, b1, b2, alpha=1.0), w, 0.7)
    assert torch.allclose(out, w + 0.7 * 0.5 * (w @ a1 @ a2 + b1 @ b2), atol=1e-5)
    assert not is_linear(GloraAdapter(a1, a2, b1, b2))
    with pytest.raises(ValueError, match="GLoRA factors"):
        apply(GloraAdapter(a1, a2, b1, torch.randn(3, 4)), w)


def _upper(vector: torch.Tensor, size: int) -> torch.Tensor:
    """The matrix whose strict upper triangle, row by row, is ``vector`` (zeros elsewhere)."""
    u = torch.zeros(size, size)
    k = 0
    for i in range(size):
        for j in range(i + 1, size):
            u[i, j] = vector[k]
            k += 1
    return u


@pytest.mark.parametrize("share", [False, True])
def test_peft_oft_turns_input_column_blocks(share):
    """W' = W blockdiag(R_b)^T, R_b the Cayley transform of each block's skew matrix (PEFT's
    5-term Neumann series is that transform up to terms in S^4, tiny for small S)."""
    size, out_f, in_f = 4, 6, 12
    blocks = 1 if share else in_f // size
    vectors, w = 0.01 * r(blocks, size * (size - 1) // 2), r(out_f, in_f)
    rotations = [_cayley(_upper(vectors[0 if share else b], size)) for b in range(in_f // size)]
    expected = w @ torch.block_diag(*rotations).T
    out = apply(OftV2Adapter(vectors), w, 1.0)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    half = apply(OftV2Adapter(vectors), w, 0.5)
    torch.testing.assert_close(half, w + 0.5 * (out - w))
    torch.testing.assert_close(apply(OftV2Adapter(vectors), w, 0.0), w)


def test_peft_oft_neumann_series_is_exact_in_its_terms():
    """The series itself, I + 2S + 2S^2 + 2S^3 + S^4, not only its limit (large S, one block)."""
    vector, w = r(1, 3), r(2, 3)
    u = _upper(vector[0], 3).double()
    s = u - u.T
    series = torch.eye(3, dtype=torch.float64) + 2 * (s + s @ s + s @ s @ s) + s @ s @ s @ s
    torch.testing.assert_close(
        apply(OftV2Adapter(vector), w).double(), w.double() @ series.T, atol=1e-5, rtol=1e-5
    )


def test_peft_oft_conv_turns_flattened_input_columns_and_scaled_flag_divides():
    w = r(4, 2, 3, 3)  # 18 input columns (channel, kh, kw): 6 blocks of 3
    vectors = 0.1 * r(6, 3)
    flat = apply(OftV2Adapter(vectors), w.reshape(4, 18))
    torch.testing.assert_close(apply(OftV2Adapter(vectors), w), flat.reshape(w.shape))
    scaled = apply(OftV2Adapter(vectors, scaled=True), w)
    torch.testing.assert_close(scaled, apply(OftV2Adapter(vectors / 3**0.5), w))
    assert not is_linear(OftV2Adapter(vectors))


@pytest.mark.parametrize(
    ("vectors", "shape", "message"),
    [
        ((3, 5), (4, 12), "not \\(blocks, size"),
        ((3, 6), (4, 10), "do not divide"),
        ((2, 6), (4, 12), "needs 3 \\(or 1, shared\\)"),
    ],
)
def test_peft_oft_that_does_not_fit_is_named(vectors, shape, message):
    adapter = OftV2Adapter(torch.zeros(vectors))
    assert oftv2_fit_error(adapter, shape) is not None
    with pytest.raises(ValueError, match=message):
        apply(adapter, torch.zeros(shape))
