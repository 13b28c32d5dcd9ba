"""DELLA (della, della_linear) and SCE against hand-computed values and float64 references
written from mergekit 0.1.5's definitions (see merging/operators/della.py and sce.py).

The random keep masks are checked three ways: the probabilities exactly (hand-computed
ranks), the merge exactly given the same draws from a fixed generator, and the keep
frequencies over many draws within bounds of five standard deviations.

Bit-level agreement with mergekit itself was checked outside this suite (which must not
import mergekit) by scripts/check_operators_mergekit.py: 92 single-tensor
della/della_linear/sce cases through mergekit 0.1.5's ``merge_tensors`` after
``torch.manual_seed(s)`` and through these operators with
``torch.Generator().manual_seed(s)`` were all torch.equal.
"""
from __future__ import annotations


import pytest
import torch

from merging.errors import RecipeError
from merging.operators import METHODS
from merging.operators import della
from merging.operators.della import keep_probabilities
from merging.operators.sce import high_variance_mask, model_weights
from tests.conftest import write_recipe
from tests.test_operators import TIGHT, applied, family, merge, ref_task_arithmetic

magprune = applied(della.magprune)

# ----------------------------------------------------------------------------------------
# DELLA keep probabilities and MAGPRUNE


def test_keep_probabilities_rise_linearly_with_the_magnitude_rank_per_row():
    # |.| ranks in row 0: 0.0 < 0.1 < 0.2 < 0.3 < 0.5; row 1 is ranked on its own.
    delta = torch.tensor([[0.3, -0.1, 0.0, 0.2, -0.5],
                          [-9.0, 1.0, 2.0, -3.0, 4.0]], dtype=torch.float64)
    probs = keep_probabilities(delta, density=0.5, epsilon=0.1)  # from 0.4 to 0.6, step 0.05
    expected = torch.tensor([[0.55, 0.45, 0.40, 0.50, 0.60],
                             [0.60, 0.40, 0.45, 0.50, 0.55]], dtype=torch.float64)
    torch.testing.assert_close(probs, expected, **TIGHT)
    # a 1-d tensor is one row; two equal magnitudes share the two ranks above 0.1's
    tied = keep_probabilities(torch.tensor([0.2, -0.2, 0.1], dtype=torch.float64), 0.3, 0.2)
    torch.testing.assert_close(tied[:2].sort().values, torch.tensor([0.3, 0.5], dtype=torch.float64), **TIGHT)
    assert tied[2].item() == pytest.approx(0.1, abs=1e-12)
    # on average a row keeps exactly `density`
    wide = torch.randn(7, 101, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(keep_probabilities(wide, 0.35, 0.2).mean(dim=1),
                               torch.full((7,), 0.35, dtype=torch.float64), **TIGHT)


def test_magprune_is_bernoulli_of_the_probabilities_then_the_l1_rescale():
    delta = torch.randn(16, 30, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = magprune(delta, 0.4, epsilon=0.2, rescale=True, generator=torch.Generator().manual_seed(5))
    mask = torch.bernoulli(keep_probabilities(delta, 0.4, 0.2), generator=torch.Generator().manual_seed(5))
    expected = delta * mask * (delta.abs().sum() / (delta * mask).abs().sum())
    torch.testing.assert_close(out, expected, **TIGHT)
    assert (out != 0).sum() == mask.sum() > 0
    plain = magprune(delta, 0.4, epsilon=0.2, rescale=False, generator=torch.Generator().manual_seed(5))
    assert torch.equal(plain, delta * mask)


def test_magprune_keep_frequencies_follow_the_probabilities_over_many_draws():
    delta = torch.randn(4, 50, generator=torch.Generator().manual_seed(2), dtype=torch.float32)
    probs = keep_probabilities(delta, 0.5, 0.3).double()  # 0.2 (smallest) to 0.8 (largest)
    draws, g = 4000, torch.Generator().manual_seed(3)
    kept = sum((magprune(delta, 0.5, epsilon=0.3, generator=g) != 0).double() for _ in range(draws)) / draws
    bound = 5 * (probs * (1 - probs) / draws).sqrt()
    assert ((kept - probs).abs() <= bound).all()
    # large magnitudes are kept more often than small ones: the top fifth of each row
    # (p >= 0.68) against the bottom fifth (p <= 0.32)
    ranks = delta.abs().argsort(dim=1).argsort(dim=1)
    assert kept[ranks >= 40].mean() - kept[ranks < 10].mean() > 0.3


def test_magprune_density_edges_and_bad_epsilon():
    delta = torch.randn(5, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert torch.equal(magprune(delta, 1.0, epsilon=0.9), delta)  # untouched, epsilon unused
    assert not magprune(delta, 0.0, epsilon=0.9).any()
    for density, epsilon in [(0.9, 0.15), (0.1, 0.15), (0.5, 0.5)]:
        with pytest.raises(ValueError, match="density - epsilon > 0 and density \\+ epsilon < 1"):
            magprune(delta, density, epsilon=epsilon)


# ----------------------------------------------------------------------------------------
# della and della_linear: DELLA sparsification inside generalized task arithmetic


@pytest.mark.parametrize("name", ["della", "della_linear"])
def test_della_matches_reference_given_the_same_draws(name):
    """One draw per model with density < 1, in model order, from the generator; then
    weighting, the sign election (della only), normalize and lambda as for TIES/DARE."""
    base, xs = family(seed=30)
    weights, density, epsilon = [1.0, 0.6, -0.2], [0.3, 1.0, 0.6], [0.1, 0.5, 0.35]
    g = METHODS[name].global_params
    out = merge(name, base, xs, generator=torch.Generator().manual_seed(9), weight=weights,
                density=density, epsilon=epsilon, **{"lambda": 0.7})
    gen = torch.Generator().manual_seed(9)
    masks = [torch.bernoulli(keep_probabilities(x - base, d, e), generator=gen) if d < 1 else None
             for x, d, e in zip(xs, density, epsilon)]
    ref = ref_task_arithmetic(base, xs, weights, sparsification="random", consensus=name == "della",
                              density=density, rescale=g["rescale"], normalize=g["normalize"],
                              lam=0.7, masks=masks)
    torch.testing.assert_close(out, ref, **TIGHT)


def test_della_float32_is_reproducible_per_seed():
    base, xs = family(shape=(32, 48), seed=31, dtype=torch.float32)
    params = dict(weight=[1.0, 0.5, 0.5], density=[0.5, 0.5, 0.5])
    a = merge("della", base, xs, generator=torch.Generator().manual_seed(1), **params)
    b = merge("della", base, xs, generator=torch.Generator().manual_seed(1), **params)
    c = merge("della", base, xs, generator=torch.Generator().manual_seed(2), **params)
    assert a.dtype == torch.float32 and torch.equal(a, b) and not torch.equal(a, c)


def test_bad_della_epsilon_is_refused_before_merging(llama_family, tmp_path):
    """mergekit fails mid-merge on density + epsilon >= 1; evomerge refuses at planning,
    naming the model and tensor, and writes no output."""
    from merging.engine import run_recipe

    recipe = write_recipe(tmp_path, f"""
merge_method: della
base_model: {llama_family['base']}
models:
  - model: {llama_family['variant_1']}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {llama_family['variant_2']}
    parameters:
      weight: 1.0
      density: [{{filter: mlp, value: 0.9}}, {{value: 0.5}}]
""")
    with pytest.raises(RecipeError, match=r"model '.*variant_2', tensor model\.layers\.0\.mlp\.\w+\.weight: "
                                          r"della needs .* density 0\.9 and epsilon 0\.15"):
        run_recipe(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------
# SCE


def ref_sce(base, tensors, select_topk):
    """Element by element: variance-selected positions, weights from mean squares, the
    sign election on the selected deltas, weighted mean of the agreeing ones."""
    deltas = [(x - base).reshape(-1).tolist() for x in tensors]
    n, size = len(deltas), base.numel()
    if select_topk < 1:
        variances = []
        for j in range(size):
            column = [d[j] for d in deltas]
            mean = sum(column) / n
            variances.append(sum((c - mean) ** 2 for c in column) / n)
        nonzero = sum(v != 0 for v in variances)
        k = int(nonzero * select_topk) if select_topk > 0 else 0
        chosen = set(sorted(range(size), key=lambda j: -variances[j])[:k])
        deltas = [[v if j in chosen else 0.0 for j, v in enumerate(d)] for d in deltas]
    energy = [sum(v * v for v in d) / size for d in deltas]
    total = sum(energy)
    weights = [1 / n] * n if abs(total) < 1e-6 else [e / total for e in energy]
    out = []
    for j in range(size):
        column = [d[j] for d in deltas]
        sign = 1.0 if sum(column) >= 0 else -1.0
        agree = [i for i in range(n) if column[i] * sign > 0]
        num = sum(weights[i] * column[i] for i in agree)
        den = max(sum(weights[i] for i in agree), 1e-6)
        out.append(num / den)
    return base + torch.tensor(out, dtype=torch.float64).reshape(base.shape)


@pytest.mark.parametrize("select_topk", [1.0, 0.3, 0.0])
def test_sce_matches_reference(select_topk):
    base, xs = family(shape=(12, 10), seed=40)
    xs[2] = xs[2] + 0.2  # unequal energies, so the weights matter
    out = merge("sce", base, xs, select_topk=select_topk)
    torch.testing.assert_close(out, ref_sce(base, xs, select_topk), **TIGHT)


def test_sce_by_hand():
    """Two models, four entries, select_topk 0.5: variances (unbiased=False) are
    [0.25, 0, 1, 0.0025]; three are nonzero, k = int(3 * 0.5) = 1, so only entry 2 stays.
    Weights: mean squares 2.25 / 4 and 0.25 / 4 -> [0.9, 0.1]; entry 2: deltas 1.5 and
    -0.5, elected sign +, only model 1 agrees -> 0.9 * 1.5 / 0.9."""
    base = torch.zeros(4, dtype=torch.float64)
    a = torch.tensor([1.0, 0.5, 1.5, 0.1], dtype=torch.float64)
    b = torch.tensor([0.0, 0.5, -0.5, 0.0], dtype=torch.float64)
    mask = high_variance_mask(torch.stack([a, b]), 0.5)
    assert mask.tolist() == [False, False, True, False]
    out = merge("sce", base, [a, b], select_topk=0.5)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 1.5, 0.0], dtype=torch.float64), **TIGHT)
    # all deltas zero: equal weights, and the base comes back
    assert torch.equal(model_weights(torch.zeros(3, 4, dtype=torch.float64)),
                       torch.full((3,), 1 / 3, dtype=torch.float64))
    assert torch.equal(merge("sce", base, [base, base]), base)


def test_sce_without_other_models_returns_the_base_and_computes_in_float32():
    base, xs = family(shape=(6, 5), seed=41, dtype=torch.bfloat16)
    assert torch.equal(merge("sce", base, []), base.float())
    assert merge("sce", base, xs).dtype == torch.float32


# ----------------------------------------------------------------------------------------
# Search: every numeric parameter can be free in an evolve template


def test_evolve_template_frees_della_and_sce_parameters():
    from niches.genome import RecipeGenome

    della = RecipeGenome.from_text("""
merge_method: della_linear
base_model: base
models:
  - model: a
    parameters:
      weight: {free: [0.0, 1.0]}
      density: {free: [0.3, 0.7], init: 0.5}
      epsilon: {free: [0.05, 0.25]}
parameters:
  lambda: {free: [0.5, 1.5], init: 1.0}
""")
    genes = {"a:weight@all": 0.5, "a:density@all": 0.25, "a:epsilon@all": 1.0, "*:lambda@all": 0.0}
    recipe = della.decode([genes[label] for label in della.labels])
    params = recipe.models[1].parameters if recipe.models[0].model == "base" else recipe.models[0].parameters
    assert dict(params) == pytest.approx({"weight": 0.5, "density": 0.4, "epsilon": 0.25})
    assert recipe.parameters["lambda"] == 0.5
    assert recipe.method is METHODS["della_linear"]
    sce = RecipeGenome.from_text("""
merge_method: sce
base_model: base
models: [{model: a}, {model: b}]
parameters:
  select_topk: {free: [0.1, 1.0]}
""")
    assert sce.decode([1.0]).parameters["select_topk"] == pytest.approx(1.0)
