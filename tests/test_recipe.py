"""Recipe parsing: mergekit's schema, parameter evaluation, and errors that name the line."""
from __future__ import annotations

import re

import pytest

from merging.errors import RecipeError
from merging.recipe import (
    did_you_mean, evaluate_setting, output_slices, parameter_scopes, parse_recipe, resolve_parameter,
)
from merging.operators.base import REQUIRED

MERGEKIT_TIES = """\
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: garage-bAInd/Platypus2-13B
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: WizardLM/WizardMath-13B-V1.0
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: TheBloke/Llama-2-13B-fp16
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""

MERGEKIT_SLERP = """\
slices:
  - sources:
      - model: psmathur/orca_mini_v3_13b
        layer_range: [0, 40]
      - model: garage-bAInd/Platypus2-13B
        layer_range: [0, 40]
merge_method: slerp
base_model: psmathur/orca_mini_v3_13b
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: float16
"""


def test_mergekit_readme_recipes_parse_unchanged():
    ties = parse_recipe(MERGEKIT_TIES)
    assert ties.merge_method == "ties" and len(ties.models) == 3
    assert ties.referenced_models()[0] == "TheBloke/Llama-2-13B-fp16"
    slices = output_slices(ties)
    assert [s.model for s in slices[0].sources][-1] == "TheBloke/Llama-2-13B-fp16"  # base joins
    slerp = parse_recipe(MERGEKIT_SLERP)
    assert slerp.slices[0].sources[1].layer_range == (0, 40)


@pytest.mark.parametrize("t,expected", [(0.0, 0.0), (0.25, 0.5), (0.5, 0.3), (0.625, 0.5), (1.0, 1.0)])
def test_gradients_interpolate_linearly_between_evenly_spaced_points(t, expected):
    assert evaluate_setting([0, 0.5, 0.3, 0.7, 1], "x", t) == pytest.approx(expected)


def test_numbers_yaml_reads_as_strings_are_numbers_as_in_mergekit():
    """PyYAML reads `1e-3` (no dot) as a string; mergekit's pydantic takes it as 0.001,
    also inside a gradient, which then interpolates."""
    recipe = parse_recipe("merge_method: multislerp\nmodels: [{model: a, parameters: {weight: 1}}, "
                          "{model: b, parameters: {weight: 1}}]\n"
                          "parameters: {eps: [1e-3, 3e-3], normalize_weights: 1e-3}\n")
    scopes = parameter_scopes(recipe, output_slices(recipe)[0], None)
    assert resolve_parameter("eps", 1e-8, scopes, "w", 0.0, "w") == pytest.approx(1e-3)
    assert resolve_parameter("eps", 1e-8, scopes, "w", 0.5, "w") == pytest.approx(2e-3)
    with pytest.raises(RecipeError, match="true or false"):
        resolve_parameter("normalize_weights", True, scopes, "w", 0.0, "w")


def test_filters_take_the_first_match_and_fall_back():
    recipe = parse_recipe(MERGEKIT_SLERP)
    t_setting = recipe.parameters["t"]
    assert evaluate_setting(t_setting, "model.layers.3.self_attn.q_proj.weight", 0.25) == pytest.approx(0.5)
    assert evaluate_setting(t_setting, "model.layers.3.mlp.up_proj.weight", 0.0) == pytest.approx(1.0)
    assert evaluate_setting(t_setting, "model.norm.weight", 0.9) == pytest.approx(0.5)


def test_filters_without_match_give_none_and_the_next_scope_wins():
    recipe = parse_recipe("""\
merge_method: linear
models:
  - model: a
    parameters:
      weight:
        - filter: mlp
          value: 2.0
  - model: b
    parameters: {weight: 1.0}
parameters:
  weight: 0.25
""")
    slice_ = output_slices(recipe)[0]
    scopes = parameter_scopes(recipe, slice_, "a")
    assert resolve_parameter("weight", REQUIRED, scopes, "layers.0.mlp.w", 0, "a") == 2.0
    assert resolve_parameter("weight", REQUIRED, scopes, "layers.0.attn.w", 0, "a") == 0.25


def test_precedence_source_over_slice_over_top_level():
    recipe = parse_recipe("""\
merge_method: slerp
base_model: a
slices:
  - sources:
      - {model: a, layer_range: [0, 2]}
      - {model: b, layer_range: [0, 2], parameters: {}}
    parameters: {t: 0.7}
parameters: {t: 0.1}
""")
    slice_ = output_slices(recipe)[0]
    assert resolve_parameter("t", REQUIRED, parameter_scopes(recipe, slice_, None), "w", 0, "w") == 0.7
    recipe.slices[0].parameters = None
    slice_ = output_slices(recipe)[0]
    assert resolve_parameter("t", REQUIRED, parameter_scopes(recipe, slice_, None), "w", 0, "w") == 0.1


def test_missing_required_parameter_names_model_and_tensor():
    with pytest.raises(RecipeError, match="missing required parameter 'weight' for model 'a'"):
        resolve_parameter("weight", REQUIRED, [None, None], "w", 0, "model 'a', tensor w")


def test_wrong_type_is_refused():
    with pytest.raises(RecipeError, match="must be a number"):
        resolve_parameter("weight", REQUIRED, [{"weight": "heavy"}], "w", 0, "model 'a'")
    with pytest.raises(RecipeError, match="true or false"):
        resolve_parameter("normalize", True, [{"normalize": 1.0}], "w", 0, "tensor w")


@pytest.mark.parametrize("text,line,pattern", [
    ("merge_method: ties\nbase_model: a\nmodels:\n  - model: b\n    paramters: {}\n", 5, "unknown key 'paramters'"),
    ("merge_method: tiez\nmodels:\n  - model: b\n", 1, "unknown merge method 'tiez'.*ties"),
    ("merge_method: ties\nbase_model: a\nmodels:\n  - model: b\n    parameters:\n      densty: 0.5\n",
     6, "unknown parameter 'densty'"),
    ("merge_method: ties\nmodels:\n  - model: b\n", 1, "needs a `base_model`"),
    ("merge_method: slerp\nbase_model: a\nmodels:\n  - model: a\n  - model: b\n  - model: c\n", 3, "at most 1"),
    ("merge_method: linear\nmodels:\n  - model: b\ndtype: float8\n", 4, "unknown dtype 'float8'"),
    ("merge_method: passthrough\nslices:\n  - sources:\n      - model: a\n        layer_range: [4, 2]\n",
     5, "empty or negative"),
    ("merge_method: linear\nmodules:\n  text: {}\n", 3, "module 'text' needs exactly one of `models:` or `slices:`"),
    ("merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight: [1, {x: 2}]\n", 5, ""),
    ("merge_method: linear\n", 1, "exactly one of `models:`, `slices:` or `modules:`"),
])
def test_bad_recipes_name_the_line(text, line, pattern):
    with pytest.raises(RecipeError, match=rf"line {line}\b.*{pattern}"):
        parse_recipe(text, source="r.yaml")


def test_bad_yaml_names_the_line():
    with pytest.raises(RecipeError, match=r"r\.yaml, line 4: invalid YAML.*starts on line 3"):
        parse_recipe("merge_method: ties\nmodels:\n  - model: [a\n", source="r.yaml")
    with pytest.raises(RecipeError, match=r"r\.yaml, line 2: invalid YAML"):
        parse_recipe("merge_method: ties\n  base_model: a\n", source="r.yaml")


def test_a_recipe_that_is_not_a_mapping():
    with pytest.raises(RecipeError, match="YAML mapping"):
        parse_recipe("- just\n- a list\n")


def test_to_yaml_round_trips():
    recipe = parse_recipe(MERGEKIT_TIES)
    assert parse_recipe(recipe.to_yaml()) == recipe


def test_a_typo_inside_a_filter_entry_is_named_on_its_line():
    text = ("merge_method: ties\nbase_model: a\nmodels:\n  - model: b\n    parameters:\n      density: 0.5\n"
            "      weight:\n        - filter: mlp\n          valu: 0.3\n        - value: 0.7\n")
    with pytest.raises(RecipeError, match=r"line 9: models\[0\]\.parameters\.weight\[0\]\.valu: unknown key 'valu'"):
        parse_recipe(text)


@pytest.mark.parametrize("text, line, message", [
    ("merge_methd: ties\nbase_model: a\nmodels:\n  - model: b\n", 1,
     "merge_methd: unknown key 'merge_methd'; did you mean 'merge_method'?"),
    ("merge_method: ties\nbase_model: a\nmodels:\n  - model: b\n    paramters: {}\n", 5,
     "unknown key 'paramters'; did you mean 'parameters'?"),
    ("merge_method: passthrough\nslices:\n  - sources:\n      - model: a\n        layer_rang: [0, 2]\n", 5,
     "unknown key 'layer_rang'; did you mean 'layer_range'?"),
    ("merge_method: ties\nbase_model: a\nmodels:\n  - model: b\n    parameters:\n      weight:\n"
     "        - filtre: mlp\n          value: 0.3\n", 7, "unknown key 'filtre'; did you mean 'filter'?"),
    ("merge_method: ties\nbase_model: a\nmodels:\n  - model: b\n    parameters:\n      densty: 0.5\n", 6,
     "unknown parameter 'densty'; did you mean 'density'?"),
])
def test_an_unknown_key_is_named_on_its_line_with_the_near_one(text, line, message):
    """A typo of a required key (merge_methd) is reported as the typo, on its own line,
    not as the required key missing; the suggestion is a key allowed at that place."""
    with pytest.raises(RecipeError) as error:
        parse_recipe(text, source="r.yaml")
    assert str(error.value).startswith(f"r.yaml, line {line}: ")
    assert re.search(re.escape(message.rstrip("$")) + ("$" if message.endswith("$") else ""), str(error.value))


def test_did_you_mean():
    assert did_you_mean("fitnes", ["fitness", "report", "models"]) == "; did you mean 'fitness'?"
    assert did_you_mean("zebra", ["fitness", "report"]) == ""


