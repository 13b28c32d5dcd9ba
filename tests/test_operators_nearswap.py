"""nearswap, arcee_fusion, ram and ramplus_tl against hand-computed float64 results.

Every expected value below was worked out by hand from the method's definition (module
docstrings, mergekit 0.1.5's conventions); the inputs are dyadic where possible so the
expected results are exact. Bit-level agreement with mergekit itself was checked outside
this suite (which must not import mergekit): 600 cases (0-d to 3-d tensors up to 10^6
entries, float32/float64/bfloat16 inputs, t in {-0.1, 0, 1e-3, 0.01, 0.3, 2}, epsilon
in {1e-5, 0.005, 0.02}, non-default r/alpha, identical inputs) went through
``mergekit.merge_methods.api.merge_tensors(..., dtype=float32 or float64)`` in
/opt/mergekit-venv and through ``METHODS[...].merge`` here: all torch.equal, except
ramplus_tl on float64 inputs (mergekit forms its boost factor in float32 there; see
merging/operators/ram.py).
"""
from __future__ import annotations

import pytest
import torch

import merging.operators.arcee_fusion as arcee_fusion_module
from merging.operators import METHODS, REQUIRED
from tests.conftest import resolved_parameters

EXACT = dict(rtol=0, atol=0)
TIGHT = dict(rtol=1e-12, atol=1e-12)


def f64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def merge(method: str, base, tensors, generator=None, **params):
    """Call a registered method like the engine does, defaults filled in."""
    m = METHODS[method]
    full = {k: v for k, v in m.global_params.items() if v is not REQUIRED} | params
    return m.merge(base=base, tensors=tensors, generator=generator, **full)


def test_declared_parameters_and_model_counts_are_mergekits():
    assert dict(METHODS["nearswap"].global_params) == {"t": REQUIRED}
    assert dict(METHODS["arcee_fusion"].global_params) == {}
    assert dict(METHODS["ram"].global_params) == {"epsilon": 1e-5}
    assert dict(METHODS["ramplus_tl"].global_params) == {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}
    for name in ("nearswap", "arcee_fusion", "ram", "ramplus_tl"):
        assert METHODS[name].needs_base and not METHODS[name].model_params
    for name in ("nearswap", "arcee_fusion"):
        assert (METHODS[name].min_models, METHODS[name].max_models) == (1, 1)
    assert METHODS["ram"].max_models is None and METHODS["ramplus_tl"].max_models is None
    assert METHODS["arcee_fusion"].random and not METHODS["nearswap"].random


# ----------------------------------------------------------------------------------------
# nearswap: w = clamp(t / max(|base - other|, 1e-6), 0, 1); out = w other + (1 - w) base

def test_nearswap_weights_each_entry_by_its_distance():
    base = f64(0.0, 0.0, 0.0, 1.0, 2.0)
    other = f64(0.0625, -0.25, 1.0, 1.0, 2.5)
    # |d| = 1/16, 1/4, 1, 0 (-> 1e-6), 1/2; t = 1/8 -> w = 1 (2 clipped), 1/2, 1/8, 1, 1/4
    out = merge("nearswap", base, [other], t=0.125)
    torch.testing.assert_close(out, f64(0.0625, -0.125, 0.125, 1.0, 2.125), **TIGHT)


def test_nearswap_t_zero_or_negative_keeps_the_base():
    base, other = f64(1.0, -2.0, 3.0), f64(1.0, 5.0, 2.0)  # equal first entries: |d| clamped, w = 0
    for t in (0.0, -0.5):
        torch.testing.assert_close(merge("nearswap", base, [other], t=t), base, **EXACT)


def test_nearswap_large_t_takes_the_other_model():
    base, other = f64(1.0, -2.0, 3.0), f64(1.0, 5.0, 2.0)
    torch.testing.assert_close(merge("nearswap", base, [other], t=10.0), other, **EXACT)


def test_nearswap_float32_divides_as_mergekit_does():
    """mergekit's ``t / d`` is torch's reciprocal-then-multiply, which rounds differently
    from a true division: these are the float32 bits mergekit 0.1.5 wrote for this case
    (a true division gives 0x1.99999ap-4 for all three)."""
    out = merge("nearswap", torch.zeros(3), [torch.tensor([7.0, 0.3, 1.1])], t=0.1)
    assert out.dtype == torch.float32
    assert [v.hex() for v in out.tolist()] == ["0x1.99999c0000000p-4", "0x1.99999c0000000p-4",
                                               "0x1.9999980000000p-4"]


def test_nearswap_takes_exactly_one_other_model():
    with pytest.raises(ValueError, match="exactly one other model"):
        merge("nearswap", f64(0.0), [f64(1.0), f64(2.0)], t=0.5)


# ----------------------------------------------------------------------------------------
# arcee_fusion: importance = |other - base| * KL(softmax row); take entries >= median + 1.5 IQR

def test_arcee_fusion_quartiles_are_order_statistics_not_interpolated():
    """10 entries, one row. |delta| sorted: 1 1 1 1 1 3 3 5 5 20; the quartiles are the
    sorted values at floor(q * 9) = 2, 4, 6: 1, 1, 3, so the fence is 1 + 1.5 * 2 = 4 (times
    the row's KL, which scales every importance alike) and the 5s and the 20 are taken.
    Interpolated quartiles (1, 2, 4.5) would give 7.25 and drop the 5s."""
    base = f64(0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0)
    delta = f64(1.0, -5.0, 1.0, 3.0, 1.0, -20.0, 1.0, 5.0, -3.0, -1.0)
    out = merge("arcee_fusion", base, [base + delta])
    taken = torch.tensor([False, True, False, False, False, True, False, True, False, False])
    torch.testing.assert_close(out, torch.where(taken, base + delta, base), **EXACT)


def test_arcee_fusion_divergence_is_per_row():
    """Row 0 is shifted by a constant, which leaves its softmax unchanged: KL 0, so none of
    its (large) changes matter. Row 1's importances are k * (0.125, 0.25, 0.3125, 0.5) with
    k > 0; of the 8 importances sorted (0, 0, 0, 0, then row 1's) the quartiles at floor(q * 7)
    = 1, 3, 5 are 0, 0, 0.25k: the fence is 0.375k and only row 1's 0.5 change is taken.
    (One KL over the whole tensor would rank row 0's shifts first.)"""
    base = torch.zeros(2, 4, dtype=torch.float64)
    other = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.125, -0.25, 0.3125, 0.5]], dtype=torch.float64)
    expected = base.clone()
    expected[1, 3] = 0.5
    torch.testing.assert_close(merge("arcee_fusion", base, [other]), expected, **EXACT)


def test_arcee_fusion_takes_everything_when_most_importances_are_zero():
    """A fence of 0 (three quarters of the importances 0) is met by every entry (>=)."""
    base = torch.zeros(4, 2, dtype=torch.float64)
    other = torch.tensor([[1.0, 1.0], [2.0, 2.0], [-3.0, -3.0], [0.0, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(merge("arcee_fusion", base, [other]), other, **EXACT)


def test_arcee_fusion_samples_large_tensors_with_the_generator(monkeypatch):
    """Above QUANTILE_SAMPLE entries the quartiles come from that many entries drawn with
    the given generator. With a sample of one, the fence is that entry's importance, so
    exactly the entries at least as important as the drawn one are taken."""
    monkeypatch.setattr(arcee_fusion_module, "QUANTILE_SAMPLE", 1)
    base = torch.zeros(6, dtype=torch.float64)
    other = f64(0.25, -1.0, 0.5, 2.0, -0.125, 1.5)
    outcomes = set()
    for seed in range(12):
        pick = torch.randint(6, (1,), generator=torch.Generator().manual_seed(seed)).item()
        out = merge("arcee_fusion", base, [other], generator=torch.Generator().manual_seed(seed))
        taken = other.abs() >= other[pick].abs()
        torch.testing.assert_close(out, torch.where(taken, other, base), **EXACT)
        outcomes.add(int(taken.sum()))
    assert len(outcomes) > 1


def test_arcee_fusion_computes_bfloat16_sources_in_float32():
    base = torch.zeros(4, 2, dtype=torch.bfloat16)
    other = torch.tensor([[1.0, 1.0], [2.0, 2.0], [-3.0, -3.0], [0.0, 0.5]], dtype=torch.bfloat16)
    out = merge("arcee_fusion", base, [other])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, other.float(), **EXACT)


# ----------------------------------------------------------------------------------------
# ram / ramplus_tl: unique changes kept whole, shared ones averaged over the active models

BASE = f64(1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
DELTAS = [f64(0.5, 0.25, 0.0, 0.375, 0.0, 2.0 ** -20),  # 2^-20 < 1e-5: not active
          f64(0.0, 0.5, 0.0, -0.125, 0.0, 0.0),
          f64(0.0, 0.0, 0.0, 0.25, 0.75, 0.0)]
# active counts per entry: 1, 2, 0, 3, 1, 0


def ram_inputs(shape=(6,)):
    return BASE.reshape(shape), [(BASE + d).reshape(shape) for d in DELTAS]


def test_ram_keeps_unique_changes_and_averages_shared_ones():
    base, tensors = ram_inputs((2, 3))
    expected = BASE + f64(0.5, 0.375, 0.0, 0.5 / 3, 0.75, 0.0)
    torch.testing.assert_close(merge("ram", base, tensors), expected.reshape(2, 3), **TIGHT)


def test_ram_epsilon_is_a_strict_threshold():
    """epsilon 0.25: the 0.25 changes are not active (|delta| > epsilon), which makes entry
    1 (only model 2's 0.5 left) and entry 3 (only model 1's 0.375) unique."""
    base, tensors = ram_inputs()
    expected = BASE + f64(0.5, 0.5, 0.0, 0.375, 0.75, 0.0)
    torch.testing.assert_close(merge("ram", base, tensors, epsilon=0.25), expected, **EXACT)


def test_ramplus_tl_boosts_each_models_unique_changes():
    """Per model, shared / unique active entries: model 1: 2 / 1 (rho 2), model 2: 2 / 0
    (rho 2 / epsilon, clipped), model 3: 1 / 1 (rho 1). r 0.5, alpha 1.5: lambda 1.75 for
    model 1's unique 0.5 and 1.5 for model 3's unique 0.75; shared entries as in ram."""
    base, tensors = ram_inputs()
    expected = BASE + f64(0.875, 0.375, 0.0, 0.5 / 3, 1.125, 0.0)
    torch.testing.assert_close(merge("ramplus_tl", base, tensors, r=0.5, alpha=1.5), expected, **TIGHT)


def test_ramplus_tl_defaults():
    """r 0.1, alpha 0.2: every rho here is >= 0.2, so both unique changes get 1.02."""
    base, tensors = ram_inputs()
    expected = BASE + f64(0.5 * 1.02, 0.375, 0.0, 0.5 / 3, 0.75 * 1.02, 0.0)
    torch.testing.assert_close(merge("ramplus_tl", base, tensors), expected, **TIGHT)


def test_ram_with_one_model_is_its_thresholded_task_vector():
    base, tensors = ram_inputs()
    expected = BASE + f64(0.5, 0.25, 0.0, 0.375, 0.0, 0.0)
    for method in ("ram", "ramplus_tl"):  # rho = 0 without shared entries: no boost
        torch.testing.assert_close(merge(method, base, tensors[:1]), expected, **EXACT)


def test_ram_computes_bfloat16_sources_in_float32():
    base, tensors = ram_inputs()
    out = merge("ram", base.bfloat16(), [t.bfloat16() for t in tensors])
    assert out.dtype == torch.float32
    expected = BASE + f64(0.5, 0.375, 0.0, 0.5 / 3, 0.75, 0.0)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-7)


# ----------------------------------------------------------------------------------------
# Search: every numeric parameter of these methods can be a free marker of an evolve template

SEARCH_TEMPLATES = {
    "nearswap": "  t: {free: [0.001, 0.02], granularity: layer}\n",
    "ramplus_tl": ("  r: {free: [0.0, 1.0]}\n  alpha: {free: [0.1, 2.0], granularity: 2}\n"
                   "  epsilon: {free: [1.0e-5, 1.0e-2]}\n"),
    "ram": "  epsilon: {free: [1.0e-5, 1.0e-2], granularity: layer}\n",
}


@pytest.mark.parametrize("method", sorted(SEARCH_TEMPLATES))
def test_free_markers_decode_onto_each_tensor(method, llama_family):
    """A genome decodes to a recipe whose plan gives each tensor its own gene's value:
    global markers everywhere, per-layer (or per-2-layer) ones on their layers, the
    embeddings and the head."""
    import numpy as np

    from merging.checkpoint import Checkpoint
    from niches.genome import LayerLayout, RecipeGenome

    models = "".join(f"  - model: {llama_family[name]}\n" for name in ("base", "variant_1"))
    text = (f"merge_method: {method}\nbase_model: {llama_family['base']}\nmodels:\n{models}"
            f"parameters:\n{SEARCH_TEMPLATES[method]}dtype: float32\n")
    genome = RecipeGenome.from_text(text, "template.yaml", LayerLayout.of(Checkpoint("base", llama_family["base"])))
    x = np.linspace(0.05, 0.95, genome.dimension)
    recipe = genome.decode(x)
    params = resolved_parameters(recipe)
    for parameter, genes in zip(genome.parameters, genome.values(x)):
        name = parameter.name
        if parameter.granularity == "global":
            assert all(p[name] == pytest.approx(genes[0]) for p in params.values())
            continue
        size = 1 if parameter.granularity == "layer" else parameter.granularity
        assert params["model.embed_tokens.weight"][name] == pytest.approx(genes[0])
        assert params["lm_head.weight"][name] == pytest.approx(genes[-1])
        for layer in range(4):
            assert params[f"model.layers.{layer}.mlp.up_proj.weight"][name] == pytest.approx(genes[1 + layer // size])
