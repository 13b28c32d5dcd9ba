"""The harness on real checkpoints: in-memory candidates, per-example vectors, the cache."""
from __future__ import annotations

import json

import pytest
import torch

from evaluation.harness import Harness, ScoreCache, candidate_hash
from evaluation.tasks import Task, TaskResult
from merging.engine import merge_to_disk, open_models, plan_merge
from merging.recipe import parse_recipe

PROMPTS = ["The quick brown", "Twelve apples and", "Model merging", "Der schnelle", "Evolution"]


@pytest.fixture
def tasks(tmp_path):
    rows = [{"prompt": p, "answer": str(i), "choices": ["fox", "dog", "cat"], "label": i % 3}
            for i, p in enumerate(PROMPTS)]
    data = tmp_path / "test.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    path = str(tmp_path / "{split}.jsonl")
    return [Task("gen", "generate", path, max_new_tokens=6),
            Task("mc", "multiple_choice", path, answer_field="label"),
            Task("ppl", "perplexity", path)]


def ties_recipe(family, density=0.5):
    return parse_recipe(f"""
merge_method: ties
base_model: {family['base']}
models:
  - {{model: {family['variant_1']}, parameters: {{weight: 0.6, density: {density}}}}}
  - {{model: {family['variant_2']}, parameters: {{weight: 0.4, density: {density}}}}}
""")


def test_per_example_vectors_have_the_task_length(llama_family, tasks):
    harness = Harness(llama_family["base"], device="cpu")
    results = harness.score_resident(tasks)
    for task in tasks:
        assert len(results[task.name].scores) == len(PROMPTS)
    assert all(s <= 0 for s in results["ppl"].scores)
    assert set(results["mc"].scores) <= {0.0, 1.0}


def test_in_memory_candidate_equals_the_merge_written_to_disk(llama_family, tmp_path):
    recipe = ties_recipe(llama_family)
    checkpoints = open_models(recipe)
    harness = Harness(llama_family["base"], device="cpu")
    harness.load_candidate(plan_merge(recipe, checkpoints))
    out = merge_to_disk(plan_merge(recipe, checkpoints), tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    with torch.no_grad():
        expected = reloaded(ids).logits
        got = harness.model(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    base = AutoModelForCausalLM.from_pretrained(llama_family["base"]).eval()
    assert not torch.allclose(base(ids).logits, got)


def test_a_cached_candidate_costs_no_forward_pass(llama_family, tasks, tmp_path):
    cache = tmp_path / "scores.jsonl"
    harness = Harness(llama_family["base"], device="cpu", cache=cache)
    recipe = ties_recipe(llama_family)
    checkpoints = open_models(recipe)
    first = harness.score_recipe(recipe, checkpoints, tasks)
    passes = harness.forward_passes
    assert passes > 0
    timings = harness.last_timings
    assert timings.merge > 0 and timings.plan > 0 and set(timings.evaluate) == {"gen", "mc", "ppl"}
    assert 0 < timings.new_tokens["gen"] <= 6 * len(PROMPTS) and timings.new_tokens["mc"] == 0
    again = harness.score_recipe(recipe, checkpoints, tasks)
    assert harness.forward_passes == passes
    assert harness.last_timings.cached == ["gen", "mc", "ppl"] and harness.last_timings.merge == 0
    assert {k: v.scores for k, v in again.items()} == {k: v.scores for k, v in first.items()}
    # a new process (a resumed run) reads the cache file: still no forward pass, no merge
    resumed = Harness(llama_family["base"], device="cpu", cache=cache)
    resumed.score_recipe(recipe, checkpoints, tasks)
    assert resumed.forward_passes == 0
    # a different candidate is evaluated
    resumed.score_recipe(ties_recipe(llama_family, density=0.3), checkpoints, tasks[:1])
    assert resumed.forward_passes > 0


def test_candidate_identity_is_the_resolved_recipe(llama_family):
    recipe = ties_recipe(llama_family)
    paths = {r: c.path for r, c in open_models(recipe).items()}
    assert candidate_hash(recipe, paths, 0) == candidate_hash(ties_recipe(llama_family), paths, 0)
    assert candidate_hash(recipe, paths, 0) != candidate_hash(recipe, paths, 1)
    assert candidate_hash(recipe, paths, 0) != candidate_hash(ties_recipe(llama_family, 0.3), paths, 0)


def test_a_cache_line_cut_short_by_a_kill_is_skipped(tmp_path):
    cache_file = tmp_path / "scores.jsonl"
    cache_file.write_text(json.dumps({"candidate": "a", "task_key": "k", "task": "t", "scores": [1.0]})
                          + "\n{\"candidate\": \"b\", \"task_k")
    cache = ScoreCache(cache_file)
    assert len(cache) == 1 and cache.get("a", "k").scores == [1.0]
    # the next entry is written on a line of its own, so it survives a reload
    cache.put("c", "k", TaskResult("t", [0.5]))
    again = ScoreCache(cache_file)
    assert len(again) == 2 and again.get("c", "k").scores == [0.5]


def test_a_deeper_candidate_rebuilds_the_resident_model(llama_family, tasks):
    recipe = parse_recipe(f"""
merge_method: passthrough
slices:
  - sources: [{{model: {llama_family['variant_1']}, layer_range: [0, 4]}}]
  - sources: [{{model: {llama_family['variant_2']}, layer_range: [2, 4]}}]
""")
    harness = Harness(llama_family["base"], device="cpu")
    results = harness.score_recipe(recipe, open_models(recipe), tasks[2:])
    assert harness.model.config.num_hidden_layers == 6
    assert len(results["ppl"].scores) == len(PROMPTS)
