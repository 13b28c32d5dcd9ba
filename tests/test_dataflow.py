"""Data-flow-space merges: the path an inclusion vector picks, the scales along it, and
the folded checkpoint, checked against the same stack with the scales applied at run time."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from merging.dataflow import DataflowSpace, dataflow_recipe, passthrough_recipe, reference_logits
from merging.engine import merge_to_disk, open_models, plan_merge
from merging.errors import RecipeError
from merging.recipe import parse_recipe
from merging.synthetic import TINY_CONFIGS, build_family

# Two 4-layer models, 2 repeats: slots 0-3 are model 0, 4-7 model 1, 8-11 model 0 again, 12-15 model 1.
CHOSEN_SLOTS = [1, 5, 6, 9, 10, 12]
CHOSEN_PATH = [(0, 0), (0, 1), (1, 1), (1, 2), (0, 1), (0, 2), (1, 0), (0, 3)]


def inclusion(space: DataflowSpace, slots: list[int]) -> torch.Tensor:
    values = -torch.ones(space.num_slots)
    values[slots] = 1.0
    return values


def random_scales(space: DataflowSpace, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.empty(space.num_layers, space.num_layers).uniform_(0.5, 2.0, generator=generator)


def merged_logits(recipe, out: Path, input_ids: torch.Tensor) -> torch.Tensor:
    """Merge with the engine, load with plain transformers, run."""
    from transformers import AutoModelForCausalLM

    plan = plan_merge(recipe, open_models(recipe))
    try:
        merge_to_disk(plan, out)
    finally:
        plan.close()
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(out).eval()(input_ids).logits


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def space(llama_family) -> DataflowSpace:
    return DataflowSpace([str(llama_family["base"]), str(llama_family["variant_1"])], repeats=2)


def test_slots_are_the_layers_of_every_model_repeated(space):
    assert (space.num_layers, space.num_slots) == (8, 16)
    assert space.layers == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3)]


def test_path_follows_the_chosen_slots_between_model_0s_first_and_last_layer(space):
    assert space.path_from_inclusion(inclusion(space, CHOSEN_SLOTS)) == CHOSEN_PATH
    assert space.path_from_inclusion(inclusion(space, [])) == [(0, 0), (0, 3)]
    assert space.path_from_inclusion(inclusion(space, [0, 1, 2, 3])) == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert space.path_from_inclusion(inclusion(space, [0, 4, 15])) == [(0, 0), (1, 0), (1, 3), (0, 3)]
    assert space.path_from_inclusion(inclusion(space, [3, 8])) == [(0, 0), (0, 3), (0, 0), (0, 3)]
    with pytest.raises(RecipeError, match="16 slots"):
        space.path_from_inclusion(torch.ones(8))


def test_scales_are_read_along_the_path(space):
    scales = random_scales(space)
    steps = space.scale_per_step(CHOSEN_PATH, scales)
    index = space.layers.index
    assert steps[0] == 1.0
    assert steps[1:] == [scales[index(a), index(b)].item() for a, b in zip(CHOSEN_PATH, CHOSEN_PATH[1:])]
    per_model = space.expand_model_scales([[1.0, 2.0], [3.0, 1.0]])
    assert space.scale_per_step(CHOSEN_PATH, per_model) == [1.0, 1.0, 2.0, 1.0, 3.0, 1.0, 2.0, 3.0]
    with pytest.raises(RecipeError, match="8 x 8"):
        space.scale_per_step(CHOSEN_PATH, torch.ones(2, 2))


@pytest.mark.parametrize("bad", [0.0, -0.5, float("nan"), float("inf")])
def test_non_positive_scales_are_refused(space, bad):
    scales = torch.ones(space.num_layers, space.num_layers)
    scales[5, 6] = bad
    with pytest.raises(RecipeError, match=r"> 0.*\(5, 6\)"):
        dataflow_recipe(space, inclusion(space, CHOSEN_SLOTS), scales)
    with pytest.raises(RecipeError, match="> 0"):
        passthrough_recipe(space, CHOSEN_PATH, [1.0, 2.0, bad, 1.0, 1.0, 1.0, 1.0, 1.0])


def test_recipe_has_one_slice_per_step_with_the_running_scale_on_the_output_projections(space):
    recipe = dataflow_recipe(space, inclusion(space, CHOSEN_SLOTS), space.expand_model_scales([[1, 2], [4, 1]]))
    assert parse_recipe(recipe.to_yaml()) == recipe  # a mergekit-style recipe
    assert [(space.sources.index(s.sources[0].model), s.sources[0].layer_range[0]) for s in recipe.slices] == CHOSEN_PATH
    assert all(s.sources[0].layer_range[1] == s.sources[0].layer_range[0] + 1 for s in recipe.slices)
    running = [1, 1, 2, 2, 8, 8, 16, 64]
    for slice_, product in zip(recipe.slices, running):
        expected = None if product == 1 else {"scale": [
            {"filter": "self_attn.o_proj", "value": 1 / product},
            {"filter": "mlp.down_proj", "value": 1 / product}, {"value": 1.0}]}
        assert slice_.model_dump(exclude_none=True, mode="json").get("parameters") == expected


def test_model_0s_own_path_without_scales_gives_model_0(space, llama_family, tmp_path):
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    recipe = dataflow_recipe(space, inclusion(space, [0, 1, 2, 3]))
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(llama_family["base"]).eval()(ids).logits
    torch.testing.assert_close(merged_logits(recipe, tmp_path / "out", ids), expected, rtol=0, atol=0)


def fold_errors(space: DataflowSpace, out: Path) -> tuple[float, float]:
    """Relative logit difference of the folded checkpoint, and of the unscaled stack, to
    the stack scaled at run time (on CHOSEN_PATH, random scales in [0.5, 2])."""
    scales = random_scales(space, seed=1)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(2))
    folded = merged_logits(dataflow_recipe(space, inclusion(space, CHOSEN_SLOTS), scales), out, ids)
    expected = reference_logits(space, CHOSEN_PATH, space.scale_per_step(CHOSEN_PATH, scales), ids)
    unscaled = reference_logits(space, CHOSEN_PATH, [1.0] * len(CHOSEN_PATH), ids)
    return relative(folded, expected), relative(unscaled, expected)


EPSILON_KEYS = {"gpt2": "layer_norm_epsilon", "phi": "layer_norm_eps", "gpt_neox": "layer_norm_eps"}
FOLDABLE = sorted(set(TINY_CONFIGS) - {"gemma2"})  # gemma2's extra norms are refused (tested below)


@pytest.mark.parametrize("family", FOLDABLE)
def test_folded_checkpoint_equals_the_stack_scaled_at_run_time(tmp_path, family):
    # The fold is exact for norms with eps = 0; a negligible eps leaves float32 rounding.
    epsilon = {EPSILON_KEYS.get(family, "rms_norm_eps"): 1e-12}
    paths = build_family(tmp_path / "models", family=family, variants=1, seed=0, **epsilon)
    space = DataflowSpace([str(paths["base"]), str(paths["variant_1"])], repeats=2)
    fold_error, scale_effect = fold_errors(space, tmp_path / "out")
    assert fold_error < 1e-5
    assert scale_effect > 1e-2  # the scales matter: the check can fail


def test_with_the_default_eps_the_fold_is_close(space, tmp_path):
    # The norms of step t see eps / P_t**2 instead of eps. Random-init streams are small
    # (mean square ~1e-4 against eps = 1e-6), so this is the unfavourable case.
    fold_error, _ = fold_errors(space, tmp_path / "out")
    assert fold_error < 1e-3


@pytest.mark.parametrize("family", FOLDABLE)
def test_with_the_default_eps_and_realistic_weights_the_fold_meets_1e_4(tmp_path, family):
    # The family's own eps (1e-6 RMSNorm, 1e-5 LayerNorm), and weights drawn ten times
    # larger than transformers' tiny default (initializer_range 0.2 instead of 0.02), so
    # that the stream's mean square is far above eps, as in trained models.
    paths = build_family(tmp_path / "models", family=family, variants=1, seed=0, initializer_range=0.2)
    space = DataflowSpace([str(paths["base"]), str(paths["variant_1"])], repeats=2)
    fold_error, scale_effect = fold_errors(space, tmp_path / "out")
    assert fold_error < 1e-4
    assert scale_effect > 1e-2


def _save_tiny(folder: Path, model_type: str, **config) -> str:
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model(model_type, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, vocab_size=64, **config)
    AutoModel.from_config(config).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("model_type, config, reason", [
    ("bert", {}, "post-norm"),
    ("gemma2", {"head_dim": 16, "num_key_value_heads": 1}, "post-attention and post-feedforward norms"),
])
def test_families_that_cannot_fold_say_why(tmp_path, model_type, config, reason):
    from niches.genome import DataflowGenome

    space = DataflowSpace([_save_tiny(tmp_path / "a", model_type, **config)])
    every_layer = torch.ones(space.num_slots)
    with pytest.raises(RecipeError, match=f"{model_type}.*{reason}"):
        dataflow_recipe(space, every_layer, torch.ones(space.num_layers, space.num_layers))
    assert len(dataflow_recipe(space, every_layer).slices) == 2  # without scales it still stacks
    # a search over scales is refused when it is set up, not at its first candidate
    for scales in ("layer_pairs", "model_pairs"):
        with pytest.raises(RecipeError, match=rf"model {tmp_path / 'a'} \(model 0 of the data-flow space\): "
                                              rf".*{model_type}.*{reason}"):
            DataflowGenome(space, scales=scales)
    assert DataflowGenome(space, scales="none").dimension == space.num_slots
