"""The merge engine end to end on real checkpoints: parameters per tensor, layer
stacking, streaming output that transformers loads, and every bad input."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merging.checkpoint import Checkpoint
from merging.engine import iter_merged, merge_to_disk, open_models, plan_merge, run_recipe
from merging.errors import CheckpointError, EvomergeError, RecipeError
from merging.operators import METHODS
from merging.recipe import parse_recipe
from tests.conftest import write_recipe


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def plan_for(text: str):
    recipe = parse_recipe(text)
    return plan_merge(recipe, open_models(recipe))


def test_linear_merge_is_the_normalised_weighted_average(llama_family):
    a, b = llama_family["variant_1"], llama_family["variant_2"]
    plan = plan_for(f"""
merge_method: linear
models:
  - {{model: {a}, parameters: {{weight: 1.0}}}}
  - {{model: {b}, parameters: {{weight: 3.0}}}}
""")
    merged = dict(iter_merged(plan))
    sa, sb = load_state(a), load_state(b)
    assert merged.keys() == sa.keys()
    for name, tensor in merged.items():
        expected = (sa[name].double() + 3 * sb[name].double()) / 4
        torch.testing.assert_close(tensor.double(), expected, rtol=1e-6, atol=1e-7)


def test_ties_resolves_gradients_and_filters_per_tensor(llama_family):
    base, a, b = llama_family["base"], llama_family["variant_1"], llama_family["variant_2"]
    plan = plan_for(f"""
merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters: {{density: 0.5, weight: [1.0, 0.5]}}
  - model: {b}
    parameters:
      density: 0.3
      weight:
        - filter: self_attn
          value: 0.3
        - value: 0.7
parameters: {{normalize: true}}
""")
    merged = dict(iter_merged(plan))
    s0, sa, sb = load_state(base), load_state(a), load_state(b)
    ties = METHODS["ties"]
    for name in ["model.layers.0.self_attn.q_proj.weight", "model.layers.3.mlp.up_proj.weight",
                 "model.layers.2.self_attn.o_proj.weight", "model.embed_tokens.weight"]:
        layer = int(name.split(".")[2]) if ".layers." in name else 0
        w_a = 1.0 + (0.5 - 1.0) * layer / 3
        w_b = 0.3 if "self_attn" in name else 0.7
        expected = ties.merge(base=s0[name], tensors=[sa[name], sb[name]], weight=[w_a, w_b],
                              density=[0.5, 0.3], **{k: v for k, v in plan.tasks[0].params.items()
                                                      if k not in ("weight", "density")})
        torch.testing.assert_close(merged[name], expected.float(), rtol=0, atol=0)


def test_passthrough_stacks_layers_and_renumbers_them(llama_family, tmp_path):
    a, b = llama_family["variant_1"], llama_family["variant_2"]
    recipe = write_recipe(tmp_path, f"""
merge_method: passthrough
slices:
  - sources: [{{model: {a}, layer_range: [0, 3]}}]
  - sources: [{{model: {b}, layer_range: [1, 4]}}]
""")
    out = run_recipe(recipe, tmp_path / "stacked")
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    merged, sa, sb = load_state(out), load_state(a), load_state(b)
    assert torch.equal(merged["model.layers.2.mlp.down_proj.weight"], sa["model.layers.2.mlp.down_proj.weight"])
    assert torch.equal(merged["model.layers.3.mlp.down_proj.weight"], sb["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(merged["model.layers.5.self_attn.q_proj.weight"], sb["model.layers.3.self_attn.q_proj.weight"])
    assert torch.equal(merged["model.embed_tokens.weight"], sa["model.embed_tokens.weight"])
    assert torch.equal(merged["model.norm.weight"], sb["model.norm.weight"])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 6


RECIPES = {
    "linear": "merge_method: linear\nmodels:\n  - {{model: {a}, parameters: {{weight: 0.6}}}}\n"
              "  - {{model: {b}, parameters: {{weight: 0.4}}}}\n",
    "task_arithmetic": "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                       "  - {{model: {a}, parameters: {{weight: 0.5}}}}\n"
                       "  - {{model: {b}, parameters: {{weight: 0.5}}}}\nparameters: {{lambda: 0.8}}\n",
    "ties": "merge_method: ties\nbase_model: {base}\nmodels:\n"
            "  - {{model: {a}, parameters: {{weight: 1, density: 0.4}}}}\n"
            "  - {{model: {b}, parameters: {{weight: 1, density: 0.4}}}}\n",
    "dare_ties": "merge_method: dare_ties\nbase_model: {base}\nmodels:\n"
                 "  - {{model: {a}, parameters: {{weight: 0.5, density: 0.4}}}}\n"
                 "  - {{model: {b}, parameters: {{weight: 0.5, density: 0.4}}}}\n",
    "dare_linear": "merge_method: dare_linear\nbase_model: {base}\nmodels:\n"
                   "  - {{model: {a}, parameters: {{weight: 0.5, density: 0.4}}}}\n"
                   "  - {{model: {b}, parameters: {{weight: 0.5, density: 0.4}}}}\n",
    "breadcrumbs_ties": "merge_method: breadcrumbs_ties\nbase_model: {base}\nmodels:\n"
                        "  - {{model: {a}, parameters: {{weight: 1, density: 0.8, gamma: 0.05}}}}\n"
                        "  - {{model: {b}, parameters: {{weight: 1, density: 0.8, gamma: 0.05}}}}\n",
    "breadcrumbs": "merge_method: breadcrumbs\nbase_model: {base}\nmodels:\n"
                   "  - {{model: {a}, parameters: {{weight: 1, density: 0.8, gamma: 0.05}}}}\n",
    "slerp": "merge_method: slerp\nbase_model: {a}\nslices:\n  - sources:\n"
             "      - {{model: {a}, layer_range: [0, 4]}}\n      - {{model: {b}, layer_range: [0, 4]}}\n"
             "parameters:\n  t: [0, 0.5, 1]\n",
}


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_every_method_writes_a_checkpoint_transformers_loads(llama_family, tmp_path, method):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    paths = {k: llama_family[v] for k, v in [("base", "base"), ("a", "variant_1"), ("b", "variant_2")]}
    recipe = write_recipe(tmp_path, RECIPES[method].format(**paths) + "dtype: bfloat16\n")
    out = run_recipe(recipe, tmp_path / "merged", seed=3)
    for name in ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md"]:
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert f"merge_method: {method}" in card and str(paths["a"]) in card
    model = AutoModelForCausalLM.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(out)
    logits = model(**tokenizer("merged models add up", return_tensors="pt")).logits
    assert torch.isfinite(logits).all()
    assert not torch.equal(load_state(out)["model.layers.1.mlp.up_proj.weight"].float(),
                           load_state(paths["base"])["model.layers.1.mlp.up_proj.weight"].float())


def test_random_methods_are_deterministic_under_a_seed(llama_family):
    paths = {"base": llama_family["base"], "a": llama_family["variant_1"], "b": llama_family["variant_2"]}
    plan = plan_for(RECIPES["dare_ties"].format(**paths))
    first = dict(iter_merged(plan, seed=7))
    again = dict(iter_merged(plan, seed=7))
    other = dict(iter_merged(plan, seed=8))
    name = "model.layers.2.mlp.up_proj.weight"
    assert torch.equal(first[name], again[name])
    assert not torch.equal(first[name], other[name])


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_tensors_merged_at_once_change_no_bit(sharded_family, method):
    """`--threads` runs several tensors at once on the shared intra-op pool; reductions
    (the L1 rescale, norms) must not change with it, on bfloat16 sharded sources."""
    base, a = sharded_family["base"], sharded_family["variant_1"]
    plan = plan_for(RECIPES[method].format(base=base, a=a, b=base))
    try:
        one = dict(iter_merged(plan, seed=5, threads=1))
        three = dict(iter_merged(plan, seed=5, threads=3))
    finally:
        plan.close()
    assert sorted(one) == sorted(three) == sorted(task.output.name for task in plan.tasks)
    assert all(torch.equal(one[name].view(-1).view(torch.uint8), three[name].view(-1).view(torch.uint8))
               for name in one)


def test_in_memory_merge_equals_the_checkpoint_on_disk(sharded_family, tmp_path):
    base, a = sharded_family["base"], sharded_family["variant_1"]
    text = RECIPES["ties"].format(base=base, a=a, b=a).replace(f"  - {{model: {a}, parameters: {{weight: 1, density: 0.4}}}}\n", "", 1)
    plan = plan_for(text)
    in_memory = dict(iter_merged(plan))
    out = merge_to_disk(plan, tmp_path / "merged", max_shard_bytes=50_000)
    assert (out / "model.safetensors.index.json").is_file()
    on_disk = load_state(out)
    assert on_disk.keys() == in_memory.keys()
    assert all(torch.equal(on_disk[k], in_memory[k]) for k in on_disk)
    assert on_disk["model.norm.weight"].dtype == torch.bfloat16  # source dtype kept without `dtype:`


@pytest.mark.parametrize("family", ["gpt2", "qwen2", "gpt_neox"])
def test_other_families_merge_and_stack(tmp_path, family):
    from transformers import AutoModelForCausalLM

    from merging.synthetic import build_family

    paths = build_family(tmp_path / "models", family=family, variants=2, seed=0)
    recipe = write_recipe(tmp_path, f"""
merge_method: passthrough
slices:
  - sources: [{{model: {paths['variant_1']}, layer_range: [0, 4]}}]
  - sources: [{{model: {paths['variant_2']}, layer_range: [2, 4]}}]
""")
    out = run_recipe(recipe, tmp_path / "stacked")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 6
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


# --- bad input: one clear message, and no output folder --------------------------------

def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _expect_failure(tmp_path: Path, recipe_text: str, error: type, pattern: str) -> None:
    recipe = write_recipe(tmp_path, recipe_text)
    with pytest.raises(error, match=pattern):
        run_recipe(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_shape_mismatch_names_tensor_and_models(llama_family, tmp_path):
    from merging.synthetic import build_family

    wide = build_family(tmp_path / "wide", family="llama", variants=0, hidden_size=128)["base"]
    _expect_failure(tmp_path, RECIPES["linear"].format(a=llama_family["variant_1"], b=wide),
                    CheckpointError, r"shape mismatch for tensor model\.embed_tokens\.weight.*\[384, 64\].*\[384, 128\]")


def test_missing_tensor_names_tensor_and_model(llama_family, tmp_path):
    broken = _copy(llama_family["variant_2"], tmp_path / "broken")
    state = load_state(broken)
    del state["model.layers.1.mlp.gate_proj.weight"]
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    _expect_failure(tmp_path, RECIPES["linear"].format(a=llama_family["variant_1"], b=broken),
                    CheckpointError, r"model\.layers\.1\.mlp\.gate_proj\.weight is missing in model '.*broken'")


def test_different_architectures_are_refused(llama_family, tmp_path):
    from merging.synthetic import build_family

    gpt2 = build_family(tmp_path / "gpt2", family="gpt2", variants=0)["base"]
    _expect_failure(tmp_path, RECIPES["linear"].format(a=llama_family["variant_1"], b=gpt2),
                    CheckpointError, r"different architectures: .* is llama, .* is gpt2")


def test_models_of_different_depth_are_refused(llama_family, tmp_path):
    from merging.synthetic import build_family

    deep = build_family(tmp_path / "deep", variants=0, num_hidden_layers=6)["base"]
    for a, b in ((llama_family["variant_1"], deep), (deep, llama_family["variant_1"])):
        _expect_failure(tmp_path, RECIPES["linear"].format(a=a, b=b),
                        CheckpointError, r"as many layers: .* gives 4, .* gives 6|as many layers: .* gives 6, .* gives 4")


def test_a_tensor_only_a_later_model_has_is_refused_not_dropped(llama_family, tmp_path):
    extended = _copy(llama_family["variant_2"], tmp_path / "extended")
    state = load_state(extended)
    state["model.layers.2.mlp.extra_bias"] = torch.zeros(8)
    save_file(state, extended / "model.safetensors", metadata={"format": "pt"})
    _expect_failure(tmp_path, RECIPES["linear"].format(a=llama_family["variant_1"], b=extended),
                    CheckpointError, r"'.*extended' has tensor\(s\) model\.layers\.2\.mlp\.extra_bias layer 2 "
                                     r"that model '.*variant_1'")


def test_a_slice_must_list_the_base_it_subtracts(llama_family, tmp_path):
    base, a = llama_family["base"], llama_family["variant_1"]
    text = (f"merge_method: ties\nbase_model: {base}\nslices:\n  - sources:\n"
            f"      - {{model: {a}, layer_range: [2, 4], parameters: {{density: 0.5, weight: 1.0}}}}\n")
    _expect_failure(tmp_path, text, RecipeError, r"line 4: slices\[0\]\.sources: ties subtracts the base model .* among this slice's sources")


def test_nan_in_a_source_leaves_no_output(llama_family, tmp_path):
    poisoned = _copy(llama_family["variant_2"], tmp_path / "poisoned")
    state = load_state(poisoned)
    state["model.layers.3.mlp.up_proj.weight"][0, 0] = float("inf")
    save_file(state, poisoned / "model.safetensors", metadata={"format": "pt"})
    _expect_failure(tmp_path, RECIPES["linear"].format(a=llama_family["variant_1"], b=poisoned),
                    CheckpointError, r"poisoned'.*model\.layers\.3\.mlp\.up_proj\.weight.*NaN or Inf")


def test_layer_range_beyond_the_model(llama_family, tmp_path):
    _expect_failure(tmp_path, f"merge_method: passthrough\nslices:\n  - sources:\n"
                              f"      - {{model: {llama_family['base']}, layer_range: [2, 9]}}\n",
                    RecipeError, r"layer_range \[2, 9\].*exceeds its 4 layers")


def test_existing_output_is_refused_before_any_work(llama_family, tmp_path):
    (tmp_path / "out").mkdir()
    recipe = write_recipe(tmp_path, RECIPES["linear"].format(a=llama_family["variant_1"], b=llama_family["variant_2"]))
    with pytest.raises(EvomergeError, match="already exists.*--overwrite"):
        run_recipe(recipe, tmp_path / "out")


def test_relative_model_paths_resolve_beside_the_recipe(llama_family, tmp_path, monkeypatch):
    models = tmp_path / "project" / "models"
    models.mkdir(parents=True)
    for name in ("variant_1", "variant_2"):
        (models / name).symlink_to(llama_family[name])
    recipe = write_recipe(tmp_path / "project", RECIPES["linear"].format(a="models/variant_1", b="models/variant_2"))
    monkeypatch.chdir(tmp_path)
    out = run_recipe(recipe, tmp_path / "merged")
    assert Checkpoint.open(str(out)).tensors
