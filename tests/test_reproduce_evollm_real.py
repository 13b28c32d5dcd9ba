"""scripts/reproduce_evollm_real.py end to end with toy budgets (--quick) on a zoo of the real
tier's shape made from the micro zoo (models base, math, german; tasks math, german,
math_de): every run, the JSON, the table, the plots, and a rerun after a kill."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import reproduce_evollm_real as script  # noqa: E402

TASKS = ["math_de", "math", "german"]


def real_shaped_zoo(micro: Path, out: Path) -> Path:
    """The micro zoo under the real tier's names: lang stands in for german, math_lang for math_de."""
    manifest = json.loads((micro / "zoo.json").read_text())
    (out / "models").mkdir(parents=True)
    (out / "data").mkdir()
    for name, source in {"base": "base", "math": "math", "german": "lang"}.items():
        (out / "models" / name).symlink_to(micro / "models" / source)
    tasks = {}
    for name, source in {"math": "math", "german": "lang", "math_de": "math_lang"}.items():
        (out / "data" / name).symlink_to(micro / "data" / source)
        tasks[name] = manifest["tasks"][source]
    (out / "zoo.json").write_text(json.dumps({"size": "real-shaped", "models": {m: f"models/{m}" for m in
                                                                                 ("base", "math", "german")},
                                              "tasks": tasks}))
    return out


@pytest.fixture(scope="module")
def reproduction(micro_zoo, tmp_path_factory) -> tuple[list[str], Path]:
    folder = tmp_path_factory.mktemp("real")
    zoo = real_shaped_zoo(micro_zoo[0], folder / "zoo")
    args = ["--runs", str(folder / "runs"), "--zoo", str(zoo), "--docs", str(folder / "docs"), "--quick"]
    script.main(args)
    return args, folder


def candidates(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "candidates.jsonl").read_text().splitlines()]


def test_the_json_has_the_issues_shape(reproduction):
    _, folder = reproduction
    data = json.loads((folder / "docs" / "evollm_real.json").read_text())
    assert data["split"] == "test"
    assert set(data["rows"]) == {"base", "math", "german", "ps", "dfs", "ps+dfs", "m2n2", "random"}
    for row in data["rows"].values():
        assert set(row) == set(TASKS) and all(set(row[t]) == {"mean", "stderr", "n"} for t in TASKS)
        assert all(row[t]["n"] == script.QUICK["limit"] for t in TASKS)
    ps = data["seeds"]["ps"]
    assert {"0", "1", "2"} <= set(ps) and data["rows"]["ps"] == ps[str(ps["best_on_dev"])]
    assert data["budgets"]["ps"]["finished_seeds"] == [0, 1, 2]
    assert data["budgets"]["ps+dfs"]["evaluations"] == {"0": {"ps": script.QUICK["evals"], "dfs": script.QUICK["evals"]}}
    budgets = data["budgets"].values()  # every candidate clocked, so every wall time is whole
    assert all(n == 0 for b in budgets for n in b["untimed_candidates"].values())
    assert all(s > 0 for b in budgets for s in b["wall_seconds"].values())


def test_every_run_and_source_is_checked_on_the_held_out_problems(reproduction):
    """The held-out check scores each run's exported merge (best/) and the sources on the
    first problems of math_de's train split, with the run's score cache: the merge scores
    there as it does freshly loaded from best/ in another harness."""
    from dataclasses import replace

    from evaluation.harness import Harness
    from evaluation.tasks import zoo_tasks

    _, folder = reproduction
    data = json.loads((folder / "docs" / "evollm_real.json").read_text())
    heldout, limit = data["heldout"], script.QUICK["limit"]
    assert (heldout["task"], heldout["split"], heldout["limit"]) == ("math_de", "train", limit)
    assert set(heldout["by_run"]) == {run.name for run in script.RUNS}
    assert set(heldout["rows"]) == set(data["rows"])
    assert all(score["n"] == limit for score in heldout["rows"].values())
    assert heldout["rows"]["ps"] == heldout["by_run"][f"ps-seed{data['seeds']['ps']['best_on_dev']}"]
    task = replace(zoo_tasks(folder / "zoo")["math_de"], split="train")
    fresh = Harness(folder / "runs" / "m2n2" / "best", device="cpu").score_resident([task], limit=limit)["math_de"]
    assert heldout["by_run"]["m2n2"]["mean"] == fresh.mean
    section = (folder / "docs" / "results.md").read_text().split("<!-- evollm_real:start -->")[1]
    assert "| math_de held-out |" in section


def test_the_docs_section_plots_and_configs(reproduction):
    args, folder = reproduction
    (folder / "docs" / "evollm_real.json").unlink()
    sessions = (folder / "runs" / "ps-seed0" / "sessions.jsonl").read_text()
    script.main(args + ["--report"])  # the same outputs again, from the finished runs, running nothing
    assert (folder / "runs" / "ps-seed0" / "sessions.jsonl").read_text() == sessions
    text = (folder / "docs" / "results.md").read_text()
    section = text.split("<!-- evollm_real:start -->")[1].split("<!-- evollm_real:end -->")[0]
    assert "Toy budgets (--quick)" in section and "pending" not in section
    assert str(folder) not in section  # no path of the machine that made it
    assert "| **PS+DFS" in section and "| 55.2 |" in section and "Targets (issue 16;" in section
    for name in ("fitness", "ps_parameters", "dfs_path", "ps_dfs_path"):
        assert (folder / "docs" / f"evollm_real_{name}.png").stat().st_size > 0
        assert f"evollm_real_{name}.png" in section
    config = (folder / "runs" / "configs" / "ps-seed2.yaml").read_text()
    assert "seed: 2" in config and "template: zoo-real-ps-template.yaml" in config
    assert (folder / "runs" / "configs" / "zoo-real-ps-template.yaml").read_text() == \
        (ROOT / "recipes" / "zoo-real-ps-template.yaml").read_text()


def test_ps_dfs_replays_its_ps_stage_from_ps_seed0s_scores(reproduction):
    """The same search, seed and template: the PS stage of ps+dfs is PS seed 0's, and the
    warmed score cache serves every candidate of it (none is scored twice)."""
    _, folder = reproduction
    runs = folder / "runs"
    ps = [(r["genome"], r["candidate"], r["fitness"]) for r in candidates(runs / "ps-seed0")]
    both = [(r["genome"], r["candidate"], r["fitness"]) for r in candidates(runs / "ps-dfs") if r["stage"] == "ps"]
    assert both == ps
    warmed = cache(runs / "ps-dfs")
    assert warmed[:len(cache(runs / "ps-seed0"))] == cache(runs / "ps-seed0")  # its first lines, report's included
    keys = [(row["candidate"], row["task_key"]) for row in warmed]
    assert len(keys) == len(set(keys))


def cache(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "scores.jsonl").read_text().splitlines()]


def test_a_rerun_after_a_kill_gives_the_same_results(reproduction, tmp_path):
    """A kill during the DFS stage of ps+dfs (its log cut there, no results or sessions yet)
    and before the later runs finished: the same command completes every run, with the same
    candidates and the same table."""
    args, folder = reproduction
    runs = folder / "runs"
    before = {run.name: candidates(runs / run.name) for run in script.RUNS}
    table = json.loads((folder / "docs" / "evollm_real.json").read_text())
    log = (runs / "ps-dfs" / "candidates.jsonl").read_text().splitlines(keepends=True)
    cut = next(i for i, line in enumerate(log) if json.loads(line)["stage"] == "dfs") + 3  # its start, 2 samples
    (runs / "ps-dfs" / "candidates.jsonl").write_text("".join(log[:cut]) + log[cut][:20])  # a torn last line
    kept = {json.loads(line)["candidate"] for line in log[:cut]}
    warmed = len(cache(runs / "ps-seed0"))  # the scores of the candidates after the cut and of the report go too
    lines = (runs / "ps-dfs" / "scores.jsonl").read_text().splitlines(keepends=True)
    (runs / "ps-dfs" / "scores.jsonl").write_text("".join(lines[:warmed] + [line for line in lines[warmed:]
                                                                            if json.loads(line)["candidate"] in kept]))
    for name in ("ps-dfs", "m2n2", "dfs"):
        for file in ("results.json", "sessions.jsonl"):
            (runs / name / file).unlink()
    assert set(script.finished(runs)) == {"ps-seed0", "ps-seed1", "ps-seed2", "random"}
    script.main(args + ["--report"])  # the runs under way are listed with their progress
    section = (folder / "docs" / "results.md").read_text().split("<!-- evollm_real:start -->")[1]
    evals = script.QUICK["evals"]
    assert f"* ps-dfs: ps stage {evals} of {evals} evaluations, best dev fitness so far" in section
    assert f"; dfs stage 2 of {evals} evaluations" in section and f"* m2n2: m2n2 stage {evals} of {evals}" in section
    script.main(args)
    drop = lambda rows: [{k: v for k, v in row.items() if k not in ("seconds", "session", "at")} for row in rows]  # noqa: E731
    assert {name: drop(candidates(runs / name)) for name in before} == {name: drop(rows) for name, rows in before.items()}
    for run in script.RUNS:  # nothing was scored twice
        keys = [(row["candidate"], row["task_key"]) for row in cache(runs / run.name)]
        assert len(keys) == len(set(keys))
    again = json.loads((folder / "docs" / "evollm_real.json").read_text())
    assert again["rows"] == table["rows"] and again["seeds"] == table["seeds"] and again["heldout"] == table["heldout"]
    assert "Every run has finished." in (folder / "docs" / "results.md").read_text()


def test_the_runs_go_on_where_the_zoo_was_rebuilt(micro_zoo, tmp_path, monkeypatch, capsys):
    """The project's runs outlast a machine: their folders travel in the repository
    (experiments/, without checkpoints) and the next machine rebuilds the real zoo in its
    place, the same bytes in new files. Rerun there, the runs replay with nothing scored
    again; a zoo rebuilt with other bytes is refused, naming the model, before anything is
    scored."""
    import shutil

    import evaluation.zoo as zoo_module

    built = shutil.copytree(real_shaped_zoo(micro_zoo[0], tmp_path / "linked"), tmp_path / "built")  # files, not links
    home = tmp_path / "zoo-home"
    shutil.copytree(built, home / "real")
    monkeypatch.setattr(zoo_module, "ZOO_HOME", home)
    runs = tmp_path / "runs"
    args = ["--runs", str(runs), "--docs", str(tmp_path / "docs"), "--quick", "--only", "ps-seed0"]
    script.main(args)
    logged, scores = candidates(runs / "ps-seed0"), (runs / "ps-seed0" / "scores.jsonl").read_text()
    log = (runs / "ps-seed0" / "candidates.jsonl").read_text().splitlines(keepends=True)
    (runs / "ps-seed0" / "candidates.jsonl").write_text("".join(log[:3]))  # killed after 3 candidates
    shutil.rmtree(runs / "ps-seed0" / "best")  # what the repository does not carry
    for left_behind in ("results.json", "sessions.jsonl"):
        (runs / "ps-seed0" / left_behind).unlink()
    shutil.rmtree(home)  # the next machine: the zoo built again, new files of the same bytes
    shutil.copytree(built, home / "real", copy_function=shutil.copyfile)
    script.main(args)
    drop = lambda rows: [{k: v for k, v in row.items() if k not in ("seconds", "session", "at")} for row in rows]  # noqa: E731
    assert drop(candidates(runs / "ps-seed0")) == drop(logged)
    assert (runs / "ps-seed0" / "scores.jsonl").read_text() == scores  # not one candidate scored again

    weights = home / "real" / "models" / "math" / "model.safetensors"
    from safetensors.torch import load_file, save_file

    save_file({name: tensor * 1.01 for name, tensor in load_file(weights).items()}, weights, metadata={"format": "pt"})
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        script.main(args)
    assert exit_info.value.code == 2
    assert "models/math as it was then, and it has been rewritten since" in capsys.readouterr().err
    assert (runs / "ps-seed0" / "scores.jsonl").read_text() == scores


def test_pending_runs_are_listed_and_targets_wait_for_their_rows(tmp_path):
    data = script.summary(tmp_path, {})
    assert data["rows"] == {} and data["budgets"]["ps"]["planned"]["ps"]["max_evals"] > 0
    body = script.table(data, {}, [], quick=False)
    assert body.count("| pending |") == len(script.METHODS)
    assert "not checked yet" in body and "Toy budgets" not in body


def test_the_targets_are_checked_two_standard_errors_each_way():
    score = lambda mean, stderr: {"mean": mean, "stderr": stderr, "n": 200}  # noqa: E731
    rows = {"math": {"math_de": score(0.135, 0.024)}, "german": {"math_de": score(0.010, 0.007)},
            "ps": {"math_de": score(0.300, 0.032)}, "ps+dfs": {"math_de": score(0.290, 0.032)}}
    text = script.targets(rows, {"ps": {"0": {"math_de": score(0.280, 0.032)}}}, {})
    assert "PS against math on math_de: 0.300" in text and text.count("each way: yes") == 2
    assert "PS+DFS ≥ PS on math_de: 0.290 vs 0.300 (the best PS seed on dev): no; vs 0.280 (seed 0" in text
    assert "by construction" not in text
    rows["ps"]["math_de"] = score(0.240, 0.030)  # 0.240 - 0.060 = 0.180 < 0.135 + 0.048 = 0.183
    assert "PS against math on math_de: 0.240 ± 0.030 vs 0.135 ± 0.024 (difference +0.105); more than two " \
           "standard errors each way: no." in script.targets(rows, {}, {})
    # a DFS stage whose best is its start (the PS merge): said, so the target is not read as DFS's doing
    budgets = {"ps+dfs": {"best_kind": {"0": ["sample", "start"]}, "best_dev_fitness": {"0": [0.19, 0.19]}}}
    assert "PS+DFS exports the PS merge: the target holds by construction" in script.targets(rows, {}, budgets)
    assert script.fitnesses(budgets["ps+dfs"], "0") == "0.190 → 0.190 (its start)"


def test_the_real_configs_agree_where_the_comparison_needs_it():
    """Random search is the PS search with uniform genomes; the PS stage of PS+DFS is PS seed
    0's search (so it replays from its scores); every run shares fitness, report and sources;
    the PS template has a density and a weight per model for the embeddings, 6 groups of 5 of
    the 30 layers and the head (32 genes)."""
    from niches.config import load_config
    from niches.genome import LayerLayout, RecipeGenome

    recipes = ROOT / "recipes"
    configs = {run.recipe: load_config(recipes / run.recipe) for run in script.RUNS}
    ps, random, both = configs["zoo-real-ps.yaml"], configs["zoo-real-random.yaml"], configs["zoo-real-ps-dfs.yaml"]
    assert random.ps.optimizer.search == "random" and ps.ps.optimizer.search == "cmaes"
    assert random.ps.optimizer.max_evals == ps.ps.optimizer.max_evals and random.ps.template == ps.ps.template
    assert both.ps == ps.ps and both.dfs.sources == ["ps", "zoo:german"] and both.dfs.repeats == 3
    assert configs["zoo-real-m2n2.yaml"].m2n2.max_evals == ps.ps.optimizer.max_evals
    shared = {"zoo", "models", "baselines", "fitness", "report", "device", "dtype", "batch_size", "threads"}
    assert len({json.dumps(c.model_dump(include=shared), sort_keys=True) for c in configs.values()}) == 1
    assert ps.fitness.split == "dev" and ps.report.split == "test" and ps.report.names == TASKS
    layout = LayerLayout(30, ("model.embed_tokens.weight",), ("model.norm.weight", "lm_head.weight"))
    assert RecipeGenome.from_file(recipes / ps.ps.template, layout).dimension == 32


def test_the_dry_run_plans_every_run_and_touches_nothing(reproduction, tmp_path, capsys):
    """After the runs: each plan says its folder resumes with the candidates its log holds,
    and no file changed; for a runs folder that does not exist, every folder is new and
    none is made."""
    args, folder = reproduction
    before = {path: path.stat().st_mtime_ns for path in folder.rglob("*")}
    capsys.readouterr()
    script.main(args + ["--dry-run"])
    out = capsys.readouterr().out
    for run in script.RUNS:
        plan = out.split(f"== {run.name} (")[1].split("\n== ")[0]
        assert f"resumed; its {len(candidates(folder / 'runs' / run.name))} scored candidates" in plan
        assert "\nfitness: math_de (" in plan and " dev examples)" in plan  # loaded and counted by plan()
    assert out.count("stage ps: CMA-ES (popsize 3, sigma0 0.2) over ") == 4  # 3 seeds and the PS stage of PS+DFS
    assert "stage ps: uniform random search over" in out and "stage m2n2: an archive of 4" in out
    assert {path: path.stat().st_mtime_ns for path in folder.rglob("*")} == before
    fresh = args.copy()
    fresh[fresh.index("--runs") + 1] = str(tmp_path / "runs")
    script.main(fresh + ["--dry-run", "--only", "dfs"])
    out = capsys.readouterr().out
    assert out.startswith("== dfs (") and f"run folder {tmp_path / 'runs' / 'dfs'}: new" in out
    assert not (tmp_path / "runs").exists()


def test_bad_input_is_a_message_and_exit_code_2(tmp_path, capsys):
    """A missing zoo folder, or --report on a runs folder that is not there: one line
    naming it, exit code 2, no traceback and nothing written."""
    cases = [(["--runs", str(tmp_path / "runs"), "--zoo", str(tmp_path / "no-zoo"), "--docs", str(tmp_path / "docs")],
              "no-zoo"),
             (["--runs", str(tmp_path / "nothing"), "--report", "--docs", str(tmp_path / "docs")], "nothing"),
             (["--runs", str(tmp_path / "runs"), "--zoo", str(tmp_path / "no-zoo"), "--dry-run"], "no-zoo")]
    for argv, named in cases:
        with pytest.raises(SystemExit) as exit_info:
            script.main(argv)
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert "error:" in error and named in error and "Traceback" not in error
    assert not (tmp_path / "docs").exists()
