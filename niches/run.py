"""`evomerge evolve`: read a config, set up its stages, run them in a run folder, report.

    evomerge evolve recipes/zoo-small-ps.yaml --run-dir runs/ps

Methods: `ps` (a recipe template's free numbers), `dfs` (a path through the layers of
several models), `ps+dfs` (PS, then DFS over a pool that holds the PS merge, exported to
RUN_DIR/ps/best), `m2n2` (an archive of merges of the sources). PS and DFS stages search
with CMA-ES, or with uniform random genomes (`optimizer: {search: random}`), the baseline
at the same budget. The parts: niches/config.py (the config), niches/stages.py (genomes,
searches, the scorer), niches/loop.py (the loop and the candidate log, resume),
niches/runfolder.py (the run folder), niches/report.py (report, card, export),
niches/plots.py. The run folder's files: docs/evolve.md.
"""
from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

from evaluation.executors import check_executor
from evaluation.tasks import Task
from merging.checkpoint import resolve_model_path
from merging.engine import resolve_device
from merging.errors import EvomergeError
from niches.config import References, RunConfig, load_config
from niches.loop import Outcome, logged_candidates
from niches.report import card_notes, export, lineage, results_of, score_report
from niches.runfolder import RunFolder
from niches.stages import (Genome, Stage, budget, check_m2n2_tasks, dfs_genome, dfs_pool, dfs_stage, genome_search,
                           m2n2_stage, ps_stage, run_stage)


def evolve(config_path: str | Path, run_dir: str | Path, *, max_evals: int | None = None,
           progress: bool = True, executor: str | None = None, workers: int | None = None,
           ray_address: str | None = None) -> dict:
    """Run (or resume) the evolution a config describes; return results.json's content.
    `executor`, `workers` and `ray_address` override the config's."""
    import torch

    config, _ = _as_logged(_configured(config_path, max_evals, executor, workers, ray_address),
                           RunFolder(run_dir, read_only=True))
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _evolve(config, Path(config_path), Path(run_dir), max_evals, progress)
    finally:
        torch.set_num_threads(threads)


def plan(config_path: str | Path, run_dir: str | Path, *, max_evals: int | None = None,
         executor: str | None = None, workers: int | None = None, ray_address: str | None = None) -> str:
    """What `evolve` with the same arguments would do, in words, after the checks it makes
    before its first candidate: the config, the template, the models, the executor, each
    task's examples (loaded and counted), each stage's genes and budget, and whether the run
    folder would be started, resumed or refused (another config; a source rewritten since
    its candidates were scored). Only the fitness tasks' keys wait for the run: the workers
    measure them. Nothing is merged or scored and the run folder is not touched, not even a
    half-written line a live run is appending (`evomerge evolve --dry-run`)."""
    folder = RunFolder(run_dir, read_only=True)
    config, without_start = _as_logged(_configured(config_path, max_evals, executor, workers, ray_address), folder)
    setup = _prepare(config, Path(config_path), max_evals)
    try:
        described = _described(config, Path(config_path).read_text(), setup, folder, without_start)
        note = _check_logged_sources(config, setup, folder, max_evals)
        return described if note is None else f"{described}\n{note}"
    finally:
        for stage in setup.stages:
            stage.close()


def _configured(config_path: str | Path, max_evals: int | None, executor: str | None, workers: int | None,
                ray_address: str | None) -> RunConfig:
    """The config with the command line's overrides, checked."""
    config = load_config(config_path)
    config = config.model_copy(update={key: value for key, value in
                                       {"executor": executor, "workers": workers,
                                        "ray_address": ray_address}.items() if value is not None})
    check_executor(config.executor, config.workers)
    if config.dtype is None and resolve_device(config.device).type == "cuda":
        config = config.model_copy(update={"dtype": "bfloat16"})  # logged and exported alike (report.export)
    if max_evals is not None and max_evals < 1:
        raise EvomergeError(f"--max-evals {max_evals}: every stage needs at least one evaluation; nothing was run "
                            "and no best/ was written (a best merge from zero evaluations would be the search's "
                            "starting point, not a result)")
    return config


def _as_logged(config: RunConfig, folder: RunFolder) -> tuple[RunConfig, list[str]]:
    """The config a run folder's log replays under, and the stages it changed: a stage
    whose first generation was told without its start (summarised, with no start logged:
    logged before searches scored their start) goes on without one, so that a rerun
    exports what the run exported."""
    rows = logged_candidates(folder)
    told = {(row["stage"], row.get("round")) for row in folder.rows(folder.optimizer_file)}  # after each tell
    updates, without_start = {}, []
    for name in ("ps", "dfs"):
        section = getattr(config, name)
        logged = [row for row in rows if row["stage"] == name]
        if (section is not None and section.optimizer.evaluate_start and logged and (name, 0) in told
                and not any(r["kind"] == "start" for r in logged)):
            optimizer = section.optimizer.model_copy(update={"evaluate_start": False})
            updates[name] = section.model_copy(update={"optimizer": optimizer})
            without_start.append(name)
    return config.model_copy(update=updates), without_start


@dataclass
class _Setup:
    """What a run sets up before its run folder is touched."""

    references: References
    template_text: str | None
    fitness_tasks: list[Task]
    report_tasks: list[Task]
    models: list[str]
    report_rows: dict[str, str]
    """Report row key -> model folder or Hub id, for the sources and baselines."""
    first: Stage | None
    """The stage that runs first when it can be built now (ps, dfs); M2N2's needs the run folder."""
    later: list[tuple[str, Genome | None, int]]
    """The stages after `first`, as (name, genome or None, budget), for the dry run's plan."""

    @property
    def stages(self) -> list[Stage]:
        return [self.first] if self.first else []


def _prepare(config: RunConfig, config_path: Path, max_evals: int | None) -> _Setup:
    """Everything that can be set up is set up before the run folder is touched, so that a
    bad template or setting fails now, not after the PS stage's hours of work."""
    base_dir = config_path.parent
    references = References(config.zoo, base_dir)
    template_text = _read_template(base_dir / config.ps.template, config_path) if config.ps else None
    fitness_tasks = config.fitness.resolve(references.zoo_dir, base_dir)
    report_tasks = config.report.resolve(references.zoo_dir, base_dir)
    models = [references.resolve(m) for m in config.models]
    report_rows = {name: references.resolve(name) for name in config.models + config.baselines}
    first = (ps_stage(config, base_dir / config.ps.template, template_text, references, max_evals)
             if config.ps else None)
    later: list[tuple[str, Genome | None, int]] = []
    if config.method == "ps+dfs":  # the PS merge has the architecture of the model its template merges onto
        stand_in = dfs_genome(config, dfs_pool(config, references, str(first.checkpoints[first.reference].path)))
        genome_search(stand_in, config.dfs.optimizer, config.seed)
        later.append(("dfs", stand_in, budget(config.dfs.optimizer, max_evals).max_evals))
    if config.method == "dfs":
        first = dfs_stage(config, dfs_pool(config, references, None), max_evals)
    if config.method == "m2n2":
        check_m2n2_tasks(fitness_tasks)
        later.append(("m2n2", None, budget(config.m2n2, max_evals).max_evals))
    return _Setup(references, template_text, fitness_tasks, report_tasks, models, report_rows, first, later)


def _described(config: RunConfig, config_text: str, setup: _Setup, folder: RunFolder,
               without_start: list[str]) -> str:
    """The dry run's plan; loading each task's examples and checking the run folder are its
    last checks."""
    executor = config.executor + ("" if config.executor == "serial" else f", {config.workers or 'default'} workers")
    lines = [(f"method {config.method}, seed {config.seed}: candidates scored on {resolve_device(config.device).type} "
             f"in {config.dtype or 'the checkpoint dtype'} (executor {executor})"),
             "models: " + ", ".join(f"{name} = {path}" for name, path in zip(config.models, setup.models))]
    if config.baselines:
        lines.append("baselines (report only): " + ", ".join(config.baselines))
    for section, settings, tasks in (("fitness", config.fitness, setup.fitness_tasks),
                                     ("report", config.report, setup.report_tasks)):
        counts = []
        for task in tasks:
            examples = len(task.load(settings.limit))
            if not examples:
                raise EvomergeError(f"{section} task {task.name!r} gave no examples: check its data, split and limit")
            counts.append(f"{task.name} ({examples} {task.split} examples)")
        lines.append(f"{section}: " + ", ".join(counts))
    for name, genome, evals in [(s.name, s.genome, s.budget) for s in setup.stages] + setup.later:
        settings = getattr(config, name)
        if name == "m2n2":
            lines.append(f"stage m2n2: an archive of {settings.population_size} grown from the {len(setup.models)} "
                         f"sources, {evals} children, {settings.children_per_ask} per round")
            continue
        optimizer = settings.optimizer
        search = ("uniform random search" if optimizer.search == "random"
                  else f"CMA-ES (popsize {optimizer.popsize or 'default'}, sigma0 {optimizer.sigma0})")
        extra = [what for what, on in (("its start", optimizer.evaluate_start),
                                       ("its final mean", optimizer.search == "cmaes")) if on]
        lines.append(f"stage {name}: {search} over {genome.dimension} genes, {evals} evaluations"
                     + (f" (+ {' and '.join(extra)}, outside the budget)" if extra else "")
                     + ("; its log predates scored starts, so it goes on without one" if name in without_start else ""))
    scored = len(logged_candidates(folder))
    if scored:
        folder.check_same_config(config_text, setup.template_text)
        lines.append(f"run folder {folder.path}: resumed; its {scored} scored candidates are replayed from its log")
    else:
        lines.append(f"run folder {folder.path}: {'exists, nothing scored: started afresh' if folder.path.exists() else 'new'}")
    if folder.in_use():
        lines.append(f"run folder {folder.path}: in use by another evomerge evolve now; a run refuses to start "
                     "until that one ends")
    lines.append("dry run: nothing was merged or scored, and the run folder was not touched")
    return "\n".join(lines)


def _check_logged_sources(config: RunConfig, setup: _Setup, folder: RunFolder, max_evals: int | None) -> str | None:
    """Refuse, as the run would, a stage whose logged candidates were scored on sources that
    have changed since (a zoo rebuilt with other bytes). The DFS stage of ps+dfs is checked
    against the PS merge already exported, if there is one; what the dry run cannot know
    (a PS stage extended by --max-evals exporting another merge) is returned as a note."""
    sources = {stage.name: {ref: c.path for ref, c in stage.checkpoints.items()} for stage in setup.stages}
    ps_merge = folder.path / "ps" / "best"
    if config.method == "ps+dfs" and ps_merge.is_dir():
        sources["dfs"] = {ref: resolve_model_path(ref) for ref in dfs_pool(config, setup.references, str(ps_merge))}
    if config.method == "m2n2":
        sources["m2n2"] = {ref: resolve_model_path(ref) for ref in setup.models}
    for name, paths in sources.items():
        folder.check_sources(name, paths, len(logged_candidates(folder, name)))
    if config.method == "ps+dfs" and max_evals is not None and logged_candidates(folder, "dfs"):
        return ("note: --max-evals extends the PS stage first; if it finds a new best, ps/best is rewritten and "
                "the logged DFS candidates can no longer be replayed (the run then stops and says so)")
    return None


def _evolve(config: RunConfig, config_path: Path, run_dir: Path, max_evals: int | None, progress: bool) -> dict:
    started, session, load_at_start = time.perf_counter(), round(time.time(), 3), os.getloadavg()[0]
    setup = _prepare(config, config_path, max_evals)
    references, template_text, first = setup.references, setup.template_text, setup.first
    fitness_tasks, report_tasks, models, report_rows = (setup.fitness_tasks, setup.report_tasks, setup.models,
                                                        setup.report_rows)
    folder = RunFolder(run_dir)
    with folder.claimed(session):
        logged_before = len(logged_candidates(folder))
        folder.start(config_path.read_text(), template_text, scored=bool(logged_before))

        done: list[tuple[Stage, Outcome]] = []
        others: dict[str, str] = {}  # report rows besides the evolved merge: row key -> model folder or Hub id
        if first is not None:
            done.append((first, run_stage(first, config, folder, fitness_tasks, progress)))
        if config.method == "ps+dfs":
            ps_dir = folder.path / "ps" / "best"
            export(first.genome.decode(done[0][1].best_genome), ps_dir, config, references,
                   notes=card_notes([lineage(*done[0], config, references)], None, config))
            others["ps"] = str(ps_dir)
            stage = dfs_stage(config, dfs_pool(config, references, str(ps_dir)), max_evals)
            done.append((stage, run_stage(stage, config, folder, fitness_tasks, progress)))
        if config.method == "m2n2":
            stage = m2n2_stage(config, models, folder, max_evals)
            done.append((stage, run_stage(stage, config, folder, fitness_tasks, progress)))

        final_stage, final = done[-1]
        recipe = final_stage.genome.decode(final.best_genome)
        others.update(report_rows)
        report = score_report(recipe, others, config, folder, report_tasks, progress)
        results = results_of(config, done, report, references)
        export(recipe, folder.path / "best", config, references,
               notes=card_notes([lineage(s, o, config, references) for s, o in done], results, config))
        from niches.plots import plot_run

        plot_run(folder.path / "plots", [(s.genome, o) for s, o in done])
        folder.append(folder.sessions_file, {"started": folder.session, "seconds": round(time.perf_counter() - started, 1),
                                             "scored": len(logged_candidates(folder)) - logged_before,
                                             "load_average": [load_at_start, os.getloadavg()[0]],
                                             "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20})
        # the invocations that scored something (a replay of a finished run describes the run,
        # not the replay): their wall time, the machine's load and memory
        sessions = folder.rows(folder.sessions_file)
        working = [row for row in sessions if row.get("scored")] or sessions[:1]  # (else: the one that finished it)
        results["wall_seconds"], results["untimed_candidates"] = _wall_seconds(working, logged_candidates(folder))
        loads = [load for row in working for load in row.get("load_average", [])]
        results["load_average"] = [min(loads), max(loads)] if loads else None
        results["peak_rss_gib"] = max(row.get("peak_rss_gib", 0.0) for row in working)
        folder.write_json("results.json", results)
        return results


def _wall_seconds(finished: list[dict], rows: list[dict]) -> tuple[float, int]:
    """Seconds the run's invocations took (the finished ones by their own clock, a killed
    one from its start to its last logged candidate), and how many candidates were scored
    by killed invocations that left no clock (before candidate lines named their
    invocation): their time is missing."""
    clocked = {row.get("started") for row in finished}
    killed: dict[float, float] = {}
    for row in rows:
        session = row.get("session")
        if session is not None and session not in clocked:
            killed[session] = max(killed.get(session, session), row["at"])
    wall = sum(row["seconds"] for row in finished) + sum(at - session for session, at in killed.items())
    unnamed = sum(row.get("session") is None for row in rows)
    timed_unnamed = sum(row.get("scored", 0) for row in finished if row.get("started") is None)
    return round(wall, 1), max(0, unnamed - timed_unnamed)


def _read_template(path: Path, config_path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise EvomergeError(f"{config_path}: ps.template {path}: {exc.strerror}") from None
