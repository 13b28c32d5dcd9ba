"""The lm-eval backend on a local custom task, scoring the in-memory candidate."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from evaluation.harness import Harness  # noqa: E402
from evaluation.tasks import Task, resolve_task  # noqa: E402
from merging.engine import open_models  # noqa: E402
from merging.recipe import parse_recipe  # noqa: E402


def write_sums_task(folder: Path) -> Path:
    """The lm-eval task evomerge_sums (multiple choice over a local JSONL) in `folder`,
    which is then its include folder; returns the data file."""
    rows = [{"prompt": f"{i} plus one is", "choices": [f" {i + 1}", f" {i + 4}", f" {i}"], "label": 0}
            for i in range(6)]
    data = folder / "sums.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    (folder / "sums.yaml").write_text(f"""task: evomerge_sums
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
""")
    return data


@pytest.fixture
def custom_task(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return tmp_path, write_sums_task(tmp_path)


def test_lm_eval_scores_the_in_memory_candidate_per_example(llama_family, custom_task):
    include, data = custom_task
    lm_task = resolve_task("lm_eval:evomerge_sums", lm_eval_include=include)
    native = Task("native", "multiple_choice", str(data), answer_field="label")
    recipe = parse_recipe(f"""
merge_method: task_arithmetic
base_model: {llama_family['base']}
models:
  - {{model: {llama_family['variant_1']}, parameters: {{weight: 0.7}}}}
  - {{model: {llama_family['variant_3']}, parameters: {{weight: 0.7}}}}
""")
    harness = Harness(llama_family["base"], device="cpu")
    results = harness.score_recipe(recipe, open_models(recipe), [lm_task, native])
    assert len(results[lm_task.name].scores) == 6
    # lm-eval's log-likelihood choice on the resident candidate = ours on the same candidate
    assert results[lm_task.name].scores == results["native"].scores
    assert 0 < sum(results["native"].scores) < 6  # a mixed vector: the comparison can fail
    passes = harness.forward_passes
    harness.score_recipe(recipe, open_models(recipe), [lm_task])
    assert harness.forward_passes == passes  # cached like a native task


def test_a_split_other_than_the_tasks_own_is_refused(llama_family, custom_task):
    """lm-eval scores the split its YAML names; --split must not be silently ignored."""
    from merging.errors import EvomergeError

    include, _ = custom_task
    harness = Harness(llama_family["base"], device="cpu")
    wrong = resolve_task("lm_eval:evomerge_sums", lm_eval_include=include, split="validation")
    with pytest.raises(EvomergeError, match="scored on its 'test' split, not 'validation'"):
        harness.score_resident([wrong])
    assert harness.forward_passes == 0
    same = resolve_task("lm_eval:evomerge_sums", lm_eval_include=include, split="test")
    assert len(harness.score_resident([same], limit=2)[same.name].scores) == 2
