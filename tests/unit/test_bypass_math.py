"""lora_core.apply.bypass: each adapter kind's change computed on activations equals the layer run with the
patched weight (lora_core.apply.patching.apply_terms, the weight path), for Linear and convolution layers,
slices of fused weights with a function, bias diffs and (IA)3; weight-dependent kinds are refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lora_foundry.lora_core.adapters import (
    DiffAdapter,
    GloraAdapter,
    Ia3Adapter,
    LohaAdapter,
    LokrAdapter,
    LoraAdapter,
    OftAdapter,
    SetAdapter,
)
from lora_foundry.lora_core.apply.bypass import BypassPatch, Layer, Target, refusal
from lora_foundry.lora_core.apply.patching import Term, apply_terms

G = torch.Generator().manual_seed(0)


def r(*shape, scale=0.3):
    return torch.randn(*shape, generator=G) * scale


LINEAR = Layer((12, 8))
CONV = Layer((6, 4, 3, 3), conv_dims=2, stride=(2, 2), padding=(1, 1), dilation=(1, 1))
GROUPED = Layer((6, 2, 3, 3), conv_dims=2, stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=2)


def run(layer: Layer, weight, bias, x):
    if not layer.conv_dims:
        return F.linear(x, weight, bias)
    return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def check(layer: Layer, terms, x, bias=None, param="weight"):
    weight = r(*layer.weight_shape)
    b = bias if bias is not None else r(layer.weight_shape[0])
    if param == "weight":
        expected = run(layer, apply_terms(terms, weight), b, x)
    else:
        expected = run(layer, weight, apply_terms(terms, b), x)
    base = run(layer, weight, b, x)
    patch = BypassPatch(terms, layer, Target(param))
    if patch.scales_input:
        got = run(layer, weight, b, patch.scale_input(x))
    else:
        got = patch.output(x, base.clone(), b)
    assert (expected - base).abs().max() > 1e-2, "the terms changed nothing: moot"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_lora_stack_on_a_linear_layer():
    terms = [Term(LoraAdapter(r(12, 4), r(4, 8), alpha=2.0), 0.7), Term(LoraAdapter(r(12, 2), r(2, 8)), -0.4)]
    check(LINEAR, terms, r(3, 5, 8, scale=1))


def test_locon_3x3_with_stride_and_padding():
    check(CONV, [Term(LoraAdapter(r(6, 3, 1, 1), r(3, 4, 3, 3), alpha=1.5), 0.9)], r(2, 4, 9, 9, scale=1))


def test_tucker_mid_is_folded_exactly():
    adapter = LoraAdapter(r(6, 3, 1, 1), r(3, 4, 1, 1), alpha=3.0, mid=r(3, 3, 3, 3))
    check(CONV, [Term(adapter, 0.8)], r(1, 4, 7, 7, scale=1))


def test_grouped_convolution_takes_the_dense_change():
    check(GROUPED, [Term(LoraAdapter(r(6, 2, 1, 1), r(2, 2, 3, 3)), 1.0)], r(1, 4, 6, 6, scale=1))


@pytest.mark.parametrize("layer", [LINEAR, CONV], ids=["linear", "conv"])
def test_loha_lokr_and_full_diff(layer):
    out, rest = layer.weight_shape[0], layer.weight_shape[1:]
    cols = 1
    for n in rest:
        cols *= n
    loha = LohaAdapter(r(out, 2), r(2, cols), r(out, 2), r(2, cols), alpha=1.0)
    # kron of a small factor with the rest gives the weight's shape (a conv kernel kept whole)
    if layer.conv_dims:
        lokr = LokrAdapter(w1=r(2, 1), w2=r(out // 2, *rest))
    else:
        lokr = LokrAdapter(w1=r(2, 2), w2=r(out // 2, cols // 2))
    diff = DiffAdapter(r(*layer.weight_shape))
    x = r(2, 4, 8, 8, scale=1) if layer.conv_dims else r(4, 8, scale=1)
    check(layer, [Term(loha, 0.6), Term(lokr, -0.9), Term(diff, 0.3)], x)


def test_bias_diff():
    check(LINEAR, [Term(DiffAdapter(r(12)), 0.5)], r(3, 8, scale=1), param="bias")
    check(CONV, [Term(DiffAdapter(r(6)), -1.5)], r(1, 4, 5, 5, scale=1), param="bias")


@pytest.mark.parametrize("on_input", [True, False], ids=["inputs", "outputs"])
def test_ia3_alone(on_input):
    check(LINEAR, [Term(Ia3Adapter(r(8 if on_input else 12), on_input), 0.7)], r(3, 8, scale=1))
    check(CONV, [Term(Ia3Adapter(r(4 if on_input else 6), on_input), -0.5)], r(1, 4, 5, 5, scale=1))


def test_slice_of_a_fused_weight_with_a_function():
    """Rows 4..8 of a (12, 8) weight, the change passed through a row swap first (Flux's norm_out kind)."""

    def swap(t):
        a, b = t.chunk(2, dim=0)
        return torch.cat((b, a), dim=0)

    weight, x = r(12, 8), r(3, 8, scale=1)
    adapter = LoraAdapter(r(4, 2), r(2, 8))
    change = swap(adapter.up @ adapter.down * 0.6)
    expected = weight.clone()
    expected[4:8] += change
    patch = BypassPatch([Term(adapter, 0.6)], LINEAR, Target("weight", (4, 4), swap))
    torch.testing.assert_close(patch.output(x, F.linear(x, weight), None), F.linear(x, expected))


@pytest.mark.parametrize(
    "adapter, named",
    [
        (LoraAdapter(r(12, 2), r(2, 8), dora_scale=r(12)), "DoRA"),
        (OftAdapter(r(3, 4, 4)), "OFT"),
        (GloraAdapter(r(8, 2), r(2, 8), r(12, 2), r(2, 8)), "GLoRA"),
        (SetAdapter(r(12, 8)), "set_weight"),
    ],
)
def test_weight_dependent_kinds_are_refused_by_name(adapter, named):
    why = refusal([Term(adapter, 1.0)], LINEAR, Target("weight"))
    assert why and named in why and "base weight" in why
    with pytest.raises(ValueError, match=named):
        BypassPatch([Term(adapter, 1.0)], LINEAR, Target("weight"))


def test_other_layers_and_mixes_are_refused():
    lora = Term(LoraAdapter(r(12, 2), r(2, 8)), 1.0)
    assert "not a Linear or convolution" in refusal([lora], None, Target("weight"))
    assert "(IA)3 together" in refusal([lora, Term(Ia3Adapter(r(8), True), 1.0)], LINEAR, Target("weight"))
    assert "only a full diff" in refusal([lora], LINEAR, Target("bias"))
    assert refusal([lora], LINEAR, Target("weight")) is None


def test_half_precision_activations_keep_their_dtype():
    adapter = LoraAdapter(r(12, 4), r(4, 8))
    x = r(2, 8, scale=1).to(torch.bfloat16)
    patch = BypassPatch([Term(adapter, 1.0)], LINEAR, Target("weight"))
    y = patch.output(x, torch.zeros(2, 12, dtype=torch.bfloat16), None)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), x.float() @ (adapter.up @ adapter.down).T, atol=0.05, rtol=0.02)
