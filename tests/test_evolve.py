"""`evomerge evolve` end to end on the micro zoo: PS, PS+DFS, resume after a kill, bad configs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from merging.cli import main
from merging.errors import EvomergeError, RecipeError
from niches.run import evolve, load_config

TEMPLATE = """\
merge_method: dare_ties
base_model: zoo:base
models:
  - model: zoo:lang
    parameters:
      density: {free: [0.1, 1.0], init: 0.6, granularity: layer}
      weight: {free: [0.0, 1.2], init: 0.6, granularity: layer}
  - model: zoo:math
    parameters:
      density: {free: [0.1, 1.0], init: 0.6, granularity: layer}
      weight: {free: [0.0, 1.2], init: 0.6, granularity: layer}
"""


def write_config(folder: Path, zoo: Path, method: str = "ps", evals: int = 12, extra: str = "") -> Path:
    (folder / "template.yaml").write_text(TEMPLATE)
    dfs = f"dfs:\n  sources: [ps, zoo:lang]\n  optimizer: {{max_evals: {evals}, popsize: 6}}\n" if "dfs" in method else ""
    ps = f"ps:\n  template: template.yaml\n  optimizer: {{max_evals: {evals}, popsize: 6}}\n" if "ps" in method else ""
    if method == "m2n2":
        ps = f"m2n2: {{max_evals: {evals}, population_size: 5}}\n"
    path = folder / "config.yaml"
    path.write_text(f"""\
method: {method}
zoo: {zoo}
models: [zoo:lang, zoo:math]
baselines: [zoo:base]
fitness: {{tasks: [math_lang], split: train, limit: 24}}
report: {{tasks: [math_lang, math], split: test, limit: 30}}
{ps}{dfs}device: cpu
threads: 1
{extra}""")
    return path


def read_candidates(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "candidates.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ps_run(micro_zoo, tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("ps")
    config = write_config(folder, micro_zoo[0])
    return folder / "run", evolve(config, folder / "run", progress=False)


def test_ps_run_folder(ps_run):
    run_dir, results = ps_run
    rows = read_candidates(run_dir)
    assert [r["kind"] for r in rows] == ["sample"] * 12 + ["mean"]
    assert [r["index"] for r in rows[:12]] == list(range(12))
    assert all(len(r["genome"]) == 16 and set(r["scores"]) == {"math_lang"} for r in rows)
    assert len((run_dir / "optimizer.jsonl").read_text().splitlines()) == 2
    best = max(rows, key=lambda r: r["fitness"])
    assert results["stages"]["ps"]["best_fitness"] == best["fitness"]
    assert set(results["report"]["scores"]) == {"evolved"} | {str(Path(p)) for p in results["report"]["scores"]
                                                             if p != "evolved"}
    assert len(results["report"]["scores"]) == 4  # evolved, lang, math, base
    for name in ("fitness.png", "ps_parameters.png"):
        assert (run_dir / "plots" / name).stat().st_size > 1000


def test_best_checkpoint_loads_and_its_card_has_lineage_and_scores(ps_run):
    from transformers import AutoModelForCausalLM

    run_dir, results = ps_run
    model = AutoModelForCausalLM.from_pretrained(run_dir / "best")
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[3, 4, 5]])).logits).all()
    card = (run_dir / "best" / "README.md").read_text()
    assert "merge_method: dare_ties" in card and "## Evolution" in card and "16 genes evolved by CMA-ES" in card
    evolved = results["report"]["scores"]["evolved"]
    cells = " | ".join(f"{evolved[t]['mean']:.3f} ± {evolved[t]['stderr']:.3f}" for t in ("math_lang", "math"))
    assert f"| **this merge** | {cells} |" in card


def test_the_same_seed_replays_the_same_candidates(ps_run, micro_zoo, tmp_path):
    """Determinism is what resume rests on: a fresh folder gets the same genomes and fitness."""
    run_dir, _ = ps_run
    evolve(write_config(tmp_path, micro_zoo[0], evals=6), tmp_path / "run", progress=False)
    fresh = [(r["genome"], r["fitness"]) for r in read_candidates(tmp_path / "run") if r["kind"] == "sample"]
    assert fresh == [(r["genome"], r["fitness"]) for r in read_candidates(run_dir)[:6]]


@pytest.fixture(scope="module")
def m2n2_run(micro_zoo, tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("m2n2")
    config = write_config(folder, micro_zoo[0], method="m2n2")
    return folder / "run", evolve(config, folder / "run", progress=False)


def test_m2n2_run(m2n2_run):
    from transformers import AutoModelForCausalLM

    run_dir, results = m2n2_run
    rows = read_candidates(run_dir)
    assert [r["kind"] for r in rows] == ["seed"] * 2 + ["sample"] * 12
    assert all(len(r["genome"]) == len(rows[0]["genome"]) for r in rows)
    # the seeds are the sources themselves: one-hot coefficient members
    assert set(rows[0]["genome"]) == {0.0, 1.0}
    recipe = results["stages"]["m2n2"]["best_recipe"]
    assert recipe["merge_method"] == "linear" and len(recipe["models"]) == 2
    assert (run_dir / "m2n2_gram.safetensors").is_file() and (run_dir / "plots" / "m2n2_coefficients.png").is_file()
    archive = [json.loads(line) for line in (run_dir / "optimizer.jsonl").read_text().splitlines()]
    assert len(archive) == 12 and max(a["archive_size"] for a in archive) == 5
    AutoModelForCausalLM.from_pretrained(run_dir / "best")
    assert "M2N2: an archive of 5 members" in (run_dir / "best" / "README.md").read_text()


def kill_midway(config: Path, run_dir: Path, lines: int) -> list[str]:
    """Start `evomerge evolve` in a subprocess, SIGKILL it once the candidate log has
    `lines` lines, and return the log as the kill left it."""
    command = [sys.executable, "-m", "merging.cli", "evolve", str(config), "--run-dir", str(run_dir), "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    log = run_dir / "candidates.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and len(log.read_text().splitlines() if log.exists() else []) < lines:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return log.read_text().splitlines()


def test_m2n2_resumes_after_a_kill(m2n2_run, micro_zoo, tmp_path):
    config = write_config(tmp_path, micro_zoo[0], method="m2n2")
    before = kill_midway(config, tmp_path / "run", 6)
    assert 6 <= len(before) < 14 and not (tmp_path / "run" / "best").exists()
    evolve(config, tmp_path / "run", progress=False)
    after = read_candidates(tmp_path / "run")
    assert [(r["genome"], r["fitness"]) for r in after] == [(r["genome"], r["fitness"])
                                                            for r in read_candidates(m2n2_run[0])]


def test_resume_after_a_kill_loses_no_scored_candidate(ps_run, micro_zoo, tmp_path):
    config = write_config(tmp_path, micro_zoo[0])
    run_dir = tmp_path / "run"
    before = kill_midway(config, run_dir, 5)
    scored_before = len((run_dir / "scores.jsonl").read_text().splitlines())
    assert 5 <= len(before) < 13 and not (run_dir / "best").exists()

    assert main(["evolve", str(config), "--run-dir", str(run_dir), "--no-progress"]) == 0
    after = read_candidates(run_dir)
    complete = [line for line in before if line.endswith("}")]
    assert [json.dumps(r) for r in after[:len(complete)]] == complete  # kept, not redone
    uninterrupted = read_candidates(ps_run[0])
    assert [(r["genome"], r["fitness"]) for r in after] == [(r["genome"], r["fitness"]) for r in uninterrupted]
    # nothing scored before the kill was scored again: one cache line per (candidate, task)
    cache = [json.loads(line) for line in (run_dir / "scores.jsonl").read_text().splitlines()]
    keys = [(c["candidate"], c["task_key"]) for c in cache]
    assert len(keys) == len(set(keys)) and len(keys) >= scored_before
    assert (run_dir / "best" / "model.safetensors").is_file()


def test_a_rerun_with_another_config_is_refused(ps_run, micro_zoo, tmp_path):
    run_dir, _ = ps_run
    config = write_config(tmp_path, micro_zoo[0], extra="seed: 1\n")
    with pytest.raises(EvomergeError, match="different config.yaml"):
        evolve(config, run_dir, progress=False)


def test_a_bigger_budget_extends_a_finished_run(micro_zoo, tmp_path):
    config = write_config(tmp_path, micro_zoo[0], evals=6)
    evolve(config, tmp_path / "run", progress=False)
    first = read_candidates(tmp_path / "run")
    evolve(config, tmp_path / "run", max_evals=12, progress=False)
    rows = read_candidates(tmp_path / "run")
    samples = [r for r in rows if r["kind"] == "sample"]
    assert rows[:7] == first and len(samples) == 12 and [r["index"] for r in samples] == list(range(12))


def test_ps_then_dfs(micro_zoo, tmp_path):
    from transformers import AutoConfig

    config = write_config(tmp_path, micro_zoo[0], method="ps+dfs", evals=6)
    results = evolve(config, tmp_path / "run", progress=False)
    run_dir = tmp_path / "run"
    assert (run_dir / "ps" / "best" / "model.safetensors").is_file()
    stages = [r["stage"] for r in read_candidates(run_dir)]
    assert stages == ["ps"] * 7 + ["dfs"] * 7
    recipe = results["stages"]["dfs"]["best_recipe"]
    assert recipe["merge_method"] == "passthrough"
    models = {s["sources"][0]["model"] for s in recipe["slices"]}
    assert models <= {str(run_dir / "ps" / "best"), str(micro_zoo[0].resolve() / "models" / "lang")}
    assert AutoConfig.from_pretrained(run_dir / "best").num_hidden_layers == len(recipe["slices"])
    assert (run_dir / "plots" / "dfs_path.png").is_file()
    assert "DFS: a path of" in (run_dir / "best" / "README.md").read_text()


@pytest.mark.parametrize("text, message", [
    ("method: pss\n", r"line 1: method: Input should be 'ps', 'dfs', 'ps\+dfs' or 'm2n2'"),
    ("method: ps\nmodels: [a]\nfitness: {tasks: [x], split: train}\nreport: {tasks: [x], split: test}\npopsize: 3\n",
     "line 5: popsize: unknown key 'popsize'"),
    ("method: dfs\nmodels: [a]\nfitness: {tasks: [x], split: train}\nreport: {tasks: [x], split: test}\n",
     "method dfs needs a `dfs:` section"),
])
def test_bad_configs_name_the_line(tmp_path, text, message):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=message):
        load_config(path)


def test_unknown_zoo_model_is_named(micro_zoo, tmp_path):
    config = write_config(tmp_path, micro_zoo[0])
    (tmp_path / "template.yaml").write_text(TEMPLATE.replace("zoo:math", "zoo:maths"))
    assert main(["evolve", str(config), "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 2
    with pytest.raises(EvomergeError, match="has no model 'maths'; it has base, lang, math, reverse"):
        evolve(config, tmp_path / "run2", progress=False)


@pytest.mark.parametrize("name", ["zoo-small-ps", "zoo-small-dfs", "zoo-small-ps-dfs",
                                  "evollm-jp-ps", "evollm-jp-dfs", "evollm-jp-ps-dfs"])
def test_shipped_run_configs_are_valid(name):
    from niches.genome import LayerLayout, RecipeGenome

    recipes = Path(__file__).parents[1] / "recipes"
    config = load_config(recipes / f"{name}.yaml")
    if config.ps:
        layout = LayerLayout(32, ("model.embed_tokens.weight",), ("model.norm.weight", "lm_head.weight"))
        genome = RecipeGenome.from_file(recipes / config.ps.template, layout)
        assert genome.decode(genome.x0).merge_method == "dare_ties"


def test_a_missing_template_is_named(micro_zoo, tmp_path):
    config = write_config(tmp_path, micro_zoo[0])
    (tmp_path / "template.yaml").unlink()
    with pytest.raises(EvomergeError, match=r"config.yaml: ps.template .*template.yaml: No such file"):
        evolve(config, tmp_path / "run", progress=False)
