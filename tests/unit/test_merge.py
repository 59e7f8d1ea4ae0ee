"""Merge methods against independent dense computations on tiny hand-made factors."""

import math

import pytest
import torch

from lora_foundry.lora_core.adapters import LoraAdapter
from lora_foundry.lora_core.merge.lowrank import (
    DenseDelta,
    Factors,
    dense_term,
    factored_fro,
    factored_svd,
    flatten_conv,
    unflatten_conv,
)
from lora_foundry.lora_core.merge.merge import (
    concat,
    dare,
    disjoint_merge,
    linear,
    merge_modules,
    svd_merge,
    ties,
)


def lora(out: int, rank: int, inp: int, seed: int) -> Factors:
    g = torch.Generator().manual_seed(seed)
    return Factors(torch.randn(out, rank, generator=g), torch.randn(rank, inp, generator=g))


def dense_sum(terms, weights) -> torch.Tensor:
    total = torch.zeros(terms[0].shape, dtype=torch.float64)
    for term, w in zip(terms, weights, strict=True):
        d = term.delta if isinstance(term, DenseDelta) else term.up @ term.down
        total += w * d.double()
    return total


def best_rank_k(matrix: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return u[:, :k] @ torch.diag(s[:k]) @ vh[:k]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


TERMS = [lora(24, 4, 18, 1), lora(24, 6, 18, 2), lora(24, 3, 18, 3)]
WEIGHTS = [0.7, -0.4, 1.3]


def test_concat_is_exact_and_stacks_ranks():
    up, down, info = concat(TERMS, WEIGHTS)
    assert up.shape == (24, 13) and down.shape == (13, 18)
    assert rel(up @ down, dense_sum(TERMS, WEIGHTS)) < 1e-6
    assert info.rank == 13 and info.rel_error == 0.0 and not info.approximate


def test_inputs_are_not_mutated():
    before = [(t.up.clone(), t.down.clone()) for t in TERMS]
    concat(TERMS, WEIGHTS)
    svd_merge(TERMS, WEIGHTS, rank=5)
    ties(TERMS, WEIGHTS, rank=5, density=0.5)
    for (up, down), term in zip(before, TERMS, strict=True):
        assert torch.equal(up, term.up) and torch.equal(down, term.down)


@pytest.mark.parametrize("k", [1, 4, 8])
def test_svd_merge_matches_dense_truncated_svd(k):
    exact = dense_sum(TERMS, WEIGHTS)
    up, down, info = svd_merge(TERMS, WEIGHTS, rank=k)
    optimum = best_rank_k(exact, k)
    ours_err = rel(up @ down, exact)
    best_err = rel(optimum, exact)
    assert up.shape == (24, k) and down.shape == (k, 18)
    assert abs(ours_err - best_err) <= 1e-4 * best_err
    assert abs(info.rel_error - best_err) <= 1e-4 * best_err
    s = torch.linalg.svdvals(exact)
    assert math.isclose(info.energy_kept, float((s[:k] ** 2).sum() / (s**2).sum()), rel_tol=1e-5)
    assert rel(up @ down, optimum) < 1e-4


@pytest.mark.parametrize("k", [13, 40])
def test_svd_merge_exact_at_full_rank(k):
    up, down, info = svd_merge(TERMS, WEIGHTS, rank=k)
    assert up.shape[1] == 13  # never more than the total rank
    assert rel(up @ down, dense_sum(TERMS, WEIGHTS)) < 1e-5
    assert info.rel_error < 1e-6 and info.energy_kept == pytest.approx(1.0)


def test_svd_merge_rank_above_total_caps_at_layer_dims():
    small = [lora(5, 4, 3, 7), lora(5, 4, 3, 8)]
    up, down, _ = svd_merge(small, [1.0, 1.0], rank=8)
    assert up.shape == (5, 3) and down.shape == (3, 3)


def test_svd_merge_casts_to_requested_dtype():
    half = [Factors(t.up.half(), t.down.half()) for t in TERMS]
    up, down, _ = svd_merge(half, WEIGHTS, rank=4)
    assert up.dtype == down.dtype == torch.float16
    up, down, _ = svd_merge(half, WEIGHTS, rank=4, dtype=torch.bfloat16)
    assert up.dtype == torch.bfloat16


def test_svd_merge_with_dense_term_matches_dense_svd():
    g = torch.Generator().manual_seed(5)
    terms = [TERMS[0], dense_term(torch.randn(24, 18, generator=g) * 0.1)]
    exact = dense_sum(terms, [1.0, 0.5])
    up, down, info = svd_merge(terms, [1.0, 0.5], rank=6)
    assert info.dense
    assert abs(rel(up @ down, exact) - rel(best_rank_k(exact, 6), exact)) < 1e-4


def test_linear_matches_independent_weighted_factor_average():
    terms = [lora(10, 3, 7, 11), lora(10, 3, 7, 12)]
    weights = [0.5, -2.0]
    up_ref = math.sqrt(0.5) * terms[0].up - math.sqrt(2.0) * terms[1].up
    down_ref = math.sqrt(0.5) * terms[0].down + math.sqrt(2.0) * terms[1].down
    up, down, info = linear(terms, weights)
    assert torch.allclose(up @ down, up_ref @ down_ref, atol=1e-5)
    assert info.approximate and info.rank == 3
    assert info.rel_error == pytest.approx(rel(up_ref @ down_ref, dense_sum(terms, weights)), rel=1e-4)


def test_linear_single_lora_is_exact():
    up, down, info = linear([TERMS[0]], [0.3])
    assert rel(up @ down, 0.3 * TERMS[0].up @ TERMS[0].down) < 1e-6
    assert info.rel_error < 1e-6


def test_linear_refuses_unequal_ranks_and_names_them():
    with pytest.raises(ValueError, match=r"ranks \[4, 6, 3\].*'concat'.*'svd'"):
        linear(TERMS, WEIGHTS)


@pytest.mark.parametrize("method", [concat, linear])
def test_factor_methods_refuse_dense_terms(method):
    with pytest.raises(ValueError, match="dense delta"):
        method([TERMS[0], dense_term(torch.zeros(24, 18))], [1.0, 1.0])


def reference_ties(deltas, weights, density):
    """TIES written out element by element (trim, elect by total, disjoint mean)."""
    trimmed = []
    for d in deltas:
        k = int(density * d.numel())
        threshold = d.abs().flatten().sort(descending=True).values[k - 1]
        trimmed.append(torch.where(d.abs() >= threshold, d, torch.zeros_like(d)))
    out = torch.zeros_like(deltas[0])
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            values = [t[i, j].item() for t in trimmed]
            sign = 1.0 if sum(values) >= 0 else -1.0
            kept = [
                w * v for v, w in zip(values, weights, strict=True) if v != 0 and math.copysign(1, v) == sign
            ]
            out[i, j] = sum(kept) / max(1, len(kept))
    return out


def test_ties_matches_elementwise_reference():
    deltas = [(t.up @ t.down) for t in TERMS]
    target = reference_ties(deltas, WEIGHTS, 0.4)
    up, down, info = ties(TERMS, WEIGHTS, rank=18, density=0.4)
    assert rel(up @ down, target) < 1e-5  # full rank: only the TIES target is left
    assert info.dense and info.rank == 18
    up, down, info = ties(TERMS, WEIGHTS, rank=3, density=0.4)
    assert abs(rel(up @ down, target) - rel(best_rank_k(target, 3), target)) < 1e-4


def test_disjoint_merge_frequency_election():
    stack = torch.tensor([[[1.0]], [[1.0]], [[-5.0]]])
    assert disjoint_merge(stack, [1, 1, 1], "total").item() == -5.0
    assert disjoint_merge(stack, [1, 1, 1], "frequency").item() == 1.0


def test_dare_linear_rescales_kept_entries_and_keeps_density():
    delta = torch.ones(200, 100)
    term = dense_term(delta)
    up, down, info = dare([term], [1.0], rank=100, density=0.3, seed=4, elect_sign=False)
    result = up.double() @ down.double()
    kept = result.abs() > 0.5
    assert float(kept.double().mean()) == pytest.approx(0.3, abs=0.01)
    assert torch.allclose(result[kept], torch.full_like(result[kept], 1 / 0.3), rtol=1e-4)
    assert result[~kept].abs().max() < 1e-4
    assert info.rank == 100


def test_dare_is_reproducible_by_seed_and_unbiased():
    deltas = [dense_term(torch.randn(60, 50, generator=torch.Generator().manual_seed(i))) for i in range(2)]
    a = dare(deltas, [1.0, 1.0], rank=50, density=0.5, seed=9, elect_sign=False)
    b = dare(deltas, [1.0, 1.0], rank=50, density=0.5, seed=9, elect_sign=False)
    c = dare(deltas, [1.0, 1.0], rank=50, density=0.5, seed=10, elect_sign=False)
    assert torch.equal(a.up, b.up) and not torch.equal(a.up, c.up)
    mean = (
        sum(
            (lambda m: m.up.double() @ m.down.double())(
                dare(deltas, [1.0, 1.0], rank=50, density=0.5, seed=s, elect_sign=False)
            )
            for s in range(40)
        )
        / 40
    )
    assert rel(mean, dense_sum(deltas, [1.0, 1.0])) < 0.25  # E[dare] = plain sum


def test_dare_ties_density_one_equals_ties_density_one():
    a = dare(TERMS, WEIGHTS, rank=18, density=1.0, seed=0, elect_sign=True)
    b = ties(TERMS, WEIGHTS, rank=18, density=1.0)
    assert rel(a.up @ a.down, b.up @ b.down) < 1e-5


@pytest.mark.parametrize(
    "call, field",
    [
        (lambda: svd_merge([], [], rank=2), "terms is empty"),
        (lambda: svd_merge(TERMS, WEIGHTS, rank=0), "rank must be a positive integer, got 0"),
        (lambda: svd_merge(TERMS, WEIGHTS, rank=-3), "got -3"),
        (lambda: svd_merge(TERMS, [1.0], rank=2), "weights has 1 entries for 3 terms"),
        (lambda: ties(TERMS, WEIGHTS, rank=2, density=0.0), r"density must be in \(0, 1\], got 0.0"),
        (lambda: dare(TERMS, WEIGHTS, rank=2, density=1.5, seed=0), "got 1.5"),
        (lambda: ties(TERMS, WEIGHTS, rank=2, density=0.5, majority_sign="most"), "majority_sign"),
        (lambda: concat([TERMS[0], lora(24, 2, 19, 0)], [1, 1]), r"term 1 has shape .* \(24, 19\)"),
        (lambda: concat([TERMS[0], torch.zeros(3)], [1, 1]), "wrap it as Factors"),
    ],
)
def test_bad_arguments_name_the_field(call, field):
    with pytest.raises(ValueError, match=field):
        call()


def test_factors_check_their_shapes():
    with pytest.raises(ValueError, match="rank mismatch"):
        Factors(torch.zeros(4, 2), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="flatten_conv"):
        Factors(torch.zeros(4, 2, 1, 1), torch.zeros(2, 5, 3, 3))


def test_conv_flatten_round_trip_3x3_down_1x1_up():
    up4 = torch.randn(8, 2, 1, 1)
    down4 = torch.randn(2, 5, 3, 3)
    factors = flatten_conv(up4, down4)
    assert factors.up.shape == (8, 2) and factors.down.shape == (2, 45) and factors.kernel == (3, 3)
    up, down = unflatten_conv(factors)
    assert torch.equal(up, up4) and torch.equal(down, down4)
    # The flattened product is the conv weight delta flattened, as kohya computes it.
    conved = torch.nn.functional.conv2d(down4.permute(1, 0, 2, 3), up4).permute(1, 0, 2, 3)
    assert torch.allclose(factors.up @ factors.down, conved.flatten(1), atol=1e-5)
    with pytest.raises(ValueError, match="must be 1x1"):
        flatten_conv(torch.randn(8, 2, 3, 3), down4)


def test_factored_svd_and_fro_match_dense():
    t = TERMS[1]
    svd = factored_svd(t.up, t.down)
    assert torch.allclose(svd.s[:6].float(), torch.linalg.svdvals(t.up @ t.down)[:6], rtol=1e-4)
    assert factored_fro(t.up, t.down) == pytest.approx(float((t.up @ t.down).norm()), rel=1e-5)


def test_merge_modules_handles_missing_modules_conv_and_reports():
    conv_a = flatten_conv(torch.randn(8, 2, 1, 1), torch.randn(2, 5, 3, 3))
    conv_b = flatten_conv(torch.randn(8, 3, 1, 1), torch.randn(3, 5, 3, 3))
    per_module = {
        "lora_unet_a": [TERMS[0], TERMS[1]],
        "lora_unet_b": [None, TERMS[2]],
        "lora_unet_conv": [conv_a, conv_b],
        "lora_unet_none": [None, None],
    }
    steps = []
    result = merge_modules(
        per_module, [1.0, 0.5], "svd", rank=4, conv_rank=2, on_step=lambda i, n: steps.append((i, n))
    )
    assert set(result.modules) == {"lora_unet_a", "lora_unet_b", "lora_unet_conv"}
    assert result.empty == ("lora_unet_none",)
    a = result.modules["lora_unet_a"]
    assert isinstance(a, LoraAdapter) and a.alpha == 4.0 and a.up.shape == (24, 4)
    b = result.modules["lora_unet_b"]
    assert b.alpha == 3.0 and rel(b.up @ b.down, 0.5 * TERMS[2].up @ TERMS[2].down) < 1e-5
    conv = result.modules["lora_unet_conv"]
    assert conv.up.shape == (8, 2, 1, 1) and conv.down.shape == (2, 5, 3, 3) and conv.alpha == 2.0
    assert result.reports["lora_unet_b"].n_terms == 1 and result.reports["lora_unet_a"].rank == 4
    assert steps[-1] == (4, 4)


def test_merge_modules_errors_name_the_module():
    with pytest.raises(ValueError, match="module 'm': .*method 'linear' needs equal ranks"):
        merge_modules({"m": TERMS[:2]}, [1.0, 1.0], "linear")
    with pytest.raises(ValueError, match="method must be one of"):
        merge_modules({"m": TERMS[:2]}, [1.0, 1.0], "average", rank=2)
    with pytest.raises(ValueError, match="module 'm' has 2 entries for 3 weights"):
        merge_modules({"m": TERMS[:2]}, [1.0, 1.0, 1.0], "concat")
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        merge_modules({"m": TERMS[:2]}, [1.0, 1.0], "svd")
    with pytest.raises(ValueError, match="density"):
        merge_modules({"m": TERMS[:2]}, [1.0, 1.0], "ties", rank=2, density=0)
    with pytest.raises(ValueError, match="weights is empty"):
        merge_modules({}, [], "concat")


def test_merge_modules_dare_seed_is_per_module_and_stable():
    per_module = {"x": [TERMS[0], TERMS[1]], "y": [TERMS[0], TERMS[1]]}
    one = merge_modules(per_module, [1.0, 1.0], "dare_ties", rank=5, density=0.5, seed=3)
    two = merge_modules(
        dict(reversed(list(per_module.items()))), [1.0, 1.0], "dare_ties", rank=5, density=0.5, seed=3
    )
    assert torch.equal(one.modules["x"].up, two.modules["x"].up)
    assert not torch.equal(one.modules["x"].up, one.modules["y"].up)
