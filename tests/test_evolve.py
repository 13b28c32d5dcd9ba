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

from evomerge.cli import main
from merging.errors import EvomergeError, RecipeError
from niches.config import TaskSettings, load_config
from niches.report import report_table
from niches.run import evolve
from niches.runfolder import RunFolder

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
    dfs = f"dfs:\n  sources: [ps, zoo:lang]\n  optimizer: {{max_evals: {evals}, popsize: 3}}\n" if "dfs" in method else ""
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
    # the template's start with the first generation, 12 samples, the final mean
    assert [r["kind"] for r in rows] == ["start"] + ["sample"] * 12 + ["mean"]
    assert [r["index"] for r in rows[1:13]] == list(range(12))
    assert all(len(r["genome"]) == 16 and set(r["scores"]) == {"math_lang"} for r in rows)
    assert [r["round"] for r in rows] == [0] * 7 + [1] * 6 + [2]
    assert sorted(rows[0]["genome"]) == pytest.approx([0.5] * 8 + [5 / 9] * 8)  # inits: weight 0.6 in [0, 1.2], density 0.6 in [0.1, 1]
    summaries = [json.loads(line) for line in (run_dir / "optimizer.jsonl").read_text().splitlines()]
    assert [(s["round"], s["evaluations"]) for s in summaries] == [(0, 6), (1, 12), (2, 12)]  # after each round
    best = max(rows, key=lambda r: r["fitness"])
    assert results["stages"]["ps"]["best_fitness"] == best["fitness"]
    # the report's rows and the recipe name models as the config does, not by the zoo's cache path
    assert list(results["report"]["scores"]) == ["evolved", "zoo:lang", "zoo:math", "zoo:base"]
    assert {m["model"] for m in results["stages"]["ps"]["best_recipe"]["models"]} == {"zoo:lang", "zoo:math"}
    assert "/models/" not in (run_dir / "best" / "README.md").read_text()
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
    assert "base_model: zoo:base" in card and "`zoo:lang`, `zoo:math`" in card
    evolved = results["report"]["scores"]["evolved"]
    cells = " | ".join(f"{evolved[t]['mean']:.3f} ± {evolved[t]['stderr']:.3f}" for t in ("math_lang", "math"))
    assert f"| **this merge** | {cells} |" in card


def test_the_cards_rerun_command_remakes_the_best_checkpoint(ps_run, micro_zoo, tmp_path):
    """The card names `zoo:` models, so its command needs --zoo; given it, the recipe
    written beside the checkpoint remakes the same tensors."""
    from safetensors.torch import load_file

    run_dir, _ = ps_run
    card = (run_dir / "best" / "README.md").read_text()
    assert "evomerge merge recipe.yaml OUT_DIR --zoo ZOO --seed 0" in card
    assert main(["merge", str(run_dir / "best" / "recipe.yaml"), str(tmp_path / "again"), "--zoo", str(micro_zoo[0]),
                 "--seed", "0", "--no-progress"]) == 0
    best, again = load_file(run_dir / "best" / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert best.keys() == again.keys() and all(torch.equal(best[k], again[k]) for k in best)


def test_the_same_seed_replays_the_same_candidates(ps_run, micro_zoo, tmp_path):
    """Determinism is what resume rests on: a fresh folder gets the same genomes and fitness."""
    run_dir, _ = ps_run
    evolve(write_config(tmp_path, micro_zoo[0], evals=6), tmp_path / "run", progress=False)
    fresh = [(r["genome"], r["fitness"]) for r in read_candidates(tmp_path / "run") if r["kind"] != "mean"]
    assert fresh == [(r["genome"], r["fitness"]) for r in read_candidates(run_dir)[:7]]


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
    assert [r["round"] for r in rows] == [0, 0, *range(1, 13)]
    assert all(len(r["genome"]) == len(rows[0]["genome"]) for r in rows)
    # the seeds are the sources themselves: one-hot coefficient members
    assert set(rows[0]["genome"]) == {0.0, 1.0}
    recipe = results["stages"]["m2n2"]["best_recipe"]
    assert recipe["merge_method"] == "linear" and len(recipe["models"]) == 2
    assert (run_dir / "m2n2_gram.safetensors").is_file() and (run_dir / "plots" / "m2n2_coefficients.png").is_file()
    archive = [json.loads(line) for line in (run_dir / "optimizer.jsonl").read_text().splitlines()]
    assert len(archive) == 13 and archive[0]["kinds"] == ["seed", "seed"] and max(a["archive_size"] for a in archive) == 5
    AutoModelForCausalLM.from_pretrained(run_dir / "best")
    assert "M2N2: an archive of 5 members" in (run_dir / "best" / "README.md").read_text()


def kill_midway(config: Path, run_dir: Path, lines: int) -> list[str]:
    """Start `evomerge evolve` in a subprocess, SIGKILL it once the candidate log has
    `lines` lines, and return the log as the kill left it."""
    command = [sys.executable, "-m", "evomerge", "evolve", str(config), "--run-dir", str(run_dir), "--no-progress"]
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


def test_a_bigger_budget_extends_a_finished_run(micro_zoo, tmp_path, capsys):
    config = write_config(tmp_path, micro_zoo[0], evals=6)
    evolve(config, tmp_path / "run", progress=False)
    first = read_candidates(tmp_path / "run")
    capsys.readouterr()
    evolve(config, tmp_path / "run", max_evals=12, progress=True)
    rows = read_candidates(tmp_path / "run")
    samples = [r for r in rows if r["kind"] == "sample"]
    assert rows[:8] == first and len(samples) == 12 and [r["index"] for r in samples] == list(range(12))
    summaries = [json.loads(line) for line in (tmp_path / "run" / "optimizer.jsonl").read_text().splitlines()]
    # a summary per round that scored something new: the old end (the mean) stays, then the extension's rounds
    assert [(s["round"], s["evaluations"]) for s in summaries] == [(0, 6), (1, 6), (1, 12), (2, 12)]
    # the progress bar starts past the 6 replayed candidates (they take no time, so counting
    # them as evaluations would make the time left an underestimate)
    bar = capsys.readouterr().err
    assert "ps evaluations:  50%" in bar and "6/12" in bar and " 0/12" not in bar and "12/12" in bar


def test_a_replay_reports_the_load_and_memory_of_the_invocations_that_scored(micro_zoo, tmp_path):
    """results.json describes the machine while the run worked: rerunning a finished run
    (to rewrite its report, say) adds neither its wall time nor its load or memory."""
    config = write_config(tmp_path, micro_zoo[0], evals=6)
    evolve(config, tmp_path / "run", progress=False)
    sessions = tmp_path / "run" / "sessions.jsonl"
    (first,) = [json.loads(line) for line in sessions.read_text().splitlines()]
    assert first["scored"] == 8 and len(first["load_average"]) == 2 and first["peak_rss_gib"] > 0
    sessions.write_text(json.dumps({**first, "load_average": [42.0, 43.0], "peak_rss_gib": 99.0}) + "\n")
    results = evolve(config, tmp_path / "run", progress=False)
    replay = json.loads(sessions.read_text().splitlines()[-1])
    assert replay["scored"] == 0
    assert results["load_average"] == [42.0, 43.0] and results["peak_rss_gib"] == 99.0
    assert results["wall_seconds"] == first["seconds"] and results["untimed_candidates"] == 0
    assert first["started"] == read_candidates(tmp_path / "run")[0]["session"]


def test_the_wall_time_counts_killed_invocations():
    """A finished invocation by its own clock; one killed (no line in sessions.jsonl) from
    its start to its last logged candidate; lines logged before invocations kept a clock
    are counted, not guessed."""
    from niches.run import _wall_seconds

    finished = [{"started": 100.0, "seconds": 50.0}]
    rows = ([{"session": 100.0, "at": 140.0}] + [{"session": 200.0, "at": at} for at in (230.0, 260.0, 245.0)]
            + [{"seconds": 9.0}, {"session": None, "at": 300.0}])
    assert _wall_seconds(finished, rows) == (50.0 + 60.0, 2)
    older = [{"seconds": 30.0, "scored": 1}]  # an invocation that finished before sessions had a start
    assert _wall_seconds(finished + older, rows) == (50.0 + 60.0 + 30.0, 1)


PAPER = "paper_scores:\n  math: {evolved: 0.556, ps: 0.52, 'zoo:math': 0.184}\n"
"""Published scores to print beside the report's math column (made-up values)."""


@pytest.fixture(scope="module")
def ps_dfs_run(micro_zoo, tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("ps_dfs")
    config = write_config(folder, micro_zoo[0], method="ps+dfs", evals=6, extra=PAPER)
    return folder / "run", evolve(config, folder / "run", progress=False)


def test_ps_then_dfs(ps_dfs_run, micro_zoo):
    from transformers import AutoConfig

    run_dir, results = ps_dfs_run
    assert (run_dir / "ps" / "best" / "model.safetensors").is_file()
    stages = [r["stage"] for r in read_candidates(run_dir)]
    assert stages == ["ps"] * 8 + ["dfs"] * 8
    recipe = results["stages"]["dfs"]["best_recipe"]
    assert recipe["merge_method"] == "passthrough"
    models = {s["sources"][0]["model"] for s in recipe["slices"]}
    assert models <= {str(run_dir / "ps" / "best"), "zoo:lang"}
    assert AutoConfig.from_pretrained(run_dir / "best").num_hidden_layers == len(recipe["slices"])
    assert (run_dir / "plots" / "dfs_path.png").is_file()
    assert "DFS: a path of" in (run_dir / "best" / "README.md").read_text()


def test_the_dfs_stage_starts_from_the_ps_merge_itself(ps_dfs_run):
    """DFS's start (model A's layers in order, no scales in play) is the PS merge: scored
    with the first generation, it has the PS stage's best fitness, so PS+DFS's answer is
    never worse on the fitness than the PS merge it started from."""
    run_dir, results = ps_dfs_run
    rows = read_candidates(run_dir)
    ps_rows = [r for r in rows if r["stage"] == "ps"]
    start = next(r for r in rows if r["stage"] == "dfs" and r["kind"] == "start")
    assert start["round"] == 0 and start["fitness"] == results["stages"]["ps"]["best_fitness"]
    assert start["fitness"] == max(r["fitness"] for r in ps_rows)
    assert results["stages"]["dfs"]["best_fitness"] >= start["fitness"]


def test_a_log_from_before_starts_were_scored_replays_as_it_was(micro_zoo, tmp_path, capsys):
    """A run folder logged when searches did not score their start (its first generation
    told without one, as optimizer.jsonl's summary of round 0 shows): the rerun goes on
    without a start, so it replays every line and exports what it exported, and the dry
    run says so. A log cut inside its first generation may be a new run's whose start had
    not finished: that one scores its start."""
    config = write_config(tmp_path, micro_zoo[0], evals=6)
    run_dir = tmp_path / "run"
    first = evolve(config, run_dir, progress=False)
    rows = read_candidates(run_dir)
    older = [r for r in rows if r["kind"] != "start"]
    assert len(older) == len(rows) - 1 and {r["round"] for r in older} == {0, 1}  # six samples, then the mean
    (run_dir / "candidates.jsonl").write_text("".join(json.dumps(r) + "\n" for r in older))
    optimizer = (run_dir / "optimizer.jsonl").read_text()
    code, out = dry_run(config, run_dir, capsys)
    assert code == 0 and ("6 evaluations (+ its final mean, outside the budget); its log predates scored starts, so "
                          "it goes on without one") in out
    results = evolve(config, run_dir, progress=False)
    assert read_candidates(run_dir) == older and (run_dir / "optimizer.jsonl").read_text() == optimizer
    best = max(older, key=lambda r: r["fitness"])
    assert (results["stages"]["ps"]["best_genome"], results["stages"]["ps"]["best_fitness"]) == (best["genome"],
                                                                                               best["fitness"])
    assert results["stages"]["ps"]["evaluations"] == first["stages"]["ps"]["evaluations"] == 6

    cut = [r for r in older if r["round"] == 0][:3]  # killed before its first tell: nothing summarised
    (run_dir / "candidates.jsonl").write_text("".join(json.dumps(r) + "\n" for r in cut))
    (run_dir / "optimizer.jsonl").write_text("")
    evolve(config, run_dir, progress=False)
    again = read_candidates(run_dir)
    assert again[:3] == cut and [r["kind"] for r in again].count("start") == 1


def test_a_search_without_its_start(micro_zoo, tmp_path, capsys):
    """`optimizer: {evaluate_start: false}`: nothing outside the budget but CMA-ES's mean."""
    config = write_config(tmp_path, micro_zoo[0], evals=6)
    config.write_text(config.read_text().replace("popsize: 6}", "popsize: 6, evaluate_start: false}"))
    code, out = dry_run(config, tmp_path / "run", capsys)
    assert code == 0 and "6 evaluations (+ its final mean, outside the budget)\n" in out
    results = evolve(config, tmp_path / "run", progress=False)
    assert [r["kind"] for r in read_candidates(tmp_path / "run")] == ["sample"] * 6 + ["mean"]
    assert results["stages"]["ps"]["best_kind"] in ("sample", "mean")


def test_the_ps_then_dfs_report_has_the_ps_merge_as_a_row(ps_dfs_run):
    """The intermediate PS merge is scored on the test split too, so the report shows
    what the DFS stage added to it."""
    run_dir, results = ps_dfs_run
    scores = results["report"]["scores"]
    assert list(scores)[:2] == ["evolved", "ps"] and len(scores) == 5  # evolved, ps, lang, math, base
    assert scores["ps"]["math"]["n"] == 30
    card = (run_dir / "best" / "README.md").read_text()
    cells = " | ".join(f"{scores['ps'][t]['mean']:.3f} ± {scores['ps'][t]['stderr']:.3f}" for t in ("math_lang", "math"))
    assert f"| PS merge (`ps/best`) | {cells} | 0.520 |" in card


def test_the_papers_scores_are_printed_beside_ours(ps_dfs_run, micro_zoo):
    run_dir, results = ps_dfs_run
    assert results["report"]["paper"] == {"evolved": {"math": 0.556}, "ps": {"math": 0.52}, "zoo:math": {"math": 0.184}}
    assert json.loads((run_dir / "results.json").read_text())["report"]["paper"] == results["report"]["paper"]
    card = (run_dir / "best" / "README.md").read_text()
    assert "| model | math_lang | math | math (paper) |" in card
    evolved = results["report"]["scores"]["evolved"]
    cells = " | ".join(f"{evolved[t]['mean']:.3f} ± {evolved[t]['stderr']:.3f}" for t in ("math_lang", "math"))
    assert f"| **this merge** | {cells} | 0.556 |" in card
    assert "| `zoo:lang` |" in card and card.count(" |  |") == 2  # lang, base
    table = report_table(results).splitlines()  # the same table as plain text
    assert table[0].split() == ["model", "math_lang", "math", "math", "(paper)"]
    assert table[1].startswith("evolved merge") and table[1].endswith("0.556")
    assert table[3].startswith("zoo:lang ") and table[4].startswith("zoo:math ") and table[4].endswith("0.184")


def test_evolve_prints_the_report_beside_the_papers_scores(ps_dfs_run, capsys):
    """Rerunning a finished run replays it (no candidate is scored again) and prints its report."""
    run_dir, results = ps_dfs_run
    assert main(["evolve", str(run_dir.parent / "config.yaml"), "--run-dir", str(run_dir), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert report_table(results) in printed and "math (paper)" in printed


def test_resume_after_a_kill_during_the_dfs_stage(ps_dfs_run, micro_zoo, tmp_path):
    config = write_config(tmp_path, micro_zoo[0], method="ps+dfs", evals=6)
    run_dir = tmp_path / "run"
    before = kill_midway(config, run_dir, 11)  # PS logs 8 lines, DFS 4 then 3 per round: killed while DFS runs
    assert [json.loads(line)["stage"] for line in before if line.endswith("}")][8:11] == ["dfs"] * 3
    assert len(before) < 16 and not (run_dir / "best").exists()

    results = evolve(config, run_dir, progress=False)
    after = read_candidates(run_dir)
    uninterrupted = read_candidates(ps_dfs_run[0])
    assert [(r["stage"], r["genome"], r["fitness"]) for r in after] == \
        [(r["stage"], r["genome"], r["fitness"]) for r in uninterrupted]
    for stage in ("ps", "dfs"):  # (the recipes differ: each names its own run folder's ps/best)
        for key in ("best_genome", "best_fitness", "evaluations"):
            assert results["stages"][stage][key] == ps_dfs_run[1]["stages"][stage][key]
    # the killed invocation's time counts: from its start to its last logged candidate
    (session,) = [json.loads(line) for line in (run_dir / "sessions.jsonl").read_text().splitlines()]
    assert len({row["session"] for row in after} - {session["started"]}) == 1  # the killed one
    assert results["wall_seconds"] > session["seconds"] and results["untimed_candidates"] == 0


NO_NUMBER_TASK = '{"prompt": "1+1=", "answer": "no number"}\n'
"""A fitness task no candidate can score on: the answer is read as the last number generated,
and this reference has none. Every candidate's fitness is 0, so no candidate ever beats the
first one: a search's best cannot change, whatever its seed or budget."""


def test_extending_ps_then_dfs_keeps_an_unchanged_ps_merge(micro_zoo, tmp_path):
    """A bigger budget whose PS stage finds nothing better leaves ps/best's weights as
    they are (only its card follows), so the DFS stage goes on from its log. Constructed:
    with a fitness nobody scores on, the extended PS stage cannot find a better merge."""
    config = write_config(tmp_path, micro_zoo[0], method="ps+dfs", evals=6)
    (tmp_path / "no_number.jsonl").write_text(NO_NUMBER_TASK)
    config.write_text(config.read_text().replace("tasks: [math_lang], split: train", "tasks: [no_number.jsonl], split: train"))
    run_dir = tmp_path / "run"
    evolve(config, run_dir, progress=False)
    weights = (run_dir / "ps" / "best" / "model.safetensors").stat().st_mtime_ns
    first = read_candidates(run_dir)
    assert {r["fitness"] for r in first} == {0.0}
    evolve(config, run_dir, max_evals=12, progress=False)
    assert (run_dir / "ps" / "best" / "model.safetensors").stat().st_mtime_ns == weights
    # all fitness 0: no sample beats the start, which was told first, so the start is the answer
    assert "(12 evaluations; the best is the starting point, which no sample beat)" in \
        (run_dir / "ps" / "best" / "README.md").read_text()
    rows = read_candidates(run_dir)
    assert [r for r in rows if r["stage"] == "dfs"][:6] == [r for r in first if r["stage"] == "dfs"][:6]
    assert sum(r["stage"] == "dfs" and r["kind"] == "sample" for r in rows) == 12


def test_sources_are_checked_by_content_not_by_folder(llama_family, tmp_path):
    """A run folder's logged fitness stays valid for the same models in other folders (a run
    carried to a machine that rebuilt them elsewhere); other bytes in any folder are refused."""
    import shutil

    def stage_sources(root: Path) -> dict[str, Path]:
        return {str(root / name): root / name for name in ("base", "variant_1")}

    here = {name: shutil.copytree(llama_family[name], tmp_path / "here" / name) for name in ("base", "variant_1")}
    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    folder.check_sources("ps", stage_sources(tmp_path / "here"), logged=0)
    for name, path in here.items():
        shutil.copytree(path, tmp_path / "there" / name, copy_function=shutil.copyfile)
    folder.check_sources("ps", stage_sources(tmp_path / "there"), logged=5)  # same bytes: no error
    config = tmp_path / "there" / "variant_1" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "note": 1}))
    with pytest.raises(EvomergeError, match=r"the ps stage's 5 logged candidates were scored with .*there/variant_1 "
                                            r"as it was then, and it has been rewritten since"):
        folder.check_sources("ps", stage_sources(tmp_path / "there"), logged=5)


def test_dfs_logged_on_an_older_ps_merge_is_not_replayed(micro_zoo, tmp_path):
    """A ps+dfs run whose ps/best has been rewritten since its DFS stage was logged (as an
    extended PS stage that finds a new best rewrites it): the DFS stage's logged fitness,
    measured on the old merge, must not be fed back as if it were the new one's (the
    genomes asked for are the same, so a replay that checks genomes alone would accept
    it). Constructed by rewriting ps/best's weights, whatever a search would find."""
    from safetensors.torch import load_file, save_file

    config = write_config(tmp_path, micro_zoo[0], method="ps+dfs", evals=6)
    run_dir = tmp_path / "run"
    evolve(config, run_dir, progress=False)
    weights = run_dir / "ps" / "best" / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 1.01
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(EvomergeError, match=r"the dfs stage's 8 logged candidates were scored with .*/ps/best as it "
                                            r"was then, and it has been rewritten since .* cannot be replayed. Use a "
                                            r"new --run-dir"):
        evolve(config, run_dir, progress=False)
    assert sum(r["stage"] == "dfs" for r in read_candidates(run_dir)) == 8  # nothing logged on the new merge


PS_CONFIG = "method: ps\nmodels: [a]\nfitness: {tasks: [x], split: train}\nreport: {tasks: [x], split: test}\n" \
    "ps: {template: t.yaml}\n"


@pytest.mark.parametrize("text, message", [
    (PS_CONFIG.replace("tasks: [x], split: train", "tasks: [x, x], split: train"),
     r"line 3: fitness: Value error, tasks 'x' named twice"),
    ("method: pss\n", r"line 1: method: Input should be 'ps', 'dfs', 'ps\+dfs' or 'm2n2'"),
    (PS_CONFIG + "paper_scores:\n  x: {evolved: 0.5, b: 0.2}\n",
     r"line 7: paper_scores.x.b: 'b' is no row of the report; rows: a, evolved"),
    (PS_CONFIG + "paper_scores:\n  y: {a: 0.5}\n", "line 7: paper_scores.y: 'y' is not a report task"),
    (PS_CONFIG.replace("{tasks: [x], split: train}", "\n  tasks:\n    - {name: f, data: f.jsonl, lke: x}\n  split: train"),
     r"line 5: fitness.tasks\[0\].lke: unknown key 'lke'; did you mean 'like'\?"),
    (PS_CONFIG.replace("{tasks: [x], split: train}", "\n  tasks:\n    - {name: f, data: f.jsonl}\n  split: train"),
     r"line 5: fitness.tasks\[0\].like: Field required"),
    (PS_CONFIG.replace("ps: {", "dfs: {sources: [ps]}\nps: {").replace("method: ps", "method: dfs"),
     r"line 5: dfs.sources: names `ps` but method dfs has no PS stage"),
    ("method: ps\nmodels: [a]\nfitness: {tasks: [x], split: train}\nreport: {tasks: [x], split: test}\npopsize: 3\n",
     r"line 5: popsize: unknown key 'popsize'$"),
    # a typo is named on its own line with the key it is nearest to, not as the key it misses
    ("method: ps\nmodels: [a]\nfitnes: {tasks: [x], split: train}\nreport: {tasks: [x], split: test}\n",
     r"line 3: fitnes: unknown key 'fitnes'; did you mean 'fitness'\?"),
    (PS_CONFIG.replace("ps: {template: t.yaml}", "ps: {template: t.yaml, optimizer: {popsze: 4}}"),
     r"line 5: ps.optimizer.popsze: unknown key 'popsze'; did you mean 'popsize'\?"),
    (PS_CONFIG.replace("ps: {template: t.yaml}", "ps: {template: t.yaml, optimizer: {popsize: -3}}"),
     r"line 5: ps.optimizer.popsize: Input should be greater than or equal to 2"),
    (PS_CONFIG.replace("ps: {template: t.yaml}", "ps: {template: t.yaml, optimizer: {search: grid}}"),
     r"line 5: ps.optimizer.search: Input should be 'cmaes' or 'random'"),
    (PS_CONFIG + "m2n2: {population_size: 0}\n", r"line 6: m2n2.population_size: Input should be greater than or equal to 1"),
    (PS_CONFIG.replace("{tasks: [x], split: train}", "{tasks: [x], split: train, limit: 0}"),
     r"line 3: fitness.limit: Input should be greater than or equal to 1"),
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


@pytest.mark.parametrize("name", ["zoo-small-ps", "zoo-small-random", "zoo-small-dfs", "zoo-small-ps-dfs",
                                  "evollm-jp-ps", "evollm-jp-dfs", "evollm-jp-ps-dfs"])
def test_shipped_run_configs_are_valid(name):
    from niches.genome import LayerLayout, RecipeGenome

    recipes = Path(__file__).parents[1] / "recipes"
    config = load_config(recipes / f"{name}.yaml")
    if config.ps:
        layout = LayerLayout(32, ("model.embed_tokens.weight",), ("model.norm.weight", "lm_head.weight"))
        genome = RecipeGenome.from_file(recipes / config.ps.template, layout)
        assert genome.decode(genome.x0).merge_method == "dare_ties"
    if name.startswith("evollm-jp"):
        # the paper's fitness set is on the Hub (no local file to provide), prompted like the report task
        (fitness,) = config.fitness.resolve(None, recipes)
        assert (fitness.data, fitness.split) == ("hf:SakanaAI/gsm8k-ja-test_250-1319", "test")
        assert fitness.template == config.report.resolve(None, recipes)[0].template
        assert set(config.paper_scores) == {"mgsm_ja_evollm"} and "evolved" in config.paper_scores["mgsm_ja_evollm"]


def test_tasks_defined_in_the_config(tmp_path):
    """EvoLLM-JP's fitness set is on the Hub under no built-in task: a config defines it
    in place, scored like a built-in task (here a JSONL file in that task's format)."""
    (tmp_path / "ja.jsonl").write_text('{"question": "3たす4は？", "answer_number": 7}\n')
    settings = TaskSettings.model_validate({"split": "train", "tasks": [
        {"name": "ja_fitness", "data": "ja.jsonl", "like": "mgsm_ja_evollm"},
        {"name": "hub", "data": "hf:SakanaAI/gsm8k-ja-test_250-1319", "like": "mgsm_ja_evollm", "split": "test",
         "bos": False}]})
    local, hub = settings.resolve(None, tmp_path)
    assert (local.bos, hub.bos) == (None, False)  # the tokenizer's default, unless the config says
    assert settings.names == ["ja_fitness", "hub"]
    assert (local.name, local.data, local.split) == ("ja_fitness", str(tmp_path / "ja.jsonl"), "train")
    (example,) = local.load()
    assert "### 指示:\n3たす4は？" in local.prompt(example) and local.score_generation(example, "答えは7です") == 1.0
    assert (hub.data, hub.split, hub.answer_field) == ("hf:SakanaAI/gsm8k-ja-test_250-1319", "test", "answer_number")
    with pytest.raises(RecipeError, match="like: 'mgsm' is not a built-in task"):
        TaskSettings.model_validate({"split": "x", "tasks": [{"name": "a", "data": "a.jsonl", "like": "mgsm"}]}) \
            .resolve(None, tmp_path)


def test_dfs_over_a_post_norm_family_fails_before_the_run_folder(tmp_path):
    """Scales cannot fold into a post-norm model: `evolve` says so before it does any
    work, for dfs and for ps+dfs (whose PS merge has its template's family)."""
    from transformers import AutoConfig, AutoModel

    for name in ("a", "b"):
        config = AutoConfig.for_model("bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, vocab_size=64)
        AutoModel.from_config(config).save_pretrained(tmp_path / name)
    (tmp_path / "fit.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n')
    (tmp_path / "template.yaml").write_text(
        "merge_method: dare_ties\nbase_model: a\nmodels:\n  - model: b\n    parameters:\n"
        "      density: {free: [0.1, 1.0]}\n      weight: {free: [0.0, 1.0]}\n")
    common = "models: [a, b]\nfitness: {tasks: [fit.jsonl], split: train}\nreport: {tasks: [fit.jsonl], split: test}\n"
    for method, sections in [("dfs", "dfs: {repeats: 1}\n"),
                             ("ps+dfs", "ps: {template: template.yaml}\ndfs: {sources: [ps, b], repeats: 1}\n")]:
        config = tmp_path / "config.yaml"
        config.write_text(f"method: {method}\n{common}{sections}")
        with pytest.raises(RecipeError, match=r"model .*/a \(model 0 of the data-flow space\): data-flow scales cannot "
                                              r"be folded into a 'bert' checkpoint: post-norm"):
            evolve(config, tmp_path / "run", progress=False)
        assert not (tmp_path / "run").exists()


def test_a_missing_template_is_named(micro_zoo, tmp_path):
    config = write_config(tmp_path, micro_zoo[0])
    (tmp_path / "template.yaml").unlink()
    with pytest.raises(EvomergeError, match=r"config.yaml: ps.template .*template.yaml: No such file"):
        evolve(config, tmp_path / "run", progress=False)


def test_a_bad_setting_fails_before_the_run_folder_and_a_folder_without_scores_takes_a_new_config(micro_zoo, tmp_path):
    """`popsize: -3` used to die in pycma after the run folder was made, and the folder then
    refused the corrected config although nothing had been scored."""
    config = write_config(tmp_path, micro_zoo[0])
    good = config.read_text()
    config.write_text(good.replace("popsize: 6", "popsize: -3"))
    assert main(["evolve", str(config), "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 2
    assert not (tmp_path / "run").exists()
    # a folder an earlier attempt made, with another config and nothing scored: it is taken over
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(good.replace("seed: 0", "").replace("threads: 1", "threads: 2"))
    (run_dir / "optimizer.jsonl").write_text('{"stage": "ps", "round": 0}\n')
    config.write_text(good)
    evolve(config, run_dir, max_evals=6, progress=False)
    assert (run_dir / "config.yaml").read_text() == good
    assert len(read_candidates(run_dir)) == 8
    # once candidates are scored, another config is refused (test_a_rerun_with_another_config_is_refused)


def test_what_fails_before_the_search_leaves_no_scored_candidate(micro_zoo, tmp_path):
    """A baseline that does not exist, and a fitness task without examples, are refused
    before anything is logged, so the corrected config may reuse the folder."""
    config = write_config(tmp_path, micro_zoo[0], evals=6)
    good = config.read_text()
    config.write_text(good.replace("baselines: [zoo:base]", "baselines: [zoo:nope]"))
    with pytest.raises(EvomergeError, match="zoo:nope"):
        evolve(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    (tmp_path / "empty.jsonl").write_text("")
    config.write_text(good.replace("tasks: [math_lang], split: train", "tasks: [empty.jsonl], split: train"))
    with pytest.raises(EvomergeError, match="'empty' gave no examples"):
        evolve(config, tmp_path / "run", progress=False)
    assert not read_candidates(tmp_path / "run") if (tmp_path / "run" / "candidates.jsonl").exists() else True
    config.write_text(good)
    evolve(config, tmp_path / "run", progress=False)
    assert len(read_candidates(tmp_path / "run")) == 8


def test_a_replay_whose_scores_changed_is_refused(micro_zoo, tmp_path):
    """Rewritten fitness data changes the task key: the logged candidates would be scored
    afresh and the search told other scores than the log holds."""
    data = tmp_path / "fit.jsonl"
    rows = [json.dumps({"prompt": f"{i} +1 =", "answer": str(i + 1)}) for i in range(4)]
    data.write_text("\n".join(rows) + "\n")
    config = write_config(tmp_path, micro_zoo[0], evals=6)
    config.write_text(config.read_text().replace("tasks: [math_lang], split: train, limit: 24",
                                                 "tasks: [fit.jsonl], split: train"))
    evolve(config, tmp_path / "run", progress=False)
    data.write_text("\n".join(rows[:3]) + "\n")
    with pytest.raises(EvomergeError, match="changed since"):
        evolve(config, tmp_path / "run", progress=False)


def test_a_run_folder_in_use_is_refused(micro_zoo, tmp_path):
    import fcntl

    config = write_config(tmp_path, micro_zoo[0], evals=6)
    (tmp_path / "run").mkdir()
    with (tmp_path / "run" / ".lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(EvomergeError, match="in use by another evomerge evolve"):
            evolve(config, tmp_path / "run", progress=False)
    evolve(config, tmp_path / "run", progress=False)  # free again
    assert len(read_candidates(tmp_path / "run")) == 8


def test_max_evals_zero_writes_nothing(micro_zoo, tmp_path, capsys):
    config = write_config(tmp_path, micro_zoo[0])
    assert main(["evolve", str(config), "--run-dir", str(tmp_path / "run"), "--max-evals", "0", "--no-progress"]) == 2
    assert "--max-evals 0: every stage needs at least one evaluation; nothing was run and no best/ was written" in \
        capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def dry_run(config: Path, run_dir: Path, capsys, *flags: str) -> tuple[int, str]:
    code = main(["evolve", str(config), "--run-dir", str(run_dir), "--dry-run", *flags])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_a_dry_run_plans_what_the_run_did(ps_dfs_run, capsys):
    """The plan of a finished ps+dfs run names the genes and budgets its log shows (the DFS
    genes counted before the PS merge exists), resumes its folder, and touches nothing."""
    run_dir, _ = ps_dfs_run
    rows = read_candidates(run_dir)
    genes = {stage: len(next(r for r in rows if r["stage"] == stage)["genome"]) for stage in ("ps", "dfs")}
    before = {path: path.stat().st_mtime_ns for path in run_dir.rglob("*")}
    code, out = dry_run(run_dir.parent / "config.yaml", run_dir, capsys)
    assert code == 0, out
    assert f"stage ps: CMA-ES (popsize 6, sigma0 0.2) over {genes['ps']} genes, 6 evaluations" in out
    assert f"stage dfs: CMA-ES (popsize 3, sigma0 0.2) over {genes['dfs']} genes, 6 evaluations (+ its start and " \
           "its final mean, outside the budget)" in out
    assert "fitness: math_lang (24 train examples)" in out
    assert "report: math_lang (30 test examples), math (30 test examples)" in out
    assert f"resumed; its {len(rows)} scored candidates are replayed" in out and "in use" not in out
    assert {path: path.stat().st_mtime_ns for path in run_dir.rglob("*")} == before
    with RunFolder(run_dir).claimed():  # a run is going on in the folder
        code, out = dry_run(run_dir.parent / "config.yaml", run_dir, capsys)
    assert code == 0 and "in use by another evomerge evolve now; a run refuses to start until that one ends" in out
    code, out = dry_run(run_dir.parent / "config.yaml", run_dir, capsys, "--max-evals", "9")
    assert code == 0 and "note: --max-evals extends the PS stage first; if it finds a new best" in out


def test_a_dry_run_leaves_a_live_log_alone_and_checks_its_sources(ps_run, tmp_path, capsys):
    """A half-written last line (a run appending now) is neither read nor cut; a source
    rewritten since the log was scored is refused, as the run would refuse it."""
    import shutil

    run_dir = Path(shutil.copytree(ps_run[0], tmp_path / "run"))
    config = ps_run[0].parent / "config.yaml"
    with (run_dir / "candidates.jsonl").open("a") as log:
        log.write('{"stage": "ps", "kind": "sam')
    written = (run_dir / "candidates.jsonl").read_bytes()
    code, out = dry_run(config, run_dir, capsys)
    assert code == 0 and f"its {len(read_candidates(ps_run[0]))} scored candidates" in out
    assert (run_dir / "candidates.jsonl").read_bytes() == written
    sources = json.loads((run_dir / "sources.json").read_text())
    sources["ps"] = {ref: "0" * 20 for ref in sources["ps"]}
    (run_dir / "sources.json").write_text(json.dumps(sources))
    code, out = dry_run(config, run_dir, capsys)
    logged = len(read_candidates(ps_run[0]))
    assert code == 2 and f"the ps stage's {logged} logged candidates were scored with" in out and "Traceback" not in out
    assert json.loads((run_dir / "sources.json").read_text()) == sources


def test_a_dry_run_of_m2n2_and_of_a_new_folder(micro_zoo, tmp_path, capsys):
    config = write_config(tmp_path, micro_zoo[0], method="m2n2", extra="m2n2: {max_evals: 8, children_per_ask: 2}\n")
    config.write_text(config.read_text().replace("m2n2: {max_evals: 12, population_size: 5}\n", ""))
    code, out = dry_run(config, tmp_path / "run", capsys, "--max-evals", "4", "--executor", "pool", "--workers", "2")
    assert code == 0, out
    assert "stage m2n2: an archive of 20 grown from the 2 sources, 4 children, 2 per round" in out
    assert "executor pool, 2 workers" in out and "run folder" in out and ": new" in out
    assert not (tmp_path / "run").exists()


def test_a_dry_run_refuses_what_the_run_would_refuse(ps_run, micro_zoo, tmp_path, capsys):
    """Exit 2 with the reason, before any tensor is computed: a model the zoo lacks, a
    fitness task without examples (a real run finds that only at its first candidate),
    another config for a folder with scored candidates."""
    config = write_config(tmp_path, micro_zoo[0])
    good = config.read_text()
    (tmp_path / "template.yaml").write_text(TEMPLATE.replace("zoo:math", "zoo:maths"))
    code, out = dry_run(config, tmp_path / "run", capsys)
    assert code == 2 and "has no model 'maths'" in out and "Traceback" not in out
    (tmp_path / "template.yaml").write_text(TEMPLATE)
    (tmp_path / "empty.jsonl").write_text("")
    config.write_text(good.replace("tasks: [math_lang], split: train", "tasks: [empty.jsonl], split: train"))
    code, out = dry_run(config, tmp_path / "run", capsys)
    assert code == 2 and "fitness task 'empty' gave no examples" in out
    config.write_text(good + "seed: 1\n")
    run_dir, _ = ps_run
    code, out = dry_run(config, run_dir, capsys)
    assert code == 2 and "different config.yaml" in out
    assert not (tmp_path / "run").exists()


def test_random_search_baseline_at_the_same_budget(ps_run, micro_zoo, tmp_path):
    """`optimizer: {search: random}`: the PS stage draws its genomes uniformly in the unit
    box, at the CMA-ES run's budget and batch size, seeded (a rerun replays them)."""
    config = write_config(tmp_path, micro_zoo[0])
    config.write_text(config.read_text().replace("{max_evals: 12, popsize: 6}", "{search: random, max_evals: 12, popsize: 6}"))
    results = evolve(config, tmp_path / "run", progress=False)
    rows = read_candidates(tmp_path / "run")
    # the template's start too (CMA-ES's x0), then samples; no mean
    assert [(r["kind"], r["round"]) for r in rows] == [("start", 0)] + [("sample", g) for g in (0, 1) for _ in range(6)]
    assert (rows[0]["genome"], rows[0]["fitness"]) == (read_candidates(ps_run[0])[0]["genome"],
                                                       read_candidates(ps_run[0])[0]["fitness"])
    genomes = [r["genome"] for r in rows[1:]]
    assert all(0 <= g <= 1 for genome in genomes for g in genome) and len({tuple(g) for g in genomes}) == 12
    assert genomes != [r["genome"] for r in read_candidates(ps_run[0])[1:13]]  # not CMA-ES's
    best = max(rows, key=lambda r: r["fitness"])
    assert results["stages"]["ps"]["best_genome"] == best["genome"] and results["stages"]["ps"]["evaluations"] == 12
    assert "16 genes evolved by uniform random search (the baseline) (12 evaluations" in \
        (tmp_path / "run" / "best" / "README.md").read_text()
    again = evolve(config, tmp_path / "run", progress=False)  # replayed, not redrawn
    assert read_candidates(tmp_path / "run") == rows and again["stages"] == results["stages"]


def test_the_shipped_random_baseline_config_matches_the_ps_config():
    recipes = Path(__file__).parents[1] / "recipes"
    ps, random = load_config(recipes / "zoo-small-ps.yaml"), load_config(recipes / "zoo-small-random.yaml")
    assert random.ps.optimizer.search == "random" and ps.ps.optimizer.search == "cmaes"
    assert random.ps.template == ps.ps.template
    assert random.ps.optimizer.max_evals == ps.ps.optimizer.max_evals
    assert random.model_dump(exclude={"ps"}) == ps.model_dump(exclude={"ps"})


def test_the_fitness_plot_tells_the_stages_means_apart():
    """ps+dfs: each stage's distribution mean has its own marker and colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from niches.loop import Outcome
    from niches.plots import draw_fitness

    def outcome(name: str) -> Outcome:
        rows = [{"kind": "sample", "round": i // 2, "fitness": 0.1 * i} for i in range(4)]
        return Outcome(name, np.zeros(2), 0.3, 4, rows + [{"kind": "mean", "round": 2, "fitness": 0.35}])

    fig, ax = plt.subplots()
    draw_fitness(ax, [outcome("ps"), outcome("dfs")])
    means = [line for line in ax.lines if line.get_label().endswith("distribution mean")]
    plt.close(fig)
    assert [line.get_label() for line in means] == ["ps: distribution mean", "dfs: distribution mean"]
    assert means[0].get_marker() != means[1].get_marker() and means[0].get_color() != means[1].get_color()
    assert list(means[1].get_xdata()) == [8]  # after the PS stage's 4 samples and its own 4


class SumScorer:
    """Scores a genome by its genes (one task, one example per gene), counting its calls:
    the loop's `scorer.score(candidates)` without models. `reverse`: candidates finish in
    reverse ask order; `fails(position)`: the candidates that raise, by place in their round."""

    def __init__(self, task_key: str = "genes-1", scale: float = 1.0, *, reverse: bool = False, fails=None):
        self.calls: list[int] = []
        self.task_key, self.scale, self.reverse, self.fails = task_key, scale, reverse, fails

    def task_keys(self):
        return {"genes": self.task_key}

    def busy(self):
        return ""

    def score(self, candidates):
        import numpy as np

        from niches.loop import Scored

        self.calls.append(len(candidates))
        order = range(len(candidates) - 1, -1, -1) if self.reverse else range(len(candidates))
        for i in order:
            genome = np.asarray(candidates[i].genome, dtype=float).ravel()
            if self.fails and self.fails(i):
                yield i, Scored({}, f"key{genome.tolist()}", error="RuntimeError: out of memory")
            else:
                yield i, Scored({"genes": self.scale * np.clip(genome, 0, None)}, f"key{genome.tolist()}")


def test_the_loop_drives_any_search_in_one_scoring_call_per_round_and_replays_its_log(tmp_path):
    import numpy as np

    from niches.baselines import RandomSearch
    from niches.loop import run_search
    from niches.m2n2 import NaturalNiches

    folder = RunFolder(tmp_path)
    folder.start("x: 1\n", None, scored=False)
    scorer = SumScorer()
    outcome = run_search("random", RandomSearch(3, max_evals=7, popsize=3, seed=1), scorer, folder, progress=False,
                         total=7)
    assert scorer.calls == [3, 3, 1] and outcome.evaluations == 7
    rows = [json.loads(line) for line in (tmp_path / "candidates.jsonl").read_text().splitlines()]
    assert [(r["round"], r["index"]) for r in rows] == [(0, 0), (0, 1), (0, 2), (1, 3), (1, 4), (1, 5), (2, 6)]
    assert outcome.best_fitness == max(r["fitness"] for r in rows) == pytest.approx(max(np.mean(r["genome"])
                                                                                          for r in rows))
    # a rerun replays: same lines, nothing appended, the same answer
    again = run_search("random", RandomSearch(3, max_evals=7, popsize=3, seed=1), SumScorer(), folder,
                       progress=False, total=7)
    assert (tmp_path / "candidates.jsonl").read_text().count("\n") == 7
    assert again.best_genome.tolist() == outcome.best_genome.tolist()
    # a replay under other fitness tasks, or whose scores are not the logged ones, is refused
    with pytest.raises(EvomergeError, match="task keys differ"):
        run_search("random", RandomSearch(3, max_evals=7, popsize=3, seed=1), SumScorer("genes-2"), folder,
                   progress=False, total=7)
    with pytest.raises(EvomergeError, match="sample 0 of stage random was logged with fitness"):
        run_search("random", RandomSearch(3, max_evals=7, popsize=3, seed=1), SumScorer(scale=2.0), folder,
                   progress=False, total=7)
    # a search that asks for other genomes than the log holds is refused, not fed the logged scores
    with pytest.raises(EvomergeError, match="sample 0 of stage random does not replay"):
        run_search("random", RandomSearch(3, max_evals=7, popsize=3, seed=2), SumScorer(), folder, progress=False,
                   total=7)
    # M2N2 through the same loop: the seeds first (outside the budget), then a child per round
    seeds = [np.array([1.0, 0.0]), np.array([0.0, 1.0])]
    m2n2 = run_search("m2n2", NaturalNiches(4, seeds=seeds, max_evals=5, seed=0), SumScorer(), folder,
                      progress=False, total=5)
    kinds = [r["kind"] for r in m2n2.history]
    assert kinds == ["seed", "seed"] + ["sample"] * 5 and m2n2.evaluations == 5


def test_candidates_are_logged_as_they_finish_and_told_in_ask_order(tmp_path):
    """Candidates finishing in reverse order: each line is written as its candidate
    finishes, with its index in the ask order, and the search (CMA-ES, whose update depends
    on the order it is told) ends exactly where an in-order run ends."""
    from niches.cmaes import CMAES
    from niches.loop import run_search

    outcomes, logs = [], []
    for name, reverse in (("in-order", False), ("reversed", True)):
        folder = RunFolder(tmp_path / name)
        folder.start("x: 1\n", None, scored=False)
        search = CMAES([0.5, 0.5, 0.5], 0.3, popsize=4, max_evals=12, seed=3)
        outcomes.append(run_search("ps", search, SumScorer(reverse=reverse), folder, progress=False, total=12))
        logs.append([json.loads(line) for line in (tmp_path / name / "candidates.jsonl").read_text().splitlines()])
    assert [r["index"] for r in logs[1][:4]] == [3, 2, 1, 0]
    key = lambda r: (r["round"], r["index"])  # noqa: E731
    strip = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "session", "at")}  # noqa: E731
    assert [strip(r) for r in sorted(logs[1], key=key)] == [strip(r) for r in logs[0]]
    assert outcomes[0].best_genome.tolist() == outcomes[1].best_genome.tolist()


def test_a_failed_candidate_is_logged_ranked_last_and_replayed_without_scoring(tmp_path):
    """The second candidate of every round raises: it is logged with its error and fitness
    null, the search goes on to its budget and never answers with it. A rerun (where it
    would now succeed) tells the logged failure again without scoring it: same log, same
    answer."""
    import numpy as np

    from niches.cmaes import CMAES
    from niches.loop import run_search

    folder = RunFolder(tmp_path)
    folder.start("x: 1\n", None, scored=False)
    make = lambda: CMAES([0.5, 0.5, 0.5], 0.3, popsize=4, max_evals=12, seed=3)  # noqa: E731
    outcome = run_search("ps", make(), SumScorer(fails=lambda i: i == 1), folder, progress=False, total=12)
    rows = [json.loads(line) for line in (tmp_path / "candidates.jsonl").read_text().splitlines()]
    failed = [r for r in rows if r.get("error")]
    assert [r["index"] for r in failed] == [1, 5, 9]
    assert all(r["fitness"] is None and r["scores"] == {} and "out of memory" in r["error"] for r in failed)
    assert outcome.evaluations == 12
    assert outcome.best_fitness == max(r["fitness"] for r in rows if not r.get("error"))
    assert not any(np.array_equal(outcome.best_genome, r["genome"]) for r in failed)

    scorer = SumScorer()
    again = run_search("ps", make(), scorer, folder, progress=False, total=12)
    assert (tmp_path / "candidates.jsonl").read_text().count("\n") == 12
    assert scorer.calls[:3] == [3, 3, 3]  # each round's failure is not scored again
    assert again.best_genome.tolist() == outcome.best_genome.tolist()


def test_more_failures_in_a_row_than_allowed_stop_the_run_with_the_last_error(tmp_path):
    from niches.baselines import RandomSearch
    from niches.loop import run_search

    folder = RunFolder(tmp_path)
    folder.start("x: 1\n", None, scored=False)
    with pytest.raises(EvomergeError, match=r"3 candidates of the random stage failed in a row \(max_failures: 2\)"
                                            r"; the last: RuntimeError: out of memory"):
        run_search("random", RandomSearch(3, max_evals=8, popsize=4, seed=0), SumScorer(fails=lambda i: i > 0),
                   folder, progress=False, total=8, max_failures=2)
    rows = [json.loads(line) for line in (tmp_path / "candidates.jsonl").read_text().splitlines()]
    assert [bool(r.get("error")) for r in rows] == [False, True, True, True]
