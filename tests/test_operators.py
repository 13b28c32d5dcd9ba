"""The merge operators against independent float64 references written from the papers'
definitions, with mergekit 0.1.5's conventions (see merging/operators/*.py docstrings).

The operators are run on float64 inputs (so they compute in float64) and compared with
the references at 1e-12; float32 and half-precision inputs are checked separately.

Bit-level agreement with mergekit itself was checked outside this suite (which must not
import mergekit): 190 cases (every method here, densities 0-1, negative and zero
weights, normalize/rescale/lambda/int8_mask, gamma with density + gamma > 1, magnitude
ties from quantised values, 0-d/1-d/3-d tensors, bfloat16/float16 inputs, slerp at
t in {0, .3, .5, .77, 1} on 1.2M-element tensors, near-parallel, antiparallel and zero
inputs) were saved with torch.save, run through
``mergekit.merge_methods.api.merge_tensors(..., dtype=float32 or float64)`` in
/opt/mergekit-venv (same torch 2.13.0) and through ``METHODS[...].merge`` here: all 190
outputs were torch.equal. DARE (density < 1) was compared by statistics instead (fraction
of entries left at the base, mean/std/L1 of the merged delta): equal within noise.
"""
from __future__ import annotations

import math

import pytest
import torch

from merging.operators import METHODS, REQUIRED, UnknownMethodError, get_method
from merging.operators.slerp import slerp
from merging.operators import sparsify
from merging.operators.sparsify import kth_largest, top_k_mask


def applied(rule):
    """A sparsification rule (which sees only |delta| and returns a Trim) as a function of
    the delta: what it keeps of it."""
    return lambda delta, *args, **kwargs: rule(delta.abs(), *args, **kwargs).apply_(delta.clone())


magnitude, magnitude_outliers, random = map(applied, (sparsify.magnitude, sparsify.magnitude_outliers,
                                                      sparsify.random))

TIGHT = dict(rtol=1e-12, atol=1e-12)


def randn(*shape: int, seed: int, scale: float = 1.0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def family(shape=(24, 20), n=3, seed=0, spread=0.05, dtype=torch.float64):
    """A base and n fine-tune-like variants of it."""
    base = randn(*shape, seed=seed)
    return base.to(dtype), [(base + randn(*shape, seed=seed + 1 + i, scale=spread)).to(dtype)
                            for i in range(n)]


def merge(method: str, base, tensors, generator=None, **params):
    """Call a registered method like the engine does: defaults filled, per-model lists."""
    m = METHODS[method]
    full = {k: v for k, v in m.global_params.items() if v is not REQUIRED}
    full |= {k: [v] * len(tensors) for k, v in m.model_params.items() if v is not REQUIRED}
    full |= params
    return m.merge(base=base, tensors=tensors, generator=generator, **full)


# ----------------------------------------------------------------------------------------
# References (float64, element lists and python sorting; no code shared with the operators)

def ref_keep(delta: torch.Tensor, method: str, density: float, gamma: float = 0.0,
             mask: torch.Tensor | None = None) -> torch.Tensor:
    """0/1 mask of the entries a sparsification keeps.

    TIES: the top-k by magnitude, k = max(1, int(density * n)). Breadcrumbs: ranked by
    magnitude, drop the int(gamma * n) largest and then the smallest until int(density * n)
    remain (fewer outliers dropped when density + gamma > 1). DARE: the given mask.
    """
    n = delta.numel()
    if method == "random":
        return mask.reshape(-1).to(torch.float64)
    mags = delta.reshape(-1).abs().tolist()
    ascending = sorted(range(n), key=lambda i: mags[i])
    if method == "magnitude":
        k = 0 if density <= 0 else max(1, int(density * n))
        kept = ascending[n - k:] if k else []
    else:
        keep_n, top_n = int(density * n), int(gamma * n)
        start = max(0, n - keep_n - top_n)
        kept = ascending[start:start + keep_n]
    keep = torch.zeros(n, dtype=torch.float64)
    keep[kept] = 1.0
    return keep


def ref_sparsify(delta, method, density, gamma=0.0, rescale=False, mask=None):
    if method is None or density >= 1:
        return delta.clone()
    kept = delta.reshape(-1) * ref_keep(delta, method, density, gamma, mask)
    before, after = delta.abs().sum().item(), kept.abs().sum().item()
    if rescale and before >= 1e-7 and after >= 1e-7:
        kept = kept * (before / after)  # the L1 norm of the delta is kept
    return kept.reshape(delta.shape)


def ref_task_arithmetic(base, tensors, weights, *, sparsification=None, consensus=False,
                        density=None, gamma=None, rescale=False, normalize=False, lam=1.0,
                        masks=None):
    """base + lam * sum_i w_i s(delta_i) [/ divisor]; with consensus only the terms whose
    sign equals the sign of sum_i w_i s(delta_i) (0 counts as +) enter, and the divisor is
    the sum of their weights (0 -> 1); without, the divisor is sum_i w_i (~0 -> 1)."""
    n = len(tensors)
    density = density or [1.0] * n
    gamma = gamma or [0.0] * n
    masks = masks or [None] * n
    weighted = [w * ref_sparsify(x - base, sparsification, d, g, rescale, m)
                for x, w, d, g, m in zip(tensors, weights, density, gamma, masks)]
    total = torch.zeros_like(base)
    for t in weighted:
        total += t
    if consensus:
        elected = torch.where(total >= 0, 1.0, -1.0).to(base.dtype)
        mixed, divisor = torch.zeros_like(base), torch.zeros_like(base)
        for t, w in zip(weighted, weights):
            agrees = t * elected > 0
            mixed += torch.where(agrees, t, 0.0)
            divisor += agrees.to(torch.float64) * w
        divisor[divisor == 0] = 1.0
    else:
        mixed = total
        divisor = sum(weights)
        divisor = 1.0 if abs(divisor) < 1e-8 else divisor
    if normalize:
        mixed = mixed / divisor
    return base + lam * mixed


def ref_slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Shoemake's slerp on the flattened tensors; lerp when |cos| > 0.9995; norms <= 1e-8
    count as 1 (mergekit's guard for zero tensors)."""
    x, y = a.double().reshape(-1), b.double().reshape(-1)
    nx, ny = x.norm().item(), y.norm().item()
    nx, ny = (nx if nx > 1e-8 else 1.0), (ny if ny > 1e-8 else 1.0)
    cos = max(-1.0, min(1.0, torch.dot(x, y).item() / (nx * ny)))
    if abs(cos) > 0.9995:
        out = (1 - t) * x + t * y
    else:
        theta = math.acos(cos)
        out = (math.sin((1 - t) * theta) * x + math.sin(t * theta) * y) / math.sin(theta)
    return out.reshape(a.shape)


# ----------------------------------------------------------------------------------------
# Registry

EXPECTED = {  # name: (model params, global params, needs_base, random, min, max) = mergekit's
    "linear": ({"weight": REQUIRED}, {"normalize": True}, False, False, 1, None),
    "task_arithmetic": ({"weight": REQUIRED, "density": 1.0},
                        {"int8_mask": False, "normalize": False, "rescale": False, "lambda": 1.0},
                        True, False, 1, None),
    "ties": ({"weight": REQUIRED, "density": 1.0},
             {"int8_mask": False, "normalize": True, "rescale": False, "lambda": 1.0},
             True, False, 1, None),
    "dare_ties": ({"weight": REQUIRED, "density": 1.0},
                  {"int8_mask": False, "normalize": False, "rescale": True, "lambda": 1.0},
                  True, True, 1, None),
    "dare_linear": ({"weight": REQUIRED, "density": 1.0},
                    {"int8_mask": False, "normalize": False, "rescale": True, "lambda": 1.0},
                    True, True, 1, None),
    "breadcrumbs": ({"weight": REQUIRED, "density": 1.0, "gamma": 0.01},
                    {"int8_mask": False, "normalize": False, "rescale": False, "lambda": 1.0},
                    True, False, 1, None),
    "breadcrumbs_ties": ({"weight": REQUIRED, "density": 1.0, "gamma": 0.01},
                         {"int8_mask": False, "normalize": False, "rescale": False, "lambda": 1.0},
                         True, False, 1, None),
    "slerp": ({}, {"t": REQUIRED}, True, False, 1, 1),
    "passthrough": ({"scale": None}, {}, False, False, 1, 1),
    "model_stock": ({}, {"filter_wise": False}, True, False, 2, None),
    "nuslerp": ({"weight": REQUIRED}, {"nuslerp_row_wise": False, "nuslerp_flatten": True}, False, False, 2, 2),
    "multislerp": ({"weight": REQUIRED}, {"normalize_weights": True, "eps": 1e-8}, False, False, 1, None),
    "karcher": ({}, {"max_iter": 10, "tol": 1e-5}, False, False, 1, None),
    "nearswap": ({}, {"t": REQUIRED}, True, False, 1, 1),
    "arcee_fusion": ({}, {}, True, True, 1, 1),
    "ram": ({}, {"epsilon": 1e-5}, True, False, 1, None),
    "ramplus_tl": ({}, {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}, True, False, 1, None),
    "della": ({"weight": REQUIRED, "density": 1.0, "epsilon": 0.15},
              {"int8_mask": False, "normalize": True, "rescale": True, "lambda": 1.0}, True, True, 1, None),
    "della_linear": ({"weight": REQUIRED, "density": 1.0, "epsilon": 0.15},
                     {"int8_mask": False, "normalize": False, "rescale": True, "lambda": 1.0}, True, True, 1, None),
    "sce": ({}, {"int8_mask": False, "select_topk": 1.0}, True, False, 1, None),
}


def test_registry_matches_mergekit_parameters_and_defaults():
    assert set(METHODS) == set(EXPECTED)
    for name, (model, glob, needs_base, rand, lo, hi) in EXPECTED.items():
        m = METHODS[name]
        assert m.name == name
        assert dict(m.model_params) == model, name
        assert dict(m.global_params) == glob, name
        assert (m.needs_base, m.random, m.min_models, m.max_models) == (needs_base, rand, lo, hi), name


def test_get_method_and_unknown_name():
    assert get_method("ties") is METHODS["ties"]
    with pytest.raises(KeyError) as info:
        get_method("tie")
    assert "tie" in str(info.value) and "breadcrumbs_ties" in str(info.value)
    assert isinstance(info.value, UnknownMethodError)


# ----------------------------------------------------------------------------------------
# Sparsification

def test_magnitude_keeps_top_k():
    delta = randn(50, 40, seed=1)
    for density in [0.0, 1e-4, 0.1, 0.37, 0.5, 0.999, 1.0]:
        for rescale in [False, True]:
            out = magnitude(delta, density, rescale=rescale)
            torch.testing.assert_close(out, ref_sparsify(delta, "magnitude", density, rescale=rescale), **TIGHT)
    assert (magnitude(delta, 1e-4) != 0).sum() == 1  # k = max(1, int(density * n))
    assert (magnitude(delta, 0.37) != 0).sum() == int(0.37 * 2000)


def test_magnitude_ties_at_the_threshold_are_broken_as_mergekit_breaks_them():
    """Values quantized as in bfloat16 sources tie a lot; the kept count is still exactly
    k, every entry above the threshold is kept, and the tied entries kept are those
    mergekit's unstable ``argsort(descending=True)`` puts first."""
    values = torch.round(randn(4000, seed=2).abs() * 4) / 4  # only a few distinct values
    for k in [1, 7, 1000, 2345, 3999, 4000]:
        mask = top_k_mask(values, k)
        expected = torch.zeros(4000, dtype=torch.bool)
        expected[torch.argsort(values, descending=True)[:k]] = True
        assert torch.equal(mask, expected), k
        assert int(mask.sum()) == k and bool(mask[values > values[mask].min()].all()), k


def test_magnitude_ties_match_mergekits_choice_not_a_stable_sorts():
    """|delta| = 2 at indices 0, 4, 5, 9, 10, 14, 15 and k = 5: mergekit 0.1.5 (torch
    2.13, CPU) kept 0, 4, 5, 14, 15 (recorded from its `sparsify.magnitude`); a stable sort
    would keep 0, 4, 5, 9, 10. (Tied to torch's CPU sort: a torch whose sort orders ties
    differently changes mergekit's choice too.)"""
    delta = (torch.arange(17) % 5).float() - 2.0
    kept = magnitude(delta, 5 / 17 + 1e-9) != 0
    assert kept.nonzero().flatten().tolist() == [0, 4, 5, 14, 15]


def test_breadcrumbs_drops_exactly_the_largest_gamma_fraction():
    n = 1000
    g = torch.Generator().manual_seed(3)
    ranks = torch.randperm(n, generator=g).to(torch.float64)  # magnitude rank of each entry
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
    delta = (ranks + 1) * signs
    out = magnitude_outliers(delta, 0.5, gamma=0.1)
    kept = ranks[out != 0]
    assert kept.numel() == 500 and kept.min() == 400 and kept.max() == 899  # drop top 100
    torch.testing.assert_close(out[out != 0], delta[out != 0], rtol=0, atol=0)
    # density + gamma > 1: fewer outliers go so that `density` is still kept
    kept = ranks[magnitude_outliers(delta, 0.95, gamma=0.1) != 0]
    assert kept.numel() == 950 and kept.max() == 949
    for density, gamma, rescale in [(0.3, 0.01, False), (0.3, 0.2, True), (0.0, 0.1, False), (0.6, 0.6, True)]:
        torch.testing.assert_close(magnitude_outliers(delta, density, gamma=gamma, rescale=rescale),
                                   ref_sparsify(delta, "magnitude_outliers", density, gamma, rescale), **TIGHT)


def test_dare_statistics_and_l1_rescale():
    delta = randn(1000, 1000, seed=4, dtype=torch.float32)
    for density in [0.1, 0.5, 0.9]:
        out = random(delta, density, rescale=True, generator=torch.Generator().manual_seed(0))
        kept = (out != 0).double().mean().item()
        assert abs(kept - density) < 5 * math.sqrt(density * (1 - density) / 1e6)
        # rescaled by the L1 ratio, which preserves the L1 norm exactly (not by 1/density)
        assert out.double().abs().sum().item() == pytest.approx(delta.double().abs().sum().item(), rel=1e-5)
        ratio = (out[out != 0] / delta[out != 0]).double()
        assert ratio.std().item() < 1e-5 and ratio.mean().item() != pytest.approx(1 / density, rel=1e-4)
    plain = random(delta, 0.5, rescale=False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(plain[plain != 0], delta[plain != 0])
    assert torch.equal(random(delta, 1.0, rescale=True), delta)
    assert not random(delta, 0.0, rescale=True).any()


# ----------------------------------------------------------------------------------------
# Task arithmetic family

CASES = [  # (weights, densities, extra global params)
    ([1.0, 0.5, 0.3], [0.5, 0.3, 0.9], {}),
    ([0.7, -0.4, 1.3], [0.2, 0.6, 1.0], {"normalize": True, "lambda": 0.8}),
    ([0.7, 0.4, 1.3], [0.1, 0.05, 0.33], {"normalize": False, "rescale": True}),
    ([0.5, 0.5, 0.0], [0.0, 0.5, 0.7], {"int8_mask": True}),
]
DETERMINISTIC = {  # name: (sparsification, consensus)
    "task_arithmetic": (None, False),
    "ties": ("magnitude", True),
    "breadcrumbs": ("magnitude_outliers", False),
    "breadcrumbs_ties": ("magnitude_outliers", True),
}


@pytest.mark.parametrize("name", sorted(DETERMINISTIC))
@pytest.mark.parametrize("case", range(len(CASES)))
def test_task_arithmetic_family_matches_reference(name, case):
    weights, density, extra = CASES[case]
    sparsification, consensus = DETERMINISTIC[name]
    base, xs = family(seed=10 + case)
    gamma = [0.01, 0.2, 0.6]
    params = dict(weight=weights, density=density, **extra)
    if sparsification == "magnitude_outliers":
        params["gamma"] = gamma
    out = merge(name, base, xs, **params)
    g = {**METHODS[name].global_params, **extra}
    ref = ref_task_arithmetic(base, xs, weights, sparsification=sparsification, consensus=consensus,
                              density=density, gamma=gamma, rescale=g["rescale"],
                              normalize=g["normalize"], lam=g["lambda"])
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, **TIGHT)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_matches_reference_given_the_same_draws(name):
    """One Bernoulli draw per model with density < 1, in model order, from the generator."""
    base, xs = family(seed=20)
    weights, density = [1.0, 0.6, -0.2], [0.3, 1.0, 0.7]
    out = merge(name, base, xs, generator=torch.Generator().manual_seed(7), weight=weights, density=density)
    g = torch.Generator().manual_seed(7)
    masks = [torch.bernoulli(torch.full_like(base, d), generator=g) if d < 1 else None for d in density]
    ref = ref_task_arithmetic(base, xs, weights, sparsification="random", consensus=name == "dare_ties",
                              density=density, rescale=True, masks=masks)
    torch.testing.assert_close(out, ref, **TIGHT)


def test_dare_is_deterministic_per_seed():
    base, xs = family(shape=(64, 64), seed=21, dtype=torch.float32)
    params = dict(weight=[1.0, 0.5, 0.5], density=[0.5, 0.5, 0.5])
    for name in ["dare_linear", "dare_ties"]:
        a = merge(name, base, xs, generator=torch.Generator().manual_seed(1), **params)
        b = merge(name, base, xs, generator=torch.Generator().manual_seed(1), **params)
        c = merge(name, base, xs, generator=torch.Generator().manual_seed(2), **params)
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_dare_linear_single_model_keeps_l1_of_delta():
    base, (x,) = family(shape=(300, 200), n=1, seed=22)
    out = merge("dare_linear", base, [x], generator=torch.Generator().manual_seed(0), weight=[1.0], density=[0.25])
    assert (out - base).abs().sum().item() == pytest.approx((x - base).abs().sum().item(), rel=1e-12)
    assert ((out - base) != 0).double().mean().item() == pytest.approx(0.25, abs=0.01)


def test_ties_all_zero_deltas_give_the_base():
    base, _ = family(n=1, seed=23)
    for name in ["ties", "task_arithmetic", "breadcrumbs_ties"]:
        out = merge(name, base, [base.clone(), base.clone()], weight=[1.0, 1.0], density=[0.5, 0.5], normalize=True)
        assert torch.equal(out, base)


def test_normalize_with_zero_weight_sum_divides_by_one():
    base, xs = family(n=2, seed=24)
    out = merge("task_arithmetic", base, xs, weight=[1.0, -1.0], normalize=True)
    torch.testing.assert_close(out, base + (xs[0] - base) - (xs[1] - base), **TIGHT)


def test_ties_density_one_equals_task_arithmetic_with_normalize_when_signs_agree():
    base, (x,) = family(n=1, seed=25)
    y = base + 2.5 * (x - base)  # every delta of y has the sign of x's
    ties = merge("ties", base, [x, y], weight=[0.3, 0.9], density=[1.0, 1.0])
    ta = merge("task_arithmetic", base, [x, y], weight=[0.3, 0.9], normalize=True)
    torch.testing.assert_close(ties, ta, **TIGHT)
    # single model: TIES at density 1 is just the model
    torch.testing.assert_close(merge("ties", base, [x], weight=[0.4]), x, **TIGHT)


def test_weight_changes_the_ties_sign_election():
    """Weights apply before the vote (mergekit issue #474)."""
    base = torch.zeros(3, dtype=torch.float64)
    a = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    b = torch.tensor([-1.5, -1.0, 2.0], dtype=torch.float64)
    out = merge("ties", base, [a, b], weight=[1.0, 1.0], normalize=True)
    assert out.tolist() == [-1.5, 1.0, 1.5]  # -1.5 wins; 1 - 1 = 0 is a tie, + wins; both +
    out = merge("ties", base, [a, b], weight=[2.0, 1.0], normalize=True)
    assert out.tolist() == [1.0, 1.0, (2.0 + 2.0) / 3.0]  # 2 - 1.5 > 0: a's sign wins now
    out = merge("ties", base, [a, b], weight=[2.0, 1.0], normalize=False)
    assert out.tolist() == [2.0, 2.0, 4.0]


def test_ties_pruned_entries_do_not_vote_or_count_in_divisor():
    base = torch.zeros(4, dtype=torch.float64)
    a = torch.tensor([4.0, 3.0, -0.1, 0.2], dtype=torch.float64)  # density 0.5 keeps 4, 3
    b = torch.tensor([-0.1, 1.0, -2.0, 0.3], dtype=torch.float64)  # keeps -2, 1
    out = merge("ties", base, [a, b], weight=[1.0, 1.0], density=[0.5, 0.5])
    assert out.tolist() == [4.0, 2.0, -2.0, 0.0]


def test_lambda_keyword_arrives_as_lambda_():
    base, xs = family(n=2, seed=26)
    half = merge("task_arithmetic", base, xs, weight=[1.0, 1.0], **{"lambda": 0.5})
    torch.testing.assert_close(half, base + 0.5 * ((xs[0] - base) + (xs[1] - base)), **TIGHT)


# ----------------------------------------------------------------------------------------
# Linear, slerp, passthrough

@pytest.mark.parametrize("normalize", [True, False])
def test_linear_matches_reference(normalize):
    _, xs = family(n=3, seed=30, spread=1.0)
    weights = [0.2, 0.5, -0.3]
    out = merge("linear", None, xs, weight=weights, normalize=normalize)
    ref = sum(w * x for w, x in zip(weights, xs)) / (sum(weights) if normalize else 1.0)
    torch.testing.assert_close(out, ref, **TIGHT)
    ignored = METHODS["linear"].merge(base=xs[0] * 7, tensors=xs, weight=weights, normalize=normalize)
    assert torch.equal(ignored, out)


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_slerp_matches_reference(t):
    a, b = randn(40, 30, seed=31), randn(40, 30, seed=32, scale=3.0)
    out = merge("slerp", a, [b], t=t)
    torch.testing.assert_close(out, ref_slerp(a, b, t), **TIGHT)
    if t in (0.0, 1.0):
        assert torch.equal(out, a if t == 0.0 else b)


def test_slerp_midpoint_of_orthogonal_unit_vectors():
    a = torch.tensor([1.0, 0.0], dtype=torch.float64)
    b = torch.tensor([0.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(slerp(a, b, 0.5), torch.tensor([0.5 ** 0.5] * 2, dtype=torch.float64), **TIGHT)
    # stays on the unit circle, unlike lerp
    for t in [0.1, 0.3, 0.7]:
        assert slerp(a, b, t).norm().item() == pytest.approx(1.0, abs=1e-12)


def test_slerp_near_parallel_antiparallel_and_zero_fall_back_safely():
    a = randn(50, seed=33)
    b = a + randn(50, seed=34, scale=1e-3)  # cos > 0.9995: lerp
    for other in [b, -a, 2.0 * a]:
        torch.testing.assert_close(slerp(a, other, 0.3), 0.7 * a + 0.3 * other, **TIGHT)
    zero = torch.zeros_like(a)  # norm 0 -> 1, cos 0, theta = pi / 2
    torch.testing.assert_close(slerp(zero, a, 0.3), math.sin(0.3 * math.pi / 2) * a, **TIGHT)
    torch.testing.assert_close(slerp(zero, a, 0.3), ref_slerp(zero, a, 0.3), **TIGHT)


def test_slerp_lerp_threshold_is_cos_0_9995():
    a = torch.tensor([1.0, 0.0], dtype=torch.float64)
    for cos, lerps in [(0.9996, True), (0.9994, False), (-0.9996, True)]:
        b = torch.tensor([cos, math.sqrt(1 - cos * cos)], dtype=torch.float64)
        lerp = 0.6 * a + 0.4 * b
        out = slerp(a, b, 0.4)
        torch.testing.assert_close(out, ref_slerp(a, b, 0.4), **TIGHT)
        assert ((out - lerp).abs().max().item() < 1e-15) == lerps  # slerp differs by ~1e-5


def test_slerp_large_tensor_is_reduced_in_chunks_correctly():
    a, b = randn(1500, 1000, seed=35), randn(1500, 1000, seed=36)  # > 1M elements
    torch.testing.assert_close(slerp(a, b, 0.4), ref_slerp(a, b, 0.4), **TIGHT)


def test_slerp_requires_exactly_one_other_model():
    a = randn(5, seed=37)
    with pytest.raises(ValueError):
        merge("slerp", a, [a, a], t=0.5)


def test_passthrough_and_scale():
    x = randn(6, 7, seed=38)
    assert torch.equal(merge("passthrough", None, [x]), x)
    torch.testing.assert_close(merge("passthrough", None, [x], scale=[0.5]), 0.5 * x, **TIGHT)
    assert torch.equal(merge("passthrough", None, [x], scale=[None]), x)
    with pytest.raises(ValueError):
        merge("passthrough", None, [x, x])


# ----------------------------------------------------------------------------------------
# Compute dtype

PARAMS = {
    "linear": dict(weight=[0.6, 0.4]),
    "task_arithmetic": dict(weight=[0.6, 0.4]),
    "ties": dict(weight=[0.6, 0.4], density=[0.5, 0.7]),
    "dare_ties": dict(weight=[0.6, 0.4], density=[0.5, 0.7]),
    "dare_linear": dict(weight=[0.6, 0.4], density=[0.5, 0.7]),
    "breadcrumbs": dict(weight=[0.6, 0.4], density=[0.5, 0.7], gamma=[0.05, 0.1]),
    "breadcrumbs_ties": dict(weight=[0.6, 0.4], density=[0.5, 0.7], gamma=[0.05, 0.1]),
    "slerp": dict(t=0.3),
    "passthrough": dict(scale=[0.5]),
    "model_stock": {}, "nuslerp": dict(weight=[0.6, 0.4]), "multislerp": dict(weight=[0.6, 0.4]), "karcher": {},
    "nearswap": dict(t=0.05),
    "arcee_fusion": dict(),
    "ram": dict(epsilon=0.03),
    "ramplus_tl": dict(r=0.5, alpha=1.0, epsilon=0.03),
    "della": dict(weight=[0.6, 0.4], density=[0.5, 0.7], epsilon=[0.2, 0.1]),
    "della_linear": dict(weight=[0.6, 0.4], density=[0.5, 0.7]),
    "sce": dict(select_topk=0.4),
}


def _run(name, base, xs):
    m = METHODS[name]
    xs = xs[:m.max_models] if m.max_models else xs
    gen = torch.Generator().manual_seed(0) if m.random else None
    return merge(name, base if m.needs_base else None, xs, generator=gen, **{
        k: (v[:len(xs)] if isinstance(v, list) else v) for k, v in PARAMS[name].items()})


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_float32(name, dtype):
    base, xs = family(n=2, seed=40, dtype=dtype)
    out = _run(name, base, xs)
    up = _run(name, base.float(), [x.float() for x in xs])
    assert out.dtype == torch.float32
    assert torch.equal(out, up)


@pytest.mark.parametrize("name", sorted(n for n, m in METHODS.items() if not m.random))
def test_float32_result_is_close_to_float64(name):
    """(DARE is left out: its Bernoulli draws depend on the dtype of the probabilities.)"""
    base, xs = family(n=2, seed=41)
    out32 = _run(name, base.float(), [x.float() for x in xs])
    out64 = _run(name, base, xs)
    assert out32.dtype == torch.float32 and out64.dtype == torch.float64
    torch.testing.assert_close(out32.double(), out64, rtol=1e-5, atol=1e-6)


def test_kth_largest_is_kthvalue():
    """The radix selection finds kthvalue's threshold on every kind of magnitudes: spread,
    few distinct values (ties), all zero, subnormal, one entry."""
    g = torch.Generator().manual_seed(1)
    for n in [1, 2, 7, 1000, 100_000]:
        kinds = {"spread": torch.randn(n, generator=g).abs(),
                 "quantised": torch.randint(0, 5, (n,), generator=g).float() * 0.25,
                 "zero": torch.zeros(n), "subnormal": torch.randn(n, generator=g).abs() * 1e-40}
        for kind, values in kinds.items():
            for k in sorted({1, max(1, n // 3), max(1, n // 2), n}):
                assert kth_largest(values, k) == torch.kthvalue(values, n - k + 1).values, (n, kind, k)
