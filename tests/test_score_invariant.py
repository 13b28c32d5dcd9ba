"""The score a run logs is the score of the model it exports (issue 12, section 1).

For every search (PS, DFS, PS then DFS, M2N2) on float32 and bfloat16 sources, the
fitness logged for the best candidate must equal, exactly, what scoring the exported
`RUN/best` checkpoint measures on the same task, split and limit (what `evomerge eval
RUN/best --task T --split S --limit N` prints). Budgets are a few evaluations: the
invariant holds for any candidate, so finding a good one is not the point.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evaluation.harness import Harness
from evaluation.tasks import resolve_task
from niches.run import evolve
from tests.test_evolve import TEMPLATE

SPLIT, LIMIT = "train", 8
PPL = "math_lang_ppl"
"""A perplexity task over math_lang's texts: a continuous score, so that any difference in
the logits shows (exact-match scores of a few examples would hide a small one)."""
TASKS = {"ps": PPL, "dfs": PPL, "ps+dfs": PPL, "m2n2": "math"}
"""M2N2 shares per-example scores as resources, which must be >= 0: an accuracy task."""

SEARCHES = {
    "ps": "ps: {template: template.yaml, optimizer: {max_evals: 4, popsize: 4}}\n",
    "dfs": "dfs: {optimizer: {max_evals: 4, popsize: 4}}\n",
    "ps+dfs": ("ps: {template: template.yaml, optimizer: {max_evals: 3, popsize: 3}}\n"
               "dfs: {sources: [ps, zoo:lang], optimizer: {max_evals: 3, popsize: 3}}\n"),
    "m2n2": "m2n2: {max_evals: 3, population_size: 3}\n",
}


def with_perplexity_task(zoo: Path, copy: Path) -> Path:
    shutil.copytree(zoo, copy)
    shutil.copytree(copy / "data" / "math_lang", copy / "data" / PPL)
    manifest = json.loads((copy / "zoo.json").read_text())
    manifest["tasks"][PPL] = {"kind": "perplexity", "template": "{prompt} {answer}"}
    (copy / "zoo.json").write_text(json.dumps(manifest))
    return copy


@pytest.fixture(scope="module")
def zoos(micro_zoo, tmp_path_factory) -> dict[str, Path]:
    """The micro zoo (float32) and a copy converted to bfloat16, both with the perplexity task."""
    from safetensors.torch import load_file, save_file

    fp32 = with_perplexity_task(micro_zoo[0], tmp_path_factory.mktemp("fp32") / "micro")
    bf16 = with_perplexity_task(micro_zoo[0], tmp_path_factory.mktemp("bf16") / "micro")
    for weights in bf16.glob("models/*/model.safetensors"):
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
        config_file = weights.parent / "config.json"
        config = json.loads(config_file.read_text())
        config["dtype"] = "bfloat16"
        config_file.write_text(json.dumps(config, indent=2))
    return {"float32": fp32, "bfloat16": bf16}


def run(method: str, zoo: Path, folder: Path, extra: str = "") -> tuple[Path, float]:
    """Evolve with a tiny budget; the run folder and the fitness it logged for its best."""
    (folder / "template.yaml").write_text(TEMPLATE)
    config = folder / "config.yaml"
    config.write_text(f"""\
method: {method}
zoo: {zoo}
models: [zoo:lang, zoo:math]
fitness: {{tasks: [{TASKS[method]}], split: {SPLIT}, limit: {LIMIT}}}
report: {{tasks: [math_lang], split: test, limit: 4}}
{SEARCHES[method]}device: cpu
threads: 1
{extra}""")
    results = evolve(config, folder / "run", progress=False)
    final = list(results["stages"].values())[-1]
    return folder / "run", final["best_fitness"]


def measured(best: Path, zoo: Path, name: str) -> float:
    task = resolve_task(name, zoo_dir=zoo, split=SPLIT)
    return Harness(best, device="cpu").score_resident([task], limit=LIMIT)[name].mean


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("method", list(SEARCHES))
def test_the_logged_fitness_is_the_exported_models(method, dtype, zoos, tmp_path):
    """A few seconds each on the micro zoo: every case stays in the default suite."""
    run_dir, logged = run(method, zoos[dtype], tmp_path)
    exported = json.loads((run_dir / "best" / "config.json").read_text())
    assert exported.get("dtype", exported.get("torch_dtype")) == dtype
    assert measured(run_dir / "best", zoos[dtype], TASKS[method]) == logged


@pytest.mark.parametrize("method", ["ps", "m2n2"])
def test_a_run_dtype_other_than_the_sources_is_the_exported_dtype(method, zoos, tmp_path):
    """`dtype: bfloat16` over float32 sources scores candidates in bfloat16, so the export
    is written in bfloat16 and scores what was logged."""
    run_dir, logged = run(method, zoos["float32"], tmp_path, extra="dtype: bfloat16\n")
    exported = json.loads((run_dir / "best" / "config.json").read_text())
    assert exported.get("dtype", exported.get("torch_dtype")) == "bfloat16"
    assert "out_dtype: bfloat16" in (run_dir / "best" / "recipe.yaml").read_text()
    assert measured(run_dir / "best", zoos["float32"], TASKS[method]) == logged


def test_evomerge_eval_on_the_export_prints_the_logged_fitness(zoos, tmp_path):
    """The same through the command a user types."""
    run_dir, logged = run("dfs", zoos["bfloat16"], tmp_path)
    out = tmp_path / "eval.json"
    done = subprocess.run([sys.executable, "-m", "evomerge", "eval", str(run_dir / "best"), "--task", PPL,
                           "--split", SPLIT, "--limit", str(LIMIT), "--zoo", str(zoos["bfloat16"]), "--device", "cpu",
                           "--output", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["tasks"][PPL]["mean"] == logged
