"""Frozen Linears of a bf16 / fp8 base computed in float32 a piece of weight rows at a time
(lora_core.train.hooks.cast_linear): the same output and input gradient as casting the whole
weight, through a Linear that recast_frozen_linears replaced, with and without autograd."""

from __future__ import annotations

import pytest
import torch

from lora_foundry.lora_core.train import hooks


@pytest.fixture
def small_pieces(monkeypatch):
    monkeypatch.setattr(hooks, "PIECE_ELEMENTS", 7 * 24)  # 7 rows of 24 inputs: 37 rows -> 6 pieces


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=["bf16", "fp8"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize(("n_in", "n_out"), [(24, 37), (60, 9)], ids=["tall", "wide"])
def test_pieces_equal_the_whole_cast(small_pieces, dtype, bias, n_in, n_out):
    """A tall weight's input gradient is summed over pieces of rows, a wide one's (here 3 rows per
    piece would be too short a product) is assembled from pieces of columns."""
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(n_in, n_out, bias=bias)
    weight = torch.randn(n_out, n_in, generator=g) * 0.3
    layer.weight = torch.nn.Parameter(weight.to(dtype), requires_grad=False)
    if bias:
        layer.bias = torch.nn.Parameter(layer.bias.detach().to(torch.bfloat16), requires_grad=False)
    x = torch.randn(2, 5, n_in, generator=g)
    upstream = torch.randn(2, 5, n_out, generator=g)

    def whole(inp):
        b = None if layer.bias is None else layer.bias.float()
        return torch.nn.functional.linear(inp, layer.weight.float(), b)

    x_ref = x.clone().requires_grad_(True)
    expected = whole(x_ref)
    (expected * upstream).sum().backward()

    undo = hooks.recast_frozen_linears([layer])
    try:
        assert "forward" in layer.__dict__
        with torch.no_grad():  # a checkpointed block's first forward
            torch.testing.assert_close(layer(x), expected.detach(), rtol=1e-6, atol=1e-6)
        x_ours = x.clone().requires_grad_(True)
        out = layer(x_ours)
        assert out.grad_fn is not None and "RecastLinear" in type(out.grad_fn).__name__
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
        (out * upstream).sum().backward()
    finally:
        undo()
    assert "forward" not in layer.__dict__
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    assert x_ours.grad.abs().max() > 0


def test_piece_rows_cover_every_row_once(small_pieces):
    weight = torch.zeros(37, 24, dtype=torch.bfloat16)
    assert hooks._piece_rows(weight) == 7
    # one row wider than a piece still goes one row at a time
    assert hooks._piece_rows(torch.zeros(3, 1000)) == 1
    x = torch.eye(24)[:1]
    weight = torch.arange(37 * 24, dtype=torch.float32).reshape(37, 24).to(torch.bfloat16)
    torch.testing.assert_close(hooks.cast_linear(x, weight, None), weight[:, 0].float()[None])


def test_a_float32_weight_or_a_trainable_one_runs_the_layer_itself(small_pieces):
    layer = torch.nn.Linear(24, 37)
    layer.requires_grad_(False)
    undo = hooks.recast_frozen_linears([layer])
    try:
        out = layer(torch.randn(3, 24, requires_grad=True))  # same dtype as the input: no cast
        assert "RecastLinear" not in type(out.grad_fn).__name__
    finally:
        undo()


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn], ids=["fp32", "bf16", "fp8"]
)
def test_under_autocast_pieces_compute_in_autocasts_dtype(small_pieces, dtype):
    """Train LoRA's bf16 precision: the product runs in bfloat16 as autocast's Linear does (the
    weight's pieces cast straight to bfloat16), and the input's gradient comes back in float32."""
    g = torch.Generator().manual_seed(3)
    layer = torch.nn.Linear(24, 37)
    layer.weight = torch.nn.Parameter((torch.randn(37, 24, generator=g) * 0.3).to(dtype), requires_grad=False)
    layer.bias = torch.nn.Parameter(torch.randn(37, generator=g), requires_grad=False)
    x = torch.randn(4, 24, generator=g)
    upstream = torch.randn(4, 37, generator=g)

    x_ref = x.clone().requires_grad_(True)
    with torch.autocast("cpu", torch.bfloat16):
        expected = torch.nn.functional.linear(x_ref, layer.weight.float(), layer.bias)
    assert expected.dtype == torch.bfloat16
    (expected.float() * upstream).sum().backward()

    undo = hooks.recast_frozen_linears([layer])
    try:
        x_ours = x.clone().requires_grad_(True)
        with torch.autocast("cpu", torch.bfloat16):
            out = layer(x_ours)
            with torch.no_grad():
                again = layer(x)
        assert "RecastLinear" in type(out.grad_fn).__name__
        (out.float() * upstream).sum().backward()
    finally:
        undo()
    assert out.dtype == again.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(again, expected.detach(), rtol=0, atol=0)
    assert x_ours.grad.dtype == torch.float32
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-2, atol=1e-2)
    assert x_ours.grad.abs().max() > 0


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3fn", "e5m2"])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
def test_fp8_cast_by_bits_equals_pytorchs_for_every_value(fp8, dtype):
    """All 256 codes (zeros, subnormals, normals, the largest, NaN / inf), contiguous and as a
    column slice: the bit-level cast gives PyTorch's values exactly."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fp8)
    for weight in (codes, codes.reshape(16, 16)[:, 3:9]):
        expected = weight.to(dtype)
        got = hooks._cast(weight, dtype)
        assert got.dtype == dtype and got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
        real = ~torch.isnan(expected)
        assert torch.equal(torch.signbit(got[real]), torch.signbit(expected[real]))  # -0.0 stays -0.0


def test_e4m3fn_without_nan_takes_the_bit_path(monkeypatch):
    """The fast path is the one taken (PyTorch's fp8 cast is not called) unless a NaN is present."""
    values = (torch.randn(64, 32) * 0.1).to(torch.float8_e4m3fn)
    calls = []
    real_to = torch.Tensor.to

    def counting_to(self, *args, **kwargs):
        if self.dtype == torch.float8_e4m3fn:
            calls.append(args)
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    hooks._cast(values, torch.float32)
    assert calls == []
    with_nan = values.clone()
    with_nan.view(torch.uint8)[3, 4] = 0x7F
    out = hooks._cast(with_nan, torch.float32)
    assert len(calls) == 1 and torch.isnan(out[3, 4]) and torch.isfinite(out).sum() == out.numel() - 1


def _e4m3fn_codes() -> torch.Tensor:
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_e4m3fn_over_256_is_exact_for_every_finite_code(dtype):
    codes = _e4m3fn_codes()
    finite = codes[(codes.view(torch.uint8) & 0x7F) != 0x7F].reshape(2, 127)
    for weight in (finite, finite[:, 5:90]):
        got = hooks._e4m3fn_over_256(weight, dtype)
        expected = weight.float() / 256
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), expected, rtol=0, atol=0)
        assert torch.equal(torch.signbit(got), torch.signbit(expected))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("n_in", "n_out"), [(24, 37), (60, 9), (16, 5)], ids=["tall", "wide", "one_piece"])
def test_a_weight_known_finite_gives_the_same_bits_as_the_checked_cast(small_pieces, dtype, n_in, n_out):
    """The three-pass cast with the 256 folded into the product: output and input gradient equal
    the checked cast's bit for bit (subnormal codes, the largest code and -0.0 included)."""
    g = torch.Generator().manual_seed(5)
    weight = (torch.randn(n_out, n_in, generator=g) * 0.05).to(torch.float8_e4m3fn)
    weight.view(torch.uint8)[0, :4] = torch.tensor([0x7E, 0xFE, 0x80, 0x01], dtype=torch.uint8)
    assert (weight.float().abs() < 2**-6).any()  # e4m3fn subnormals present
    bias = torch.randn(n_out, generator=g).to(torch.bfloat16)
    x = torch.randn(3, n_in, generator=g).to(dtype)
    grad = torch.randn(3, n_out, generator=g).to(dtype)
    assert hooks._piece_cast(weight, dtype, True)[1] == 256.0
    for b in (bias, None):
        assert torch.equal(hooks.cast_linear(x, weight, b, True), hooks.cast_linear(x, weight, b))
    assert torch.equal(
        hooks.cast_linear_input_grad(grad, weight, True), hooks.cast_linear_input_grad(grad, weight)
    )
    # float16's range cannot carry the input times 256: the checked cast, unscaled
    assert hooks._piece_cast(weight, torch.float16, True) == (hooks._cast, 1.0)
    assert hooks._piece_cast(weight.bfloat16(), dtype, True) == (hooks._cast, 1.0)


def test_finite_codes_are_read_once_per_weight_and_again_when_it_changes(monkeypatch):
    reads = []
    real = hooks._e4m3fn_finite
    monkeypatch.setattr(hooks, "_e4m3fn_finite", lambda w: reads.append(1) or real(w))
    finite = hooks.FiniteCodes()
    weight = (torch.randn(8, 8) * 0.1).to(torch.float8_e4m3fn)
    assert [finite(weight) for _ in range(3)] == [True] * 3 and len(reads) == 1
    weight.view(torch.uint8)[2, 3] = 0xFF  # a NaN code written in place: a new version
    assert finite(weight) is False and len(reads) == 2
    other = (torch.randn(8, 8) * 0.1).to(torch.float8_e4m3fn)
    assert finite(other) is True and len(reads) == 3
    assert finite(other.bfloat16()) is False and len(reads) == 3  # not e4m3fn: nothing to read


def test_a_layer_whose_e4m3fn_weight_holds_a_nan_code_computes_it_as_pytorch_does(small_pieces):
    layer = torch.nn.Linear(24, 37, bias=False)
    weight = (torch.randn(37, 24) * 0.1).to(torch.float8_e4m3fn)
    weight.view(torch.uint8)[30, 2] = 0x7F
    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    x = torch.randn(2, 24)
    expected = torch.nn.functional.linear(x, weight.float())
    undo = hooks.recast_frozen_linears([layer])
    try:
        got = layer(x.requires_grad_(True))
    finally:
        undo()
    assert torch.isnan(got[:, 30]).all() and torch.isfinite(got[:, :30]).all()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6, equal_nan=True)


def test_a_replaced_layer_with_a_finite_e4m3fn_weight_takes_the_three_pass_cast(small_pieces, monkeypatch):
    layer = torch.nn.Linear(24, 37)
    layer.weight = torch.nn.Parameter(
        (torch.randn(37, 24) * 0.1).to(torch.float8_e4m3fn), requires_grad=False
    )
    layer.requires_grad_(False)
    calls = {"fast": 0, "checked": 0}
    fast, checked = hooks._e4m3fn_over_256, hooks._cast
    monkeypatch.setattr(
        hooks, "_e4m3fn_over_256", lambda *a: calls.__setitem__("fast", calls["fast"] + 1) or fast(*a)
    )
    monkeypatch.setattr(
        hooks, "_cast", lambda *a: calls.__setitem__("checked", calls["checked"] + 1) or checked(*a)
    )
    undo = hooks.recast_frozen_linears([layer])
    try:
        layer(torch.randn(2, 24, requires_grad=True)).sum().backward()
    finally:
        undo()
    assert calls == {"fast": 12, "checked": 0}  # 6 pieces forward, 6 backward
