"""`evomerge` as a user runs it: help texts, exit codes, dry runs, real merges."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from merging.cli import main
from tests.conftest import write_recipe

RECIPE = """\
merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters: {{density: 0.5, weight: 0.5}}
  - model: {b}
    parameters: {{density: 0.5, weight: 0.5}}
dtype: float32
"""


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "merging.cli", *args], capture_output=True, text=True)


def test_help_explains_the_commands():
    top = run_cli("--help")
    assert top.returncode == 0 and "merge" in top.stdout
    merge = run_cli("merge", "--help")
    assert merge.returncode == 0
    for flag in ("--dry-run", "--device", "--overwrite", "--allow-pickle", "--seed", "--out-shard-size"):
        assert flag in merge.stdout


def test_console_script_is_installed():
    assert shutil.which("evomerge"), "pip install -e . should install the evomerge command"


@pytest.fixture
def recipe(llama_family, tmp_path):
    return write_recipe(tmp_path, RECIPE.format(base=llama_family["base"], a=llama_family["variant_1"],
                                                b=llama_family["variant_2"]))


def test_dry_run_prints_the_plan_and_writes_nothing(recipe, tmp_path, capsys):
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "method: ties" in printed
    assert "model.layers.0.mlp.up_proj.weight [128, 64] float32" in printed
    assert "density=[0.5,0.5]" in printed
    assert not (tmp_path / "out").exists()


def test_merge_writes_and_refuses_to_overwrite(recipe, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["merge", str(recipe), str(out), "--no-progress"]) == 0
    assert (out / "model.safetensors").is_file()
    assert main(["merge", str(recipe), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["merge", str(recipe), str(out), "--overwrite", "--no-progress"]) == 0


def test_bad_recipe_exits_non_zero_with_the_line(tmp_path):
    recipe = write_recipe(tmp_path, "merge_method: ties\nbase_model: a\nmodels:\n  - model: b\n    weight: 1\n")
    result = run_cli("merge", str(recipe), str(tmp_path / "out"))
    assert result.returncode == 2
    assert "line 5" in result.stderr and "unknown key 'weight'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_missing_recipe_file(tmp_path):
    result = run_cli("merge", str(tmp_path / "nope.yaml"), str(tmp_path / "out"))
    assert result.returncode == 2 and "cannot read recipe" in result.stderr


def test_cuda_without_a_gpu_is_a_clear_error(recipe, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = run_cli("merge", str(recipe), str(tmp_path / "out"), "--device", "cuda")
    assert result.returncode == 2 and "no CUDA device" in result.stderr


def test_every_shipped_demo_recipe_runs(tmp_path, monkeypatch):
    """recipes/demo-*.yaml as the README runs them: from the repository root, on demo models."""
    from pathlib import Path

    from merging.synthetic import build_family

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    build_family(tmp_path / "demo" / "models", family="llama", variants=2, seed=0)
    recipes = sorted((root / "recipes").glob("demo-*.yaml"))
    assert len(recipes) >= 4
    for recipe in recipes:
        out = tmp_path / "merged" / recipe.stem
        assert main(["merge", str(recipe), str(out), "--no-progress"]) == 0, recipe.name
        assert (out / "model.safetensors").is_file()


def _jsonl_task(tmp_path):
    import json

    path = tmp_path / "sums.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"{i} plus 1 is", "answer": i + 1}) for i in range(4)))
    return path


def test_eval_scores_a_checkpoint_and_writes_per_example_results(llama_family, tmp_path, capsys):
    import json

    task = _jsonl_task(tmp_path)
    out = tmp_path / "results.json"
    assert main(["eval", str(llama_family["base"]), "--task", str(task), "--device", "cpu",
                 "--output", str(out), "--limit", "3"]) == 0
    printed = capsys.readouterr().out
    assert "sums" in printed and "mean" in printed
    results = json.loads(out.read_text())
    assert len(results["tasks"]["sums"]["scores"]) == 3


def test_eval_scores_a_recipe_without_writing_a_checkpoint(recipe, tmp_path, capsys):
    task = _jsonl_task(tmp_path)
    cache = tmp_path / "cache.jsonl"
    assert main(["eval", str(recipe), "--task", str(task), "--device", "cpu", "--cache", str(cache)]) == 0
    assert cache.is_file() and len(cache.read_text().splitlines()) == 1
    assert not [p for p in tmp_path.iterdir() if (p / "model.safetensors").exists()]


def test_eval_unknown_task_is_a_clear_error(llama_family, capsys):
    assert main(["eval", str(llama_family["base"]), "--task", "nonesuch", "--device", "cpu"]) == 2
    assert "unknown task 'nonesuch'" in capsys.readouterr().err


def test_eval_help_explains_tasks_and_flags():
    result = run_cli("eval", "--help")
    assert result.returncode == 0, result.stderr
    for flag in ("--task", "--split", "--limit", "--zoo", "--device", "--batch-size", "--cache", "--output",
                 "--lm-eval-include"):
        assert flag in result.stdout
    for task in ("mgsm_ja", "gsm8k", ".jsonl", "lm_eval:TASK"):
        assert task in result.stdout


def test_zoo_build_help_explains_sizes_and_flags():
    result = run_cli("zoo", "build", "--help")
    assert result.returncode == 0, result.stderr
    for text in ("--size", "micro", "small", "real", "--out", "--seed", "--overwrite", "zoo.json"):
        assert text in result.stdout
