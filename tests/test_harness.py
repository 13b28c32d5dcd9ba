"""The harness on real checkpoints: in-memory candidates, per-example vectors, the cache."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from evaluation.harness import Harness, ScoreCache
from evaluation.identity import plan_key
from evaluation.tasks import Task, TaskResult
from merging.engine import merge_to_disk, open_models, plan_merge
from merging.errors import CheckpointError
from merging.recipe import parse_recipe

FAMILIES = {"float32": dict(dtype=torch.float32), "bfloat16": dict(dtype=torch.bfloat16),
            "tied": dict(dtype=torch.float32, tie_word_embeddings=True)}
"""Sources in both dtypes, and with a tied head, wherever dtype or tying can change the outcome."""


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory) -> dict[str, Path]:
    from merging.synthetic import build_family

    return build_family(tmp_path_factory.mktemp(request.param), variants=2, seed=5, **FAMILIES[request.param])

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


def test_in_memory_candidate_equals_the_merge_written_to_disk(family, tmp_path):
    recipe = ties_recipe(family)
    checkpoints = open_models(recipe)
    harness = Harness(family["base"], device="cpu")
    harness.load_candidate(plan_merge(recipe, checkpoints))
    out = merge_to_disk(plan_merge(recipe, checkpoints), tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    with torch.no_grad():
        expected = reloaded(ids).logits
        got = harness.model(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    base = AutoModelForCausalLM.from_pretrained(family["base"]).eval()
    assert not torch.allclose(base(ids).logits, got)
    assert harness.rebuilds == 0 and harness.model.dtype == reloaded.dtype


def test_a_cached_candidate_costs_no_forward_pass(llama_family, tasks, tmp_path):
    cache = tmp_path / "scores.jsonl"
    harness = Harness(llama_family["base"], device="cpu", cache=cache)
    recipe = ties_recipe(llama_family)
    checkpoints = open_models(recipe)
    first = harness.score_recipe(recipe, checkpoints, tasks)
    passes = harness.forward_passes
    assert passes > 0
    timings = harness.last_timings
    assert timings.merge > 0 and timings.plan > 0 and timings.probe > 0 and set(timings.evaluate) == {"gen", "mc", "ppl"}
    assert 0 < timings.new_tokens["gen"] <= 6 * len(PROMPTS) and timings.new_tokens["mc"] == 0
    again = harness.score_recipe(recipe, checkpoints, tasks)
    assert harness.forward_passes == passes
    assert harness.last_timings.cached == ["gen", "mc", "ppl"] and harness.last_timings.merge == 0
    assert harness.last_timings.probe == 0
    assert {k: v.scores for k, v in again.items()} == {k: v.scores for k, v in first.items()}
    # a new process (a resumed run) reads the cache file: still no forward pass, no merge
    resumed = Harness(llama_family["base"], device="cpu", cache=cache)
    resumed.score_recipe(recipe, checkpoints, tasks)
    assert resumed.forward_passes == 0
    # a different candidate is evaluated
    resumed.score_recipe(ties_recipe(llama_family, density=0.3), checkpoints, tasks[:1])
    assert resumed.forward_passes > 0


def test_candidate_identity_is_the_resolved_plan(llama_family, monkeypatch):
    """Spellings of one plan share a key; anything that changes a tensor changes it."""
    def key(recipe, seed=0):
        return plan_key(plan_merge(recipe, open_models(recipe)), seed)

    recipe = ties_recipe(llama_family)
    assert key(recipe) == key(ties_recipe(llama_family))
    assert key(recipe) == key(recipe, seed=1)  # ties draws no random numbers: the seed is not used
    assert key(recipe) != key(ties_recipe(llama_family, 0.3))
    one = ties_recipe(llama_family).model_dump()
    as_int = {**one, "models": [{**m, "parameters": {**m["parameters"], "weight": 1}} for m in one["models"]]}
    as_float = {**one, "models": [{**m, "parameters": {**m["parameters"], "weight": 1.0}} for m in one["models"]]}
    from merging.recipe import Recipe

    assert key(Recipe.model_validate(as_int)) == key(Recipe.model_validate(as_float)) != key(recipe)
    # a relative path to the same folder is the same source
    monkeypatch.chdir(llama_family["base"].parent)
    relative = {**one, "base_model": "base",
                "models": [{**m, "model": Path(m["model"]).name} for m in one["models"]]}
    assert key(Recipe.model_validate(relative)) == key(recipe)
    # a random method uses the seed
    dare = parse_recipe("""
merge_method: dare_ties
base_model: base
models:
  - {model: variant_1, parameters: {weight: 0.6, density: 0.5}}
  - {model: variant_2, parameters: {weight: 0.4, density: 0.5}}
""")
    assert key(dare, seed=0) != key(dare, seed=1)


def test_a_cache_line_cut_short_by_a_kill_is_skipped(tmp_path):
    cache_file = tmp_path / "scores.jsonl"
    cache_file.write_text(json.dumps({"candidate": "a", "task_key": "k", "task": "t", "scores": [1.0]})
                          + "\n{\"candidate\": \"b\", \"task_k")
    cache = ScoreCache(cache_file)
    assert len(cache) == 1 and cache.get("a", "k").result.scores == [1.0]
    # the next entry is written on a line of its own, so it survives a reload
    cache.put("c", "k", TaskResult("t", [0.5]))
    again = ScoreCache(cache_file)
    assert len(again) == 2 and again.get("c", "k").result.scores == [0.5]


def passthrough_recipe(family):
    return parse_recipe(f"""
merge_method: passthrough
slices:
  - sources: [{{model: {family['variant_1']}, layer_range: [0, 4]}}]
  - sources: [{{model: {family['variant_2']}, layer_range: [2, 4]}}]
""")


def assert_scores_the_export(harness: Harness, recipe, out: Path) -> None:
    """The resident candidate is the model from_pretrained makes of its exported checkpoint:
    same dtype, bit-identical logits."""
    from transformers import AutoModelForCausalLM

    merge_to_disk(plan_merge(recipe, open_models(recipe)), out)
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert harness.model.dtype == exported.dtype
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(harness.model(ids).logits, exported(ids).logits, rtol=0, atol=0)


def test_a_deeper_candidate_is_the_model_its_export_loads_as(family, tasks, tmp_path):
    """DFS candidates: a new resident model in the sources' dtype, tied where they are, with
    the template's generation config; and back to the template's shape after it."""
    harness = Harness(family["base"], device="cpu")
    harness.model.generation_config.max_new_tokens = 3  # the template's decoding settings survive a rebuild
    recipe = passthrough_recipe(family)
    results = harness.score_recipe(recipe, open_models(recipe), tasks[2:])
    assert harness.rebuilds == 1 and harness.model.config.num_hidden_layers == 6
    assert harness.model.generation_config.max_new_tokens == 3
    assert len(results["ppl"].scores) == len(PROMPTS)
    assert_scores_the_export(harness, recipe, tmp_path / "deep")
    if harness.model.config.tie_word_embeddings:
        assert harness.model.lm_head.weight.data_ptr() == harness.model.model.embed_tokens.weight.data_ptr()
    shallow = ties_recipe(family)
    harness.score_recipe(shallow, open_models(shallow), tasks[2:])
    assert harness.rebuilds == 2 and harness.model.config.num_hidden_layers == 4
    assert_scores_the_export(harness, shallow, tmp_path / "shallow")


def test_a_config_change_other_than_depth_rebuilds(llama_family, tasks, tmp_path):
    import shutil

    sources = {name: shutil.copytree(llama_family[name], tmp_path / name) for name in ("base", "variant_1", "variant_2")}
    config_file = sources["base"] / "config.json"
    config_file.write_text(config_file.read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 0.01'))
    harness = Harness(llama_family["base"], device="cpu")
    recipe = ties_recipe(sources)  # the output takes the base's config: same depth, another epsilon
    harness.score_recipe(recipe, open_models(recipe), tasks[2:])
    assert harness.rebuilds == 1 and harness.model.config.rms_norm_eps == 0.01
    assert_scores_the_export(harness, recipe, tmp_path / "out")


def add_tensor(folders: dict[str, Path], name: str, tensor: torch.Tensor) -> None:
    from safetensors.torch import load_file, save_file

    for folder in folders.values():
        weights = folder / "model.safetensors"
        save_file({**load_file(weights), name: tensor}, weights, metadata={"format": "pt"})


def test_old_rotary_buffers_are_ignored_and_unknown_tensors_named(llama_family, tasks, tmp_path):
    """Older Llama checkpoints carry rotary_emb.inv_freq per layer: ignored, as from_pretrained
    does; a tensor the model has no place for is an error naming model and tensor."""
    import shutil

    sources = {name: shutil.copytree(llama_family[name], tmp_path / name) for name in ("base", "variant_1", "variant_2")}
    add_tensor(sources, "model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(8))
    harness = Harness(llama_family["base"], device="cpu")
    recipe = ties_recipe(sources)
    assert len(harness.score_recipe(recipe, open_models(recipe), tasks[2:])["ppl"].scores) == len(PROMPTS)
    add_tensor(sources, "model.layers.0.mlp.gate_proj.extra", torch.ones(8))
    with pytest.raises(CheckpointError, match=f"tensor model.layers.0.mlp.gate_proj.extra of model "
                                              f"'{sources['variant_1']}' has no place"):
        harness.score_recipe(recipe, open_models(recipe), tasks[2:])


def test_a_truncated_checkpoint_is_a_clear_error(llama_family, tmp_path):
    import shutil
    import subprocess
    import sys

    folder = shutil.copytree(llama_family["base"], tmp_path / "truncated")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is not a valid safetensors file"):
        Harness(folder, device="cpu")
    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"prompt": "a", "answer": "1"}) + "\n")
    done = subprocess.run([sys.executable, "-m", "evomerge", "eval", str(folder), "--task", str(data),
                           "--device", "cpu"], capture_output=True, text=True)
    assert done.returncode == 2 and "model.safetensors" in done.stderr and "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def lm(llama_family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(llama_family["base"]).eval(),
            AutoTokenizer.from_pretrained(llama_family["base"]))


def test_batched_generation_equals_one_prompt_at_a_time(lm):
    """Left padding, and batching prompts by length, must not change what a prompt
    generates nor where its answer is returned."""
    from evaluation.scoring import generate

    model, tokenizer = lm
    lengths = [len(tokenizer(p)["input_ids"]) for p in PROMPTS]
    assert len(set(lengths)) > 1 and lengths != sorted(lengths)  # padded batches, reordered by length
    alone = [generate(model, tokenizer, [p], max_new_tokens=8)[0] for p in PROMPTS]
    for batch_size in (len(PROMPTS), 2):
        assert generate(model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=batch_size) == alone
    assert all(alone) and len(set(alone)) > 1


def test_batched_perplexity_equals_one_text_at_a_time(lm, tmp_path):
    from evaluation.scoring import evaluate

    model, tokenizer = lm
    data = tmp_path / "texts.jsonl"
    texts = [p * (len(PROMPTS) - i) for i, p in enumerate(PROMPTS)]  # longest first: batched by length, reordered
    data.write_text("\n".join(json.dumps({"prompt": text}) for text in texts))
    result = evaluate(model, tokenizer, Task("ppl", "perplexity", str(data)), batch_size=3)
    with torch.no_grad():
        alone = [-model(input_ids=ids, labels=ids).loss.item()
                 for ids in (tokenizer(text, return_tensors="pt")["input_ids"] for text in texts)]
    assert result.scores == pytest.approx(alone, abs=1e-5)


def test_perplexity_of_a_one_token_text_is_a_clear_error(lm, tmp_path):
    from evaluation.scoring import evaluate
    from merging.errors import EvomergeError

    model, tokenizer = lm
    data = tmp_path / "texts.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p}) for p in ["Evolution", "a"]))
    assert len(tokenizer("a")["input_ids"]) == 1
    with pytest.raises(EvomergeError, match="task 'ppl': example 1 has 1 token"):
        evaluate(model, tokenizer, Task("ppl", "perplexity", str(data)))


def test_evaluation_builds_no_autograd_graph(lm, tasks):
    from evaluation.scoring import evaluate

    model, tokenizer = lm
    grad_enabled = []
    hook = model.register_forward_pre_hook(lambda *_: grad_enabled.append(torch.is_grad_enabled()))
    try:
        for task in tasks:
            evaluate(model, tokenizer, task)
    finally:
        hook.remove()
    assert grad_enabled and not any(grad_enabled)


def test_a_choice_with_an_empty_context_is_conditioned_on_bos(lm, llama_family):
    from transformers import AutoTokenizer

    from evaluation.scoring import continuation_logprobs
    from merging.errors import EvomergeError

    model, tokenizer = lm
    got = continuation_logprobs(model, tokenizer, ["", "The"], [" quick", " quick"])
    for context, value in zip(["", "The"], got):
        context_ids = tokenizer(context)["input_ids"] or [tokenizer.bos_token_id]
        ids = torch.tensor([context_ids + tokenizer(" quick")["input_ids"]])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0], -1)
        expected = sum(logprobs[i - 1, ids[0, i]].item() for i in range(len(context_ids), ids.shape[1]))
        assert value == pytest.approx(expected, abs=1e-5)
    no_bos = AutoTokenizer.from_pretrained(llama_family["base"])
    no_bos.bos_token = None
    with pytest.raises(EvomergeError, match="task 'mc': the context of choice pair 1 is empty"):
        continuation_logprobs(model, no_bos, ["The", ""], [" quick", " quick"], task="mc")


def test_rebuilding_a_source_in_place_changes_the_candidate(llama_family, tasks, tmp_path):
    """Same recipe, same paths, new weights: a new candidate, scored afresh (not the stale cache)."""
    import shutil

    from safetensors.torch import load_file, save_file

    family = {name: shutil.copytree(llama_family[name], tmp_path / name) for name in ("base", "variant_1", "variant_2")}
    recipe = ties_recipe(family)
    before = plan_key(plan_merge(recipe, open_models(recipe)), 0)
    harness = Harness(family["base"], device="cpu", cache=tmp_path / "scores.jsonl")
    harness.score_recipe(recipe, open_models(recipe), tasks[2:])
    weights = family["variant_1"] / "model.safetensors"
    save_file({name: tensor * 2 for name, tensor in load_file(weights).items()}, weights, metadata={"format": "pt"})
    assert plan_key(plan_merge(recipe, open_models(recipe)), 0) != before
    passes = harness.forward_passes
    harness.score_recipe(recipe, open_models(recipe), tasks[2:])
    assert harness.forward_passes > passes


def test_the_same_models_rebuilt_elsewhere_keep_their_scores(llama_family, tasks, tmp_path):
    """A run carried to another machine that rebuilt its sources byte for byte (new folders,
    new files, new modification times): same candidate keys, its cached scores served with
    no forward pass. Constructed by copying the files' bytes only (no metadata)."""
    import shutil

    first = {name: shutil.copytree(llama_family[name], tmp_path / "a" / name) for name in ("base", "variant_1", "variant_2")}
    cache = tmp_path / "scores.jsonl"
    harness = Harness(first["base"], device="cpu", cache=cache)
    scored = harness.score_recipe(ties_recipe(first), open_models(ties_recipe(first)), tasks[2:])
    rebuilt = {name: shutil.copytree(folder, tmp_path / "b" / name, copy_function=shutil.copyfile)
               for name, folder in first.items()}
    weights = rebuilt["variant_1"] / "model.safetensors"
    assert weights.stat().st_mtime_ns != (first["variant_1"] / "model.safetensors").stat().st_mtime_ns
    recipe = ties_recipe(rebuilt)
    assert plan_key(plan_merge(recipe, open_models(recipe)), 0) == harness.last_candidate
    elsewhere = Harness(rebuilt["base"], device="cpu", cache=cache)
    again = elsewhere.score_recipe(recipe, open_models(recipe), tasks[2:])
    assert elsewhere.forward_passes == 0
    assert {k: v.scores for k, v in again.items()} == {k: v.scores for k, v in scored.items()}


def test_an_untied_head_the_merge_does_not_write_is_an_error(llama_family, tmp_path):
    from merging.errors import EvomergeError
    from merging.synthetic import build_family

    recipe = ties_recipe(llama_family)
    plan = plan_merge(recipe, open_models(recipe))
    plan.tasks = [t for t in plan.tasks if t.output.name != "lm_head.weight"]
    harness = Harness(llama_family["base"], device="cpu")
    assert not harness.model.config.tie_word_embeddings
    with pytest.raises(EvomergeError, match="does not produce \\['lm_head.weight'\\]"):
        harness.load_candidate(plan)
    # a tied head is the embedding matrix: a checkpoint has no lm_head.weight to merge
    tied = build_family(tmp_path / "tied", variants=2, seed=3, tie_word_embeddings=True)
    recipe = ties_recipe(tied)
    plan = plan_merge(recipe, open_models(recipe))
    assert "lm_head.weight" not in {t.output.name for t in plan.tasks}
    harness = Harness(tied["base"], device="cpu")
    harness.load_candidate(plan)
    assert harness.model.lm_head.weight.data_ptr() == harness.model.model.embed_tokens.weight.data_ptr()


def arithmetic_recipe(sources, weight: float, other: float):
    """task_arithmetic over variant_1 and `twin_of_base`, a copy of the base: its task vector
    is zero, so its weight (`other`) cannot change a tensor."""
    return parse_recipe(f"""
merge_method: task_arithmetic
base_model: {sources['base']}
models:
  - {{model: {sources['variant_1']}, parameters: {{weight: {weight}}}}}
  - {{model: {sources['twin_of_base']}, parameters: {{weight: {other}}}}}
""")


@pytest.fixture
def twin_sources(family, tmp_path):
    import shutil

    return {**family, "twin_of_base": shutil.copytree(family["base"], tmp_path / "twin_of_base")}


def score(harness, recipe, tasks):
    return harness.score_recipe(recipe, open_models(recipe), tasks)


def test_a_functional_twin_reuses_the_scores(twin_sources, tasks, tmp_path):
    cache = tmp_path / "scores.jsonl"
    harness = Harness(twin_sources["base"], device="cpu", cache=cache)
    first = score(harness, arithmetic_recipe(twin_sources, 1.0, 0.3), tasks)
    original = harness.last_candidate
    assert harness.last_twin is None and set(harness.last_timings.evaluate) == {"gen", "mc", "ppl"}
    twin = score(harness, arithmetic_recipe(twin_sources, 1.0, 0.7), tasks)
    assert harness.last_candidate != original and harness.last_twin == original
    assert harness.last_timings.evaluate == {} and harness.last_timings.twin == ["gen", "mc", "ppl"]
    assert {k: r.scores for k, r in twin.items()} == {k: r.scores for k, r in first.items()}
    assert harness.rebuilds == 0  # generating leaves the resident config as the candidates' config
    # recorded as such: the cache line names the twin, and a resumed run finds twins too
    lines = [json.loads(line) for line in cache.read_text().splitlines()]
    assert [line.get("twin") for line in lines] == [None] * 3 + [original] * 3
    resumed = Harness(twin_sources["base"], device="cpu", cache=cache)
    score(resumed, arithmetic_recipe(twin_sources, 1.0, 0.9), tasks)
    assert resumed.last_twin == original and resumed.last_timings.evaluate == {}
    score(resumed, arithmetic_recipe(twin_sources, 1.0, 0.7), tasks)  # cached, still reported as a twin
    assert resumed.last_timings.cached == ["gen", "mc", "ppl"] and resumed.last_twin == original


def test_a_near_twin_is_scored(twin_sources, tasks):
    harness = Harness(twin_sources["base"], device="cpu")
    score(harness, arithmetic_recipe(twin_sources, 1.0, 0.3), tasks[2:])
    score(harness, arithmetic_recipe(twin_sources, 1.001, 0.3), tasks[2:])
    assert harness.last_twin is None and set(harness.last_timings.evaluate) == {"ppl"}


def test_a_hash_collision_never_reuses_scores(twin_sources, tasks, monkeypatch):
    """Every probe output hashes alike here: only the comparison of the outputs themselves
    tells the twin (reused) from the near-twin (scored)."""
    import evaluation.functional

    monkeypatch.setattr(evaluation.functional, "functional_hash", lambda output: "collision")
    harness = Harness(twin_sources["base"], device="cpu")
    score(harness, arithmetic_recipe(twin_sources, 1.0, 0.3), tasks[2:])
    original = harness.last_candidate
    score(harness, arithmetic_recipe(twin_sources, 1.001, 0.3), tasks[2:])
    assert harness.last_twin is None and set(harness.last_timings.evaluate) == {"ppl"}
    score(harness, arithmetic_recipe(twin_sources, 1.0, 0.5), tasks[2:])
    assert harness.last_twin == original and harness.last_timings.evaluate == {}


def test_functional_hashing_can_be_turned_off(twin_sources, tasks):
    harness = Harness(twin_sources["base"], device="cpu", functional=False)
    score(harness, arithmetic_recipe(twin_sources, 1.0, 0.3), tasks[2:])
    score(harness, arithmetic_recipe(twin_sources, 1.0, 0.7), tasks[2:])
    assert harness.last_twin is None and harness.last_timings.probe == 0 and "ppl" in harness.last_timings.evaluate


def test_rounding_keeps_the_significant_bits():
    from evaluation.functional import round_significant

    values = torch.tensor([1.0, -1.0, 1.0 + 2**-20, 1.0 + 2**-10, 3.0e-30, -7.25])
    rounded = round_significant(values)
    assert rounded.tolist() == [1.0, -1.0, 1.0, 1.0 + 2**-10, pytest.approx(3.0e-30, rel=2**-15), -7.25]


def test_the_probe_reads_every_embedding_row_of_a_small_vocabulary():
    from evaluation.functional import PROBE_LENGTH, PROBE_ROWS, probe_ids

    ids = probe_ids(75)
    assert ids.shape == (PROBE_ROWS, PROBE_LENGTH) and set(ids.flatten().tolist()) == set(range(75))
    assert torch.equal(ids, probe_ids(75))


def test_rewritten_task_data_is_scored_afresh(llama_family, tmp_path):
    data = tmp_path / "test.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS))
    task = Task("ppl", "perplexity", str(tmp_path / "{split}.jsonl"))
    harness = Harness(llama_family["base"], device="cpu", cache=tmp_path / "scores.jsonl")
    before = harness.score_resident([task])["ppl"].scores
    passes = harness.forward_passes
    assert harness.score_resident([task])["ppl"].scores == before and harness.forward_passes == passes
    data.write_text("\n".join(json.dumps({"prompt": p + " again"}) for p in PROMPTS))
    after = harness.score_resident([task])["ppl"].scores
    assert harness.forward_passes > passes and after != before


def test_the_task_key_holds_every_setting_that_changes_scores(llama_family, tasks):
    from dataclasses import replace

    harness = Harness(llama_family["base"], device="cpu")
    gen = tasks[0]
    key = harness.task_key(gen, None)
    assert key == harness.task_key(replace(gen), None)
    changed = [harness.task_key(gen, 3), harness.task_key(replace(gen, max_new_tokens=7), None),
               harness.task_key(replace(gen, bos=True), None), harness.task_key(replace(gen, template="Q: {prompt}"), None)]
    assert key not in changed
    assert harness.task_key(replace(gen, bos=False), None) == key  # this tokenizer adds no BOS by default
    for other in (Harness(llama_family["base"], device="cpu", batch_size=4),
                  Harness(llama_family["base"], device="cpu", dtype=torch.bfloat16)):
        assert other.task_key(gen, None) != key


@pytest.fixture(scope="module")
def bos_tokenizer(llama_family, tmp_path_factory):
    """The synthetic tokenizer made to start every text with BOS by default, as Llama's does."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_family["base"])
    bos = tokenizer.bos_token
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.bos_token_id)])
    folder = tmp_path_factory.mktemp("bos")
    tokenizer.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def first_inputs(model, run) -> torch.Tensor:
    seen = []
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs["input_ids"]), with_kwargs=True)
    try:
        run()
    finally:
        hook.remove()
    return seen[0]


def test_generation_prompts_start_with_bos_where_the_tokenizer_adds_it(lm, bos_tokenizer, tmp_path):
    from dataclasses import replace

    from evaluation.scoring import adds_bos, evaluate, wants_bos
    from merging.errors import EvomergeError

    model, plain = lm
    assert adds_bos(bos_tokenizer) and not adds_bos(plain)
    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps({"prompt": "The quick brown", "answer": "1"}) + "\n")
    task = Task("gen", "generate", str(tmp_path / "{split}.jsonl"), max_new_tokens=2)
    ids = plain("The quick brown", add_special_tokens=False)["input_ids"]
    bos = bos_tokenizer.bos_token_id
    assert first_inputs(model, lambda: evaluate(model, bos_tokenizer, task))[0].tolist() == [bos] + ids
    assert first_inputs(model, lambda: evaluate(model, plain, task))[0].tolist() == ids
    assert first_inputs(model, lambda: evaluate(model, bos_tokenizer, replace(task, bos=False)))[0].tolist() == ids
    assert first_inputs(model, lambda: evaluate(model, plain, replace(task, bos=True)))[0].tolist() == [bos] + ids
    plain_no_bos = type(plain).from_pretrained(plain.name_or_path)
    plain_no_bos.bos_token = None
    with pytest.raises(EvomergeError, match="task 'gen' asks for a BOS token"):
        wants_bos(replace(task, bos=True), plain_no_bos)


def test_the_harness_shows_no_progress_bars_of_transformers(llama_family, tasks, capfd):
    from transformers.utils import logging

    harness = Harness(llama_family["base"], device="cpu")
    recipe = passthrough_recipe(llama_family)
    harness.score_recipe(recipe, open_models(recipe), tasks[2:])
    assert harness.rebuilds == 1
    captured = capfd.readouterr()
    assert "Loading weights" not in captured.err + captured.out and logging.is_progress_bar_enabled()


def test_a_rebuild_frees_the_old_model_before_building_the_new(llama_family, tasks, monkeypatch):
    """Two models of a large merge need not fit on the device at once."""
    import weakref

    from transformers import AutoModelForCausalLM

    harness = Harness(llama_family["base"], device="cpu")
    old = weakref.ref(harness.model)
    freed = []
    build = AutoModelForCausalLM.from_config

    def spy(*args, **kwargs):
        import sys

        if sys._getframe(1).f_globals["__name__"] == "evaluation.harness":  # not the engine's meta models
            freed.append(old() is None)
        return build(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_config", spy)
    recipe = passthrough_recipe(llama_family)
    harness.score_recipe(recipe, open_models(recipe), tasks[2:])
    assert freed == [True]
