"""`evomerge eval` on several candidates (evaluation/candidates.py): checkpoints and
recipes built in one resident model by the executors, scored as each scores alone, in the
order given whatever the executor; other architectures refused before anything is scored."""
from __future__ import annotations

import json
import multiprocessing
import shutil
from pathlib import Path

import pytest
import torch

from evaluation.candidates import open_candidate, score_candidates
from evaluation.executors import HarnessSpec
from evaluation.harness import Harness
from evaluation.tasks import Task
from evomerge.cli import main
from tests.conftest import write_recipe

STACK = """\
merge_method: passthrough
slices:
  - sources: [{model: zoo:math, layer_range: [0, 2]}]
  - sources: [{model: zoo:lang, layer_range: [1, 2]}]
"""
"""A layer stack three layers deep (the zoo's models have two): another depth, same architecture."""

TEXTS = ["one plus one is two", "the cat sat on the mat", "two and two make four", "a merge of models",
         "numbers and words", "seven is more than three"]


def scores_by_candidate(output: Path) -> list[tuple[str, dict]]:
    return [(c["model"], {name: task["scores"] for name, task in c["tasks"].items()})
            for c in json.loads(output.read_text())["candidates"]]


def scores_alone(model: str, zoo: Path, tmp_path: Path) -> dict:
    output = tmp_path / "alone.json"
    assert main(["eval", model, "--zoo", str(zoo), "--task", "math", "--task", "lang", "--limit", "12",
                 "--device", "cpu", "--output", str(output)]) == 0
    return {name: task["scores"] for name, task in json.loads(output.read_text())["tasks"].items()}


def test_serial_and_a_pool_of_two_score_every_candidate_as_it_scores_alone(micro_zoo, tmp_path, capsys):
    """Checkpoints and a deeper layer stack, scored by serial and by 2 pool workers: the same
    per-example scores, listed in the order given, each equal to the candidate's own
    `evomerge eval`; the table has a row per candidate in that order."""
    zoo = micro_zoo[0]
    stack = write_recipe(tmp_path, STACK, "stack.yaml")
    models = ["zoo:lang", str(stack), "zoo:math", "zoo:base"]
    runs = {}
    for executor in ("serial", "pool"):
        output = tmp_path / f"{executor}.json"
        assert main(["eval", *models, "--zoo", str(zoo), "--task", "math", "--task", "lang", "--limit", "12",
                     "--device", "cpu", "--executor", executor, "--output", str(output)]
                    + (["--workers", "2"] if executor == "pool" else [])) == 0
        runs[executor] = scores_by_candidate(output)
        table = capsys.readouterr().out.splitlines()
        assert table[0].split()[:5] == ["candidate", "math", "(test,", "n=12)", "lang"]
        assert [line.split()[0] for line in table[1:]] == models
    assert runs["pool"] == runs["serial"]
    assert [model for model, _ in runs["serial"]] == models
    for model, scores in runs["serial"]:
        assert scores == scores_alone(model, zoo, tmp_path), model
    by_model = dict(runs["serial"])
    assert by_model["zoo:math"] != by_model["zoo:lang"]  # candidates a mix-up would tell apart
    assert sum(by_model["zoo:math"]["math"]) > 0 and sum(by_model["zoo:lang"]["lang"]) > 0
    assert not multiprocessing.active_children()


@pytest.fixture(scope="module")
def tied_bfloat16_family(tmp_path_factory) -> dict[str, Path]:
    from merging.synthetic import build_family

    return build_family(tmp_path_factory.mktemp("tied"), family="llama", variants=1, seed=2,
                        dtype=torch.bfloat16, tie_word_embeddings=True)


@pytest.mark.parametrize("family", ["float32", "bfloat16_tied", "float32_then_bfloat16_sharded"])
def test_a_checkpoint_candidate_scores_exactly_what_it_scores_alone(
        family, llama_family, sharded_family, tied_bfloat16_family, tmp_path):
    """A checkpoint built in another's resident model (the one-model passthrough recipe)
    gives the per-token losses of the checkpoint loaded by itself, to the last bit: in
    float32, in bfloat16 with tied embeddings, and a bfloat16 sharded checkpoint after a
    float32 template (the resident model is rebuilt in bfloat16)."""
    template, candidate = {
        "float32": (llama_family["base"], llama_family["variant_1"]),
        "bfloat16_tied": (tied_bfloat16_family["base"], tied_bfloat16_family["variant_1"]),
        "float32_then_bfloat16_sharded": (llama_family["base"], sharded_family["variant_1"]),
    }[family]
    data = tmp_path / "texts.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": text}) for text in TEXTS))
    task = Task("texts", "perplexity", str(data))
    candidates = [open_candidate(str(template)), open_candidate(str(candidate))]
    try:
        results = score_candidates(candidates, [task], HarnessSpec(str(template), device="cpu"), executor="serial")
    finally:
        for opened in candidates:
            opened.close()
    for model, result in zip((template, candidate), results):
        alone = Harness(model, device="cpu").score_resident([task])["texts"].scores
        assert result.scores["texts"] == alone, model
    assert results[0].scores != results[1].scores  # the two models differ: a wrong copy would show


def test_a_candidate_of_another_architecture_is_refused_before_anything_is_scored(llama_family, tmp_path, capsys):
    from merging.synthetic import build_family

    wider = build_family(tmp_path / "wider", family="llama", variants=0, seed=3, intermediate_size=96)["base"]
    data = tmp_path / "sums.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"{i} plus 1 is", "answer": i + 1}) for i in range(3)))
    output, cache = tmp_path / "out.json", tmp_path / "cache.jsonl"
    assert main(["eval", str(llama_family["base"]), str(llama_family["variant_1"]), str(wider), "--task",
                 str(data), "--device", "cpu", "--cache", str(cache), "--output", str(output)]) == 2
    error = capsys.readouterr().err
    assert f"candidate {str(wider)!r} is not built like the first candidate" in error
    assert "intermediate_size 96 (not 128)" in error and "Traceback" not in error
    assert not output.exists() and not cache.exists()


def test_a_pickled_candidate_among_several_is_refused_naming_it(llama_family, tmp_path, capsys):
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(llama_family["variant_1"], pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    data = tmp_path / "sums.jsonl"
    data.write_text(json.dumps({"prompt": "1 plus 1 is", "answer": 2}))
    assert main(["eval", str(llama_family["base"]), str(pickled), "--task", str(data), "--device", "cpu",
                 "--allow-pickle"]) == 2
    assert f"candidate {str(pickled)!r}: model {str(pickled)!r} has pickled weights" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--workers", "2"], "executor serial runs one worker in this process"),
    (["--executor", "pool", "--ray-address", "auto"], "--ray-address names the cluster of --executor ray"),
])
def test_executor_flags_that_do_not_go_together_are_refused(argv, message, llama_family, capsys):
    assert main(["eval", str(llama_family["base"]), str(llama_family["variant_1"]), "--task", "math",
                 "--device", "cpu", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_lm_eval_tasks_travel_to_pool_workers(llama_family, tmp_path, monkeypatch):
    """An lm_eval:TASK is a name and a folder of YAMLs: the workers score it as serial does."""
    pytest.importorskip("lm_eval")
    from tests.test_lm_eval_backend import write_sums_task

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # the workers inherit it
    write_sums_task(tmp_path)
    models = [str(llama_family[name]) for name in ("base", "variant_1", "variant_3")]
    runs = {}
    for executor in ("serial", "pool"):
        output = tmp_path / f"{executor}.json"
        assert main(["eval", *models, "--task", "lm_eval:evomerge_sums", "--lm-eval-include", str(tmp_path),
                     "--device", "cpu", "--executor", executor, "--output", str(output)]
                    + (["--workers", "2"] if executor == "pool" else [])) == 0
        runs[executor] = scores_by_candidate(output)
    assert runs["pool"] == runs["serial"]
    assert len({tuple(scores["lm_eval:evomerge_sums"]) for _, scores in runs["serial"]}) > 1


def test_eval_help_explains_several_candidates_and_the_executor_flags(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in ("MODEL_OR_RECIPE [MODEL_OR_RECIPE ...]", "--executor {serial,pool,ray}", "--workers",
                  "--ray-address", "the first one's architecture", "in the order given", "status 2"):
        assert words in text, words


@pytest.mark.parametrize("executor", ["serial", "pool"])
def test_a_failing_candidate_is_reported_and_the_others_are_printed_and_written(
        executor, llama_family, tmp_path, capsys):
    """A checkpoint with a NaN tensor plans like any other (headers only) and fails when it
    is built: its row gives the error, the candidates around it are scored and written, and
    the command exits 2 naming it, without a traceback."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(llama_family["variant_1"], broken)
    state = load_file(broken / "model.safetensors")
    name = next(n for n in state if n.endswith("mlp.up_proj.weight"))
    state[name][0, 0] = float("nan")
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    data = tmp_path / "sums.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"{i} plus 1 is", "answer": i + 1}) for i in range(3)))
    models = [str(llama_family["base"]), str(broken), str(llama_family["variant_2"])]
    output = tmp_path / "out.json"
    assert main(["eval", *models, "--task", str(data), "--device", "cpu", "--executor", executor,
                 "--output", str(output)] + (["--workers", "2"] if executor == "pool" else [])) == 2
    captured = capsys.readouterr()
    rows = captured.out.splitlines()[1:]
    assert [row.split()[0] for row in rows] == models
    assert "failed:" in rows[1] and "contains NaN or Inf" in rows[1]
    assert "failed" not in rows[0] + rows[2]
    assert f"1 of 3 candidates failed: {broken}" in captured.err and "Traceback" not in captured.err
    written = json.loads(output.read_text())["candidates"]
    assert [c["model"] for c in written] == models
    assert "contains NaN or Inf" in written[1]["error"] and written[1]["tasks"] == {}
    assert written[0]["error"] is None and len(written[2]["tasks"]["sums"]["scores"]) == 3
