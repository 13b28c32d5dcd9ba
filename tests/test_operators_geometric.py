"""The geometric methods (model_stock, nuslerp, multislerp, karcher) against closed forms.

Every case is built so that the expected tensor is known by hand, in float64: angles of
30, 45 or 90 degrees, points on a circle, task vectors with a chosen cosine. The same
methods' agreement with mergekit itself is checked by scripts/compare_mergekit.py.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from merging.checkpoint import Checkpoint
from merging.engine import open_models, plan_merge
from merging.errors import EvomergeError, RecipeError
from merging.operators import METHODS, REQUIRED
from merging.recipe import parse_recipe
from niches.genome import LayerLayout, RecipeGenome
from tests.conftest import resolved_parameters


def vec(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def merge(name: str, base, tensors, **params) -> torch.Tensor:
    return METHODS[name].merge(base=base, tensors=tensors, **params)


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-12) -> None:
    assert actual.dtype == torch.float64
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------------------
# Registry: mergekit 0.1.5's parameter names and defaults

@pytest.mark.parametrize("name, model_params, global_params, needs_base, optional_base, lo, hi", [
    ("model_stock", {}, {"filter_wise": False}, True, False, 2, None),
    ("nuslerp", {"weight": REQUIRED}, {"nuslerp_row_wise": False, "nuslerp_flatten": True}, False, True, 2, 2),
    ("multislerp", {"weight": REQUIRED}, {"normalize_weights": True, "eps": 1e-8}, False, True, 1, None),
    ("karcher", {}, {"max_iter": 10, "tol": 1e-5}, False, False, 1, None),
])
def test_registry(name, model_params, global_params, needs_base, optional_base, lo, hi):
    m = METHODS[name]
    assert (dict(m.model_params), dict(m.global_params)) == (model_params, global_params)
    assert (m.needs_base, m.optional_base, m.min_models, m.max_models, m.random) == (
        needs_base, optional_base, lo, hi, False)


# ----------------------------------------------------------------------------------------
# model_stock: t = N cos / (1 + (N - 1) cos), out = t mean + (1 - t) base

BASE = vec(1.0, -2.0, 0.5)


def test_model_stock_two_models_at_sixty_degrees():
    d1, d2 = vec(2.0, 0.0, 0.0), vec(0.5, math.sqrt(3) / 2, 0.0)  # cos = 1/2
    out = merge("model_stock", BASE, [BASE + d1, BASE + d2])
    t = 2 * 0.5 / (1 + 0.5)
    close(out, BASE + t * (d1 + d2) / 2)


def test_model_stock_three_models_average_the_pairwise_cosines():
    d = [vec(1.0, 0.0, 0.0), vec(0.0, 3.0, 0.0), vec(1.0, 1.0, 0.0)]  # cosines 0, 1/sqrt2, 1/sqrt2
    cos = (0 + 2 / math.sqrt(2)) / 3
    t = 3 * cos / (1 + 2 * cos)
    out = merge("model_stock", BASE, [BASE + x for x in d])
    close(out, BASE + t * sum(d) / 3)


def test_model_stock_orthogonal_task_vectors_keep_the_base():
    out = merge("model_stock", BASE, [BASE + vec(1.0, 0, 0), BASE + vec(0, 5.0, 0)])
    close(out, BASE)


def test_model_stock_opposite_task_vectors_are_singular_and_keep_the_base():
    """N = 2, cos = -1: 1 + (N - 1) cos = 0, the ratio has no value; mergekit keeps the base."""
    d = vec(0.3, -0.2, 0.1)
    out = merge("model_stock", BASE, [BASE + d, BASE - 2 * d])
    assert torch.isfinite(out).all()
    close(out, BASE)


def test_model_stock_filter_wise_has_one_ratio_per_row():
    base = torch.zeros(2, 2, dtype=torch.float64)
    a = torch.tensor([[1.0, 0.0], [1.0, 2.0]], dtype=torch.float64)  # row 0 orthogonal to b's
    b = torch.tensor([[0.0, 1.0], [2.0, 4.0]], dtype=torch.float64)  # row 1 parallel: t = 1
    out = merge("model_stock", base, [a, b], filter_wise=True)
    close(out, torch.stack([torch.zeros(2, dtype=torch.float64), (a[1] + b[1]) / 2]))
    whole = merge("model_stock", base, [a, b])
    assert not torch.allclose(whole, out)
    bias = [vec(1.0, 0.0), vec(0.5, math.sqrt(3) / 2)]  # a 1-D tensor is one row
    close(merge("model_stock", vec(0.0, 0.0), bias, filter_wise=True), merge("model_stock", vec(0.0, 0.0), bias))


# ----------------------------------------------------------------------------------------
# nuslerp: t = w2 / (w1 + w2)

E1, E2 = vec(1.0, 0.0), vec(0.0, 1.0)


@pytest.mark.parametrize("weight, t", [([1.0, 1.0], 0.5), ([1.0, 3.0], 0.75), ([2.0, -2.0], 0.5)])
def test_nuslerp_of_orthogonal_vectors(weight, t):
    """theta = 90 degrees: out = sin((1 - t) pi/2) a + sin(t pi/2) b (norms 2 and 3 kept in)."""
    a, b = 2 * E1, 3 * E2
    out = merge("nuslerp", None, [a, b], weight=weight)
    close(out, math.sin((1 - t) * math.pi / 2) * a + math.sin(t * math.pi / 2) * b)


def test_nuslerp_at_one_half_of_orthogonal_unit_vectors_is_the_unit_bisector():
    close(merge("nuslerp", None, [E1, E2], weight=[0.5, 0.5]), (E1 + E2) / math.sqrt(2))


def test_nuslerp_of_parallel_vectors_is_linear():
    a = vec(1.0, 2.0, -1.0)
    close(merge("nuslerp", None, [a, 3 * a], weight=[0.6, 0.2]), 0.75 * a + 0.25 * 3 * a)


def test_nuslerp_falls_back_to_lerp_only_below_sin_theta_1e8():
    """At 1e-5 rad (sin^2 = 1e-10) nuslerp still follows the arc, keeping the unit norm,
    where slerp's |cos| > 0.9995 rule already averages linearly (norm 1 - theta^2/8)."""
    from merging.operators.slerp import slerp

    theta = 1e-5
    a, b = E1, vec(math.cos(theta), math.sin(theta))
    out = merge("nuslerp", None, [a, b], weight=[1.0, 1.0])
    assert abs(out.norm().item() - 1) < 1e-14
    assert abs(slerp(a, b, 0.5).norm().item() - (1 - theta ** 2 / 8)) < 1e-14


def test_nuslerp_rows_and_columns():
    """Row 0: orthogonal (a quarter circle); row 1: parallel (linear). nuslerp_row_wise
    works on dimension 0, so the transposed inputs give the transposed result."""
    a = torch.stack([E1, vec(1.0, 1.0)])
    b = torch.stack([E2, vec(2.0, 2.0)])
    t = 0.25
    expected = torch.stack([math.cos(t * math.pi / 2) * E1 + math.sin(t * math.pi / 2) * E2,
                            (1 - t) * a[1] + t * b[1]])
    rows = merge("nuslerp", None, [a, b], weight=[3.0, 1.0], nuslerp_flatten=False)
    close(rows, expected)
    cols = merge("nuslerp", None, [a.T, b.T], weight=[3.0, 1.0], nuslerp_flatten=False, nuslerp_row_wise=True)
    close(cols, expected.T)
    flat = merge("nuslerp", None, [a, b], weight=[3.0, 1.0])
    assert not torch.allclose(flat, rows)
    # flattening wins over row_wise, as in mergekit
    close(merge("nuslerp", None, [a, b], weight=[3.0, 1.0], nuslerp_row_wise=True), flat)


def test_nuslerp_with_a_base_interpolates_the_task_vectors():
    base = vec(5.0, -1.0)
    out = merge("nuslerp", base, [base + 2 * E1, base + 2 * E2], weight=[1.0, 1.0])
    close(out, base + math.sqrt(2) * (E1 + E2))


# ----------------------------------------------------------------------------------------
# multislerp. With the weights summing to 1 or not, the weighted sum of the tangent
# projections at the normalised weighted mean m of the directions is M - (M.m) m = 0,
# so the result is (sum_i w_i |x_i|) * M / |M|, M = sum_i w_i x_i / |x_i|.

def _multislerp_closed_form(xs, weight, normalize=True):
    w = torch.tensor(weight, dtype=torch.float64)
    w = w / w.sum() if normalize else w
    mean = sum(wi * x / x.norm() for wi, x in zip(w, xs))
    return sum(wi * x.norm() for wi, x in zip(w, xs)) * mean / mean.norm()


def test_multislerp_of_two_orthogonal_vectors_is_their_bisector_at_the_mean_norm():
    out = merge("multislerp", None, [2 * E1, 4 * E2], weight=[1.0, 1.0])
    close(out, 3 * (E1 + E2) / math.sqrt(2), tol=1e-7)  # eps = 1e-8 enters each norm


def test_multislerp_of_three_vectors_in_closed_form():
    xs = [vec(1.0, 0.0, 0.0), vec(0.0, 2.0, 0.0), vec(1.0, 1.0, 3.0)]
    out = merge("multislerp", None, xs, weight=[0.2, 0.5, 0.3])
    close(out, _multislerp_closed_form(xs, [0.2, 0.5, 0.3]), tol=1e-7)
    raw = merge("multislerp", None, xs, weight=[2.0, 1.0, 1.0], normalize_weights=False)
    close(raw, _multislerp_closed_form(xs, [2.0, 1.0, 1.0], normalize=False), tol=1e-7)
    assert raw.norm() == pytest.approx(2 * 1 + 2 + math.sqrt(11))


def test_multislerp_with_a_base_averages_the_task_vectors():
    base = vec(1.0, 1.0, 1.0)
    deltas = [vec(1.0, 0.0, 0.0), vec(0.0, 0.0, 2.0)]
    out = merge("multislerp", base, [base + d for d in deltas], weight=[0.5, 0.5])
    close(out, base + _multislerp_closed_form(deltas, [0.5, 0.5]), tol=1e-7)


def test_multislerp_one_model_is_returned_and_cancelling_directions():
    close(merge("multislerp", None, [vec(1.0, 2.0)], weight=[0.3]), vec(1.0, 2.0))
    # two opposite directions with equal weights: mergekit's linear fallback
    close(merge("multislerp", vec(1.0, 1.0), [vec(2.0, 1.0), vec(0.0, 1.0)], weight=[1.0, 1.0]), vec(1.0, 1.0))
    with pytest.raises(EvomergeError, match="weighted mean of the models' directions is zero"):
        merge("multislerp", None, [E1, -E1, E2], weight=[1.0, 1.0, 0.0])


# ----------------------------------------------------------------------------------------
# karcher

def _on_circle(angle: float) -> torch.Tensor:
    return vec(math.cos(angle), math.sin(angle))


def test_karcher_mean_of_points_on_a_circle_is_the_mean_angle():
    """On a circle the Karcher mean of directions is the circular mean of their angles
    (0, 30, 90 degrees -> 40 degrees), not the normalised arithmetic mean (the start)."""
    angles = [0.0, math.pi / 6, math.pi / 2]
    xs = [n * _on_circle(a) for n, a in zip([1.0, 2.0, 3.0], angles)]
    out = merge("karcher", None, xs)
    close(out, 2.0 * _on_circle(sum(angles) / 3))
    start = merge("karcher", None, xs, max_iter=0)
    mean = sum(_on_circle(a) for a in angles)
    close(start, 2.0 * mean / mean.norm())
    assert not torch.allclose(start, out)


def test_karcher_zero_tensor_counts_in_the_norm_only():
    close(merge("karcher", None, [3 * E1, torch.zeros(2, dtype=torch.float64)]), 1.5 * E1)
    close(merge("karcher", None, [torch.zeros(2, dtype=torch.float64)] * 2), torch.zeros(2, dtype=torch.float64))
    close(merge("karcher", None, [vec(1.0, 2.0)]), vec(1.0, 2.0))


def test_karcher_max_iter_is_rounded():
    xs = [_on_circle(0.0), _on_circle(1.0), _on_circle(1.4)]
    assert torch.equal(merge("karcher", None, xs, max_iter=0.4), merge("karcher", None, xs, max_iter=0))
    assert torch.equal(merge("karcher", None, xs, max_iter=1.6), merge("karcher", None, xs, max_iter=2))


# ----------------------------------------------------------------------------------------
# Half precision in, float32 out (the operators' contract)

@pytest.mark.parametrize("name, base, params", [
    ("model_stock", True, {}), ("nuslerp", True, {"weight": [0.3, 0.7]}),
    ("multislerp", False, {"weight": [0.3, 0.7]}), ("karcher", False, {}),
])
def test_bfloat16_inputs_are_computed_in_float32(name, base, params):
    g = torch.Generator().manual_seed(0)
    b = torch.randn(16, 8, generator=g)
    xs = [b + 0.1 * torch.randn(16, 8, generator=g) for _ in range(2)]
    half = merge(name, b.bfloat16() if base else None, [x.bfloat16() for x in xs], **params)
    up = merge(name, b.bfloat16().float() if base else None, [x.bfloat16().float() for x in xs], **params)
    assert half.dtype == torch.float32 and torch.equal(half, up)


# ----------------------------------------------------------------------------------------
# Recipes: the optional base, the model counts, free markers

def _recipe(text: str, family) -> str:
    return text.format(**{k: str(v) for k, v in family.items()})


def test_nuslerp_recipe_with_a_base_passes_it_apart(llama_family):
    recipe = parse_recipe(_recipe("""\
merge_method: nuslerp
base_model: {base}
models:
  - model: {variant_1}
    parameters: {{weight: 0.4}}
  - model: {variant_2}
    parameters: {{weight: 0.6}}
""", llama_family))
    plan = plan_merge(recipe, open_models(recipe))
    try:
        task = plan.tasks[0]
        assert task.base.model == str(llama_family["base"])
        assert [i.model for i in task.inputs] == [str(llama_family["variant_1"]), str(llama_family["variant_2"])]
    finally:
        plan.close()


@pytest.mark.parametrize("text, message", [
    ("merge_method: nuslerp\nmodels:\n  - model: {variant_1}\n    parameters: {{weight: 1}}\n"
     "  - model: {variant_2}\n    parameters: {{weight: 1}}\n  - model: {variant_3}\n    parameters: {{weight: 1}}\n",
     "at most 2"),
    ("merge_method: model_stock\nbase_model: {base}\nmodels:\n  - model: {variant_1}\n", "at least 2"),
    ("merge_method: nuslerp\nbase_model: {base}\nslices:\n  - sources:\n"
     "      - model: {variant_1}\n        layer_range: [0, 4]\n        parameters: {{weight: 1}}\n"
     "      - model: {variant_2}\n        layer_range: [0, 4]\n        parameters: {{weight: 1}}\n",
     "list it among this slice's sources"),
])
def test_recipes_mergekit_refuses_are_refused(llama_family, text, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(_recipe(text, llama_family))


def test_free_markers_on_the_new_methods_numeric_parameters(llama_family):
    """An evolve template can search nuslerp's weights per layer, multislerp's eps and
    karcher's max_iter and tol; the decoded recipes carry the values to every tensor."""
    layout = LayerLayout.of(Checkpoint("base", llama_family["base"]))
    templates = {
        "nuslerp": """\
merge_method: nuslerp
base_model: {base}
models:
  - model: {variant_1}
    parameters: {{weight: {{free: [0.0, 1.0], granularity: layer}}}}
  - model: {variant_2}
    parameters: {{weight: {{free: [0.5, 2.0]}}}}
dtype: float32
""",
        "multislerp": """\
merge_method: multislerp
models:
  - model: {variant_1}
    parameters: {{weight: {{free: [0.1, 1.0]}}}}
  - model: {variant_2}
    parameters: {{weight: 0.5}}
parameters:
  eps: {{free: [1.0e-9, 1.0e-6]}}
dtype: float32
""",
        "karcher": """\
merge_method: karcher
models:
  - model: {variant_1}
  - model: {variant_2}
parameters:
  max_iter: {{free: [1, 20], granularity: 2}}
  tol: {{free: [1.0e-6, 1.0e-3]}}
dtype: float32
""",
    }
    genomes = {name: RecipeGenome.from_text(_recipe(text, llama_family), f"{name}.yaml", layout)
               for name, text in templates.items()}
    assert {name: g.dimension for name, g in genomes.items()} == {"nuslerp": 7, "multislerp": 2, "karcher": 5}
    for name, genome in genomes.items():
        x = np.linspace(0.0, 1.0, genome.dimension)
        recipe = genome.decode(x)
        values = genome.values(x)
        params = resolved_parameters(recipe)
        layer2 = params["model.layers.2.mlp.down_proj.weight"]
        if name == "nuslerp":
            assert layer2["weight"] == pytest.approx([values[0][1 + 2], values[1][0]])
            assert params["lm_head.weight"]["weight"][0] == pytest.approx(values[0][-1])
        elif name == "multislerp":
            eps, weight = values  # top-level markers come first
            assert layer2["weight"] == pytest.approx([weight[0], 0.5]) and layer2["eps"] == pytest.approx(eps[0])
        else:
            assert layer2["max_iter"] == pytest.approx(values[0][1 + 1]) and layer2["tol"] == pytest.approx(values[1][0])
