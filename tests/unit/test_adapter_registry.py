"""The adapter registry (issue #18): one module per kind, one list that parsing, fit errors, apply,
plain-sum checks and messages go through, and the rotation math OFT, BOFT and PEFT OFT share."""

import importlib
import typing
from pathlib import Path

import pytest
import torch

from lora_foundry.lora_core import adapters
from lora_foundry.lora_core.adapters import registry, rotation
from lora_foundry.lora_core.adapters.base import Bypass, Extreme
from lora_foundry.lora_core.apply.bypass import BypassPatch, Layer, Target, refusal
from lora_foundry.lora_core.apply.extremes import Limit, extreme_changes
from lora_foundry.lora_core.apply.patching import Term
from lora_foundry.lora_core.files.formats import parse_lora

HELPERS = {"__init__", "base", "bounds", "dora", "registry", "rotation"}  # modules that are not a kind


def kind_modules():
    folder = Path(adapters.__file__).parent
    return sorted(p.stem for p in folder.glob("*.py") if p.stem not in HELPERS)


def test_every_kind_module_is_registered_once_and_every_record_has_a_kind():
    registered = [kind for kind in registry.KINDS]
    found = [importlib.import_module(f"{adapters.__name__}.{name}").KIND for name in kind_modules()]
    assert sorted(id(k) for k in found) == sorted(id(k) for k in registered)
    assert set(typing.get_args(adapters.Adapter)) == {kind.record for kind in registered}
    assert len({kind.record for kind in registered}) == len(registered)


def test_parse_order_is_comfyuis_override_order():
    order = [kind.record.__name__ for kind in registry.PARSE_ORDER]
    assert order == ["SetAdapter", "DiffAdapter", "LoraAdapter", "LohaAdapter", "LokrAdapter", "GloraAdapter",
                     "OftAdapter", "BoftAdapter", "OftV2Adapter", "Ia3Adapter"]  # fmt: skip


def test_a_suffix_shared_by_two_kinds_means_the_same_role():
    table = registry.suffix_roles()
    for kind in registry.KINDS:
        for suffix, role in kind.suffixes.items():
            assert table[suffix] == (kind.family, role)


def g(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


ONE_MODULE = {  # keys of one module "m" in each kind's layout, for a (8, 6) weight
    "LoraAdapter": {"m.lora_up.weight": g(8, 2), "m.lora_down.weight": g(2, 6)},
    "LohaAdapter": {f"m.hada_{n}": g(*s) for n, s in
                    (("w1_a", (8, 2)), ("w1_b", (2, 6)), ("w2_a", (8, 2)), ("w2_b", (2, 6)))},
    "LokrAdapter": {"m.lokr_w1": g(2, 2), "m.lokr_w2": g(4, 3)},
    "GloraAdapter": {"m.a1.weight": g(6, 2), "m.a2.weight": g(2, 6), "m.b1.weight": g(8, 2), "m.b2.weight": g(2, 6)},
    "OftAdapter": {"m.oft_blocks": g(2, 4, 4)},
    "BoftAdapter": {"m.oft_blocks": g(2, 2, 4, 4)},
    "OftV2Adapter": {"m.oft_R.weight": g(2, 3)},
    "Ia3Adapter": {"m.weight": g(6), "m.on_input": torch.tensor(True)},
    "DiffAdapter": {"m.diff": g(8, 6)},
    "SetAdapter": {"m.set_weight": g(8, 6)},
}  # fmt: skip


@pytest.mark.parametrize("record", sorted(ONE_MODULE))
def test_each_kind_parses_applies_and_checks_fit_through_the_registry(record):
    parsed = parse_lora(ONE_MODULE[record], "one.safetensors")
    adapter = parsed.modules["m"]
    assert type(adapter).__name__ == record and parsed.unused_keys == ()
    kind = registry.kind_of(adapter)
    weight = g(8, 6, seed=9)
    out = registry.apply(adapter, weight, 0.5)
    assert out.shape == weight.shape and not torch.equal(out, weight)
    assert registry.shape_error(adapter, (8, 6)) is None
    assert registry.shape_error(adapter, (7, 5)) is not None  # a weight it cannot fit is named
    assert registry.is_linear(adapter) == (kind.delta is not None)
    if kind.delta is not None:  # a plain sum: apply is weight + strength * delta
        torch.testing.assert_close(out, weight + 0.5 * registry.delta(adapter, (8, 6)))


def test_precedence_set_weight_over_lora_and_glora_over_oft():
    both = {**ONE_MODULE["LoraAdapter"], **ONE_MODULE["SetAdapter"]}
    assert type(parse_lora(both).modules["m"]).__name__ == "SetAdapter"
    both = {**ONE_MODULE["OftAdapter"], **ONE_MODULE["GloraAdapter"]}
    parsed = parse_lora(both)
    assert type(parsed.modules["m"]).__name__ == "GloraAdapter" and parsed.unused_keys == ("m.oft_blocks",)


def test_messages_list_every_kind_from_the_registry():
    listed = registry.names()
    assert len(listed) == len(registry.KINDS) - 1  # LyCORIS and PEFT OFT share one name
    refused = registry.not_a_plain_sum()
    assert refused[0] == "DoRA"
    assert set(refused[1:]) == {k.name for k in registry.KINDS if k.delta is None}
    assert set(registry.dense_sums()) == {"LoHa", "LoKr", "full diff"}
    assert registry.either(["a"]) == "a" and registry.either(["a", "b", "c"]) == "a, b or c"


def test_unknown_record_is_named():
    with pytest.raises(TypeError, match="not an adapter record: str"):
        registry.apply("x", torch.zeros(2, 2))


def test_cayley_is_orthogonal_and_the_neumann_series_approaches_it():
    s = rotation.skew(g(3, 4, 4) * 0.01)
    eye = torch.eye(4)
    exact = rotation.cayley(s, eye)
    torch.testing.assert_close(exact @ exact.transpose(1, 2), eye.expand(3, 4, 4), atol=1e-5, rtol=0)
    # (I + S)(I + S + S^2 + S^3) is the series cut after S^3: an error of order 2|S|^4 (~1e-5 here)
    torch.testing.assert_close(rotation.cayley_neumann(s), exact, atol=2e-5, rtol=0)
    assert not torch.allclose(rotation.cayley_neumann(s * 30), rotation.cayley(s * 30, eye), atol=2e-5)


def test_norm_bound_scales_only_a_larger_skew_part():
    s = rotation.skew(g(2, 3, 3))
    norm = torch.norm(s).item()
    assert torch.equal(rotation.bounded(s, 0.0), s) and torch.equal(rotation.bounded(s, norm * 2), s)
    assert torch.norm(rotation.bounded(s, norm / 4)).item() == pytest.approx(norm / 4, rel=1e-5)


def test_a_lora_up_that_is_no_matrix_of_its_rank_does_not_fit():
    # Found by the file fuzzer: up (4, 2, 2) with down (2, 3) passed the fit check and then failed in
    # the patch with a bare shape error.
    odd = adapters.LoraAdapter(up=g(4, 2, 2), down=g(2, 3))
    assert "is not (outputs, rank)" in registry.shape_error(odd, (4, 3))
    assert (
        registry.shape_error(adapters.LoraAdapter(up=g(4, 2, 1, 1), down=g(2, 3, 3, 3)), (4, 3, 3, 3)) is None
    )


def test_every_kind_says_how_bypass_and_the_overflow_check_treat_it():
    """What apply/bypass.py and apply/extremes.py read from each kind, stated by every kind."""
    labels = [kind.bypass.label for kind in registry.KINDS]
    assert all(labels) and len(set(labels)) == len(labels)
    for kind in registry.KINDS:
        assert isinstance(kind.bypass, Bypass), kind.name
        on_activations = not kind.bypass.weight_dependent and kind.bypass.channel_factor is None
        # bypass builds a summing kind's change from its delta, and the overflow check judges it
        assert not on_activations or kind.delta is not None, kind.name
        assert kind.delta is None or isinstance(kind.extreme, Extreme), kind.name
        assert kind.extreme is None or callable(kind.extreme.bound), kind.name


@pytest.mark.parametrize("record", sorted(ONE_MODULE))
def test_each_kind_runs_in_bypass_mode_or_is_refused_by_its_label(record):
    adapter = parse_lora(ONE_MODULE[record]).modules["m"]
    kind = registry.kind_of(adapter)
    weight, x = g(8, 6, seed=3), g(5, 6, seed=4)
    terms, layer = [Term(adapter, 0.7)], Layer((8, 6))
    if kind.bypass.weight_dependent:
        assert kind.bypass.label in refusal(terms, layer, Target("weight"))
        return
    assert refusal(terms, layer, Target("weight")) is None
    patch = BypassPatch(terms, layer, Target("weight"))
    x_in = patch.scale_input(x) if patch.scales_input else x
    out = patch.output(x, torch.nn.functional.linear(x_in, weight), None)
    expected = torch.nn.functional.linear(x, registry.apply(adapter, weight, 0.7))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("record", sorted(ONE_MODULE))
def test_the_overflow_check_names_each_judged_kind_with_its_largest_change(record):
    adapter = parse_lora(ONE_MODULE[record]).modules["m"]
    kind = registry.kind_of(adapter)
    found = extreme_changes([("m", adapter, 2.0, (8, 6))], Limit(1e-6, "tiny"))
    if kind.extreme is None:  # its change depends on the weight: not judged
        assert found == []
        return
    # the change at strength 1, from apply on a zero weight: max |apply(0) - 0|
    largest = float(registry.apply(adapter, torch.zeros(8, 6), 1.0).abs().max())
    scaled = largest * (2.0 if kind.extreme.scaled else 1.0)
    assert found == [("m", pytest.approx(scaled, rel=1e-5))]
    bound = kind.extreme.bound(adapter)
    assert bound is None or bound >= largest * (1 - 1e-6)
    assert extreme_changes([("m", adapter, 2.0, (8, 6))], Limit(scaled * 1.01, "roomy")) == []
