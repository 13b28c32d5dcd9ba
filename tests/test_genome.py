"""Genomes: vectors to recipes and back, for parameter space (templates with free
markers) and data-flow space; the decoded recipe really sets each layer's value."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from merging.checkpoint import Checkpoint
from merging.dataflow import DataflowSpace
from merging.engine import open_models, plan_merge
from merging.errors import RecipeError
from niches.genome import DataflowGenome, LayerLayout, RecipeGenome
from tests.conftest import resolved_parameters

TEMPLATE = """\
merge_method: dare_ties
base_model: {base}
models:
  - model: {v1}
    parameters:
      density: {{free: [0.1, 1.0], init: 0.5, granularity: layer}}
      weight: {{free: [0.0, 1.0], granularity: 2}}
  - model: {v2}
    parameters:
      density: 0.7
      weight: {{free: [0.0, 2.0], init: 1.0}}
parameters:
  normalize: true
dtype: float32
"""


@pytest.fixture(scope="module")
def layout(llama_family) -> LayerLayout:
    return LayerLayout.of(Checkpoint("base", llama_family["base"]))


@pytest.fixture(scope="module")
def genome(llama_family, layout) -> RecipeGenome:
    text = TEMPLATE.format(base=llama_family["base"], v1=llama_family["variant_1"], v2=llama_family["variant_2"])
    return RecipeGenome.from_text(text, "template.yaml", layout)


def test_layout_names_the_embeddings_and_the_final_tensors(layout):
    assert layout.num_layers == 4
    assert layout.pre_names == ("model.embed_tokens.weight",)
    assert set(layout.post_names) == {"model.norm.weight", "lm_head.weight"}


def test_genes_per_granularity(genome):
    # density per layer: embed + 4 layers + head; weight per 2 layers: embed + 2 groups + head; global: 1
    assert genome.dimension == 6 + 4 + 1
    assert genome.labels[:6] == [f"{genome.parameters[0].model}:density@{x}"
                                 for x in ["embed", "L0", "L1", "L2", "L3", "head"]]
    assert [p.labels for p in genome.parameters[1:]] == [("embed", "L0-1", "L2-3", "head"), ("all",)]
    assert np.allclose(genome.x0, [4 / 9] * 6 + [0.5] * 4 + [0.5])


def test_round_trip(genome):
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = rng.uniform(0, 1, genome.dimension)
        recipe = genome.decode(x)
        assert np.allclose(genome.encode(recipe), x)
        again = genome.decode(genome.encode(recipe))
        assert again.model_dump(exclude={"models"}) == recipe.model_dump(exclude={"models"})


def test_decoded_values_land_on_their_tensors(genome, llama_family):
    """Each gene sets exactly its layer's (or the embeddings'/head's) parameter in the plan."""
    x = np.linspace(0.0, 1.0, genome.dimension)
    recipe = genome.decode(x)
    density, weight, weight_2 = genome.values(x)
    by_name = resolved_parameters(recipe)
    # inputs are [variant_1, variant_2]; variant_2's density is fixed at 0.7
    assert by_name["model.embed_tokens.weight"]["density"] == pytest.approx([density[0], 0.7])
    for layer in range(4):
        params = by_name[f"model.layers.{layer}.mlp.down_proj.weight"]
        assert params["density"] == pytest.approx([density[1 + layer], 0.7])
        assert params["weight"] == pytest.approx([weight[1 + layer // 2], weight_2[0]])
    for name in ("model.norm.weight", "lm_head.weight"):
        assert by_name[name]["density"][0] == pytest.approx(density[-1])
        assert by_name[name]["weight"][0] == pytest.approx(weight[-1])


def test_genes_are_clipped_to_the_bounds(genome):
    values = genome.values(np.full(genome.dimension, 1.7))
    assert values[0].max() == pytest.approx(1.0) and values[2][0] == pytest.approx(2.0)


@pytest.mark.parametrize("marker, message", [
    ("{free: [1.0, 0.1]}", "low < high"),
    ("{free: [0.1, 1.0], init: 3}", "inside"),
    ("{free: [0.1, 1.0], granularity: layers}", "granularity"),
    ("{free: [0.1, 1.0], step: 2}", "unknown key"),
])
def test_bad_markers_name_their_line(llama_family, layout, marker, message):
    text = TEMPLATE.format(base=llama_family["base"], v1=llama_family["variant_1"], v2=llama_family["variant_2"])
    text = text.replace("{free: [0.0, 2.0], init: 1.0}", marker)
    with pytest.raises(RecipeError, match=rf"template.yaml, line 11: models\[1\].parameters.weight: .*{message}"):
        RecipeGenome.from_text(text, "template.yaml", layout)


def test_template_errors_are_recipe_errors_with_lines(llama_family, layout):
    text = TEMPLATE.format(base=llama_family["base"], v1=llama_family["variant_1"], v2=llama_family["variant_2"])
    with pytest.raises(RecipeError, match="line 6: .*unknown parameter 'densty'"):
        RecipeGenome.from_text(text.replace("density: {", "densty: {"), "t.yaml", layout)
    with pytest.raises(RecipeError, match="line 13: parameters.temperature: unknown parameter 'temperature'"):
        # a static recipe ignores it with a note (as mergekit does); a template spends no gene on it
        RecipeGenome.from_text(text.replace("normalize: true", "temperature: 0.5"), "t.yaml", layout)
    with pytest.raises(RecipeError, match="marks no parameter free"):
        RecipeGenome.from_text("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\n")
    with pytest.raises(RecipeError, match="needs the models' layout"):
        RecipeGenome.from_text(text, "t.yaml", None)


@pytest.fixture(scope="module")
def space(llama_family) -> DataflowSpace:
    return DataflowSpace([str(llama_family["base"]), str(llama_family["variant_1"])], repeats=2)


@pytest.mark.parametrize("scales, count", [("layer_pairs", 2 * 4 * 4), ("model_pairs", 2), ("none", 0)])
def test_dataflow_genome_sizes(space, scales, count):
    assert DataflowGenome(space, scales=scales).dimension == 16 + count


def test_dataflow_x0_is_model_0_with_unit_scales(space):
    genome = DataflowGenome(space)
    assert genome.path(genome.x0) == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert np.allclose(genome.scale_matrix(genome.x0), 1.0)


def test_dataflow_round_trip_and_scales_only_cross_models(space):
    genome = DataflowGenome(space, scale_bounds=(0.5, 2.0))
    x = np.random.default_rng(1).uniform(0, 1, genome.dimension)
    matrix = genome.scale_matrix(x)
    assert np.allclose(genome.encode(genome.inclusion(x), matrix), x)
    assert np.all(matrix >= 0.5 - 1e-12) and np.all(matrix <= 2.0 + 1e-12)
    assert np.allclose(matrix[:4, :4], 1.0) and np.allclose(matrix[4:, 4:], 1.0)
    assert not np.allclose(matrix[:4, 4:], 1.0)
    # the decoded recipe is the path with the scales folded in (one slice per step)
    assert len(genome.decode(x).slices) == len(genome.path(x))


def test_model_pair_scales_expand_per_model(space):
    genome = DataflowGenome(space, scales="model_pairs")
    x = genome.encode(torch.ones(space.num_slots), None)
    x[-2:] = [0.0, 1.0]  # W[model 0 -> model 1] = 0.5, W[model 1 -> model 0] = 2
    matrix = genome.scale_matrix(x)
    assert np.allclose(matrix[:4, 4:], 0.5) and np.allclose(matrix[4:, :4], 2.0)
    assert np.allclose(genome.encode(genome.inclusion(x), matrix), x)


def test_bad_dataflow_settings(space):
    with pytest.raises(RecipeError, match="scales must be"):
        DataflowGenome(space, scales="pairs")
    with pytest.raises(RecipeError, match="0 < low < 1 < high"):
        DataflowGenome(space, scale_bounds=(1.0, 2.0))


def test_the_heatmap_spreads_every_group_over_its_own_layers(tmp_path, monkeypatch):
    """Densities per 2 layers and weights per 4 share per-layer columns: each value sits
    over exactly the layers its gene sets (the array plotted, not the pixels)."""
    from matplotlib.axes import Axes

    from niches.plots import plot_ps_heatmap

    template = """\
merge_method: dare_ties
base_model: base
models:
  - model: lang
    parameters:
      density: {free: [0.0, 1.0], granularity: 2}
      weight: {free: [0.0, 1.0], granularity: 4}
  - model: math
    parameters:
      density: {free: [0.0, 1.0]}
      weight: {free: [0.0, 1.0], granularity: 8}
"""
    genome = RecipeGenome.from_text(template, "t.yaml", LayerLayout(8, ("embed",), ("head",)))
    best = np.round(np.linspace(0.0, 1.0, genome.dimension), 3)
    density_2, weight_4, density_global, weight_8 = genome.values(best)
    plotted = []
    imshow = Axes.imshow
    monkeypatch.setattr(Axes, "imshow", lambda ax, grid, **kw: plotted.append((ax, np.asarray(grid))) or imshow(ax, grid, **kw))
    plot_ps_heatmap(tmp_path / "heatmap.png", genome, best)
    (_, density), (weight_ax, weight) = plotted
    assert np.array_equal(density[0], [density_2[0], *np.repeat(density_2[1:5], 2), density_2[5]])
    assert np.array_equal(density[1], np.full(10, density_global[0]))
    assert np.array_equal(weight[0], [weight_4[0], *np.repeat(weight_4[1:3], 4), weight_4[3]])
    assert np.array_equal(weight[1], [weight_8[0], *np.repeat(weight_8[1], 8), weight_8[2]])
    # the per-layer values are the ones the decoded recipe gives each layer
    layers = genome.decode(best).model_dump(mode="json")["models"][0]["parameters"]["weight"][-1]["value"]
    assert np.allclose(weight[0][1:-1], layers)
    assert [t.get_text() for t in weight_ax.get_xticklabels()] == ["embed", *(f"L{i}" for i in range(8)), "head"]


SLICES_TEMPLATE = """\
merge_method: linear
slices:
  - sources:
      - model: {v1}
        layer_range: [0, 2]
        parameters:
          weight: {{free: [0.0, 1.0], granularity: layer}}
      - model: {v2}
        layer_range: [0, 2]
        parameters: {{weight: 0.5}}
  - sources:
      - model: {v1}
        layer_range: [2, 4]
        parameters:
          weight: {{free: [0.0, 1.0], granularity: layer}}
      - model: {v2}
        layer_range: [2, 4]
        parameters: {{weight: 0.5}}
dtype: float32
"""


def test_a_slices_template_reads_every_gene_on_its_own_layer(llama_family, layout):
    """mergekit evaluates a gradient over each slice on its own (t = i / (slice length - 1),
    mergekit/plan.py plan_slice), the embeddings with the first slice's parameters and the
    final norm and head with the last slice's. Genes 0.1..0.4 for layers 0..3 must give
    layers 0.1, 0.2, 0.3, 0.4 (a gradient over the whole depth in each slice gave 0.1, 0.4,
    0.1, 0.4), and no gene is left unread."""
    text = SLICES_TEMPLATE.format(v1=llama_family["variant_1"], v2=llama_family["variant_2"])
    genome = RecipeGenome.from_text(text, "slices.yaml", layout)
    assert [p.labels for p in genome.parameters] == [("embed", "L0", "L1"), ("L2", "L3", "head")]
    genes = np.array([0.05, 0.1, 0.2, 0.3, 0.4, 0.45])
    recipe = genome.decode(genes)
    plan = plan_merge(recipe, open_models(recipe))
    try:
        weight = {task.output.name: task.params["weight"][0] for task in plan.tasks}
    finally:
        plan.close()
    for layer, expected in enumerate([0.1, 0.2, 0.3, 0.4]):
        assert weight[f"model.layers.{layer}.mlp.down_proj.weight"] == pytest.approx(expected)
    assert weight["model.embed_tokens.weight"] == pytest.approx(0.05)
    assert weight["model.norm.weight"] == pytest.approx(0.45) and weight["lm_head.weight"] == pytest.approx(0.45)
    assert np.allclose(genome.encode(recipe), genes)
    # groups of two layers: one gene per slice, read on both of its layers
    grouped = RecipeGenome.from_text(text.replace("granularity: layer", "granularity: 2"), "slices.yaml", layout)
    assert [p.labels for p in grouped.parameters] == [("embed", "L0-1"), ("L2-3", "head")]


def test_a_per_layer_marker_at_the_top_of_a_slices_template_is_refused(llama_family, layout):
    text = SLICES_TEMPLATE.format(v1=llama_family["variant_1"], v2=llama_family["variant_2"])
    text = text.replace("dtype: float32", "parameters:\n  weight: {free: [0.0, 1.0], granularity: layer}\n"
                                          "dtype: float32")
    with pytest.raises(RecipeError, match=r"line 20: parameters.weight: a per-layer marker at the top level of a "
                                          r"`slices:` template would be read from its start again in every slice"):
        RecipeGenome.from_text(text, "slices.yaml", layout)


def test_the_heatmap_shows_a_slice_parameter_on_its_own_layers():
    from niches.plots import _heatmap_grids

    genome = RecipeGenome.from_text(SLICES_TEMPLATE.format(v1="a", v2="b"), "t.yaml", LayerLayout(4, ("embed",), ("head",)))
    (_, grid), = _heatmap_grids(genome, np.array([0.05, 0.1, 0.2, 0.3, 0.4, 0.45])).values()
    np.testing.assert_allclose(grid, [[0.05, 0.1, 0.2, np.nan, np.nan, np.nan],
                                      [np.nan, np.nan, np.nan, 0.3, 0.4, 0.45]])


def test_tied_bfloat16_models_have_no_separate_head_gene_target(tmp_path):
    """With tied embeddings the head is the embedding matrix (stored once): the layout has
    no lm_head, and the embeddings gene sets the one matrix both read."""
    from merging.synthetic import build_family

    family = build_family(tmp_path, family="llama", variants=2, seed=3, dtype=torch.bfloat16, tie_word_embeddings=True)
    layout = LayerLayout.of(Checkpoint("base", family["base"]))
    assert layout.pre_names == ("model.embed_tokens.weight",) and layout.post_names == ("model.norm.weight",)
    text = TEMPLATE.format(base=family["base"], v1=family["variant_1"], v2=family["variant_2"])
    genome = RecipeGenome.from_text(text.replace("dtype: float32", "dtype: bfloat16"), "template.yaml", layout)
    x = np.linspace(0.0, 1.0, genome.dimension)
    recipe = genome.decode(x)
    density = genome.values(x)[0]
    by_name = resolved_parameters(recipe)
    assert "lm_head.weight" not in by_name
    assert by_name["model.embed_tokens.weight"]["density"][0] == pytest.approx(density[0])
    assert by_name["model.norm.weight"]["density"][0] == pytest.approx(density[-1])
