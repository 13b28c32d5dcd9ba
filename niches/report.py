"""What a run tells a reader: the report-split scores of the evolved merge beside every
source's (and the paper's, when the config gives them), the table of them, the lineage,
and the best candidate exported as a checkpoint with a model card. Models appear under
the names the config gave them (`zoo:lang`), never as a machine's cache paths.
"""
from __future__ import annotations

import json
from pathlib import Path

from evaluation.tasks import Task
from merging.checkpoint import write_atomic
from merging.recipe import Recipe
from niches.config import PS_MODEL, References, RunConfig
from niches.loop import Outcome
from niches.runfolder import RunFolder
from niches.stages import Stage, make_harness


def score_report(recipe: Recipe, others: dict[str, str], config: RunConfig, folder: RunFolder, tasks: list[Task],
                 progress: bool) -> dict[str, dict[str, dict]]:
    """Report-split scores of the evolved merge (row `evolved`) and of every other row
    (row key -> model folder or Hub id)."""
    from merging.engine import open_models

    report: dict[str, dict[str, dict]] = {}
    checkpoints = open_models(recipe)
    first = recipe.base_model or recipe.referenced_models()[0]
    harness = make_harness(checkpoints[first].path, config, folder.scores_file)
    try:
        results = harness.score_recipe(recipe, checkpoints, tasks, limit=config.report.limit, seed=config.seed)
    finally:
        for checkpoint in checkpoints.values():
            checkpoint.close()
    report["evolved"] = {name: r.summary() for name, r in results.items()}
    for key, model in others.items():
        if progress:
            print(f"scoring {key} on {', '.join(t.name for t in tasks)}", flush=True)
        harness = make_harness(Path(model), config, folder.scores_file)
        report[key] = {name: r.summary() for name, r in harness.score_resident(tasks, limit=config.report.limit).items()}
    return report


def report_table(results: dict, *, markdown: bool = False) -> str:
    """The report of a run (results.json's content) as a table: a row per model, mean ±
    standard error per task, and a `paper` column beside each task the config gives
    published scores for (paper_scores), so ours and the paper's read side by side."""
    report = results["report"]
    paper = report.get("paper", {})
    tasks = list(next(iter(report["scores"].values())))
    published = {task for scores in paper.values() for task in scores}
    header = ["model"] + [column for t in tasks for column in ([t, f"{t} (paper)"] if t in published else [t])]
    rows = []
    for key, scores in report["scores"].items():
        cells = []
        for t in tasks:
            cells.append(f"{scores[t]['mean']:.3f} ± {scores[t]['stderr']:.3f}")
            if t in published:
                cells.append(f"{paper[key][t]:.3f}" if t in paper.get(key, {}) else "")
        rows.append([_row_label(key, markdown), *cells])
    if markdown:
        return "\n".join(["| " + " | ".join(header) + " |", "|---|" + "---|" * (len(header) - 1)]
                         + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in [header, *rows])


def _row_label(key: str, markdown: bool) -> str:
    if key == "evolved":
        return "**this merge**" if markdown else "evolved merge"
    if key == PS_MODEL:
        return "PS merge (`ps/best`)" if markdown else "PS merge (ps/best)"
    return f"`{key}`" if markdown else (key if key.startswith("zoo:") else Path(key).name)


def lineage(stage: Stage, outcome: Outcome, config: RunConfig, references: References) -> str:
    """One line of the card's lineage: what the stage searched, how, at what budget."""
    def names(models) -> str:
        return ", ".join(f"`{references.written(m)}`" for m in models)

    if stage.name == "m2n2":
        settings = config.m2n2
        return (f"M2N2: an archive of {settings.population_size} members, each a per-tensor linear combination of "
                f"{names(stage.genome.gram.sources)}, evolved by SLERP crossovers (split points at "
                f"{settings.split_at} boundaries{'' if settings.split_point else ', off'}; attraction "
                f"{'on' if settings.attraction else 'off'}; alpha {settings.alpha}) over {outcome.evaluations} "
                "child evaluations")
    genome = stage.genome
    found = {"start": "; the best is the starting point, which no sample beat",
             "mean": "; the best is the final distribution mean"}.get(outcome.best_kind, "")
    if stage.name == "dfs":
        return (f"DFS: a path of {len(genome.path(outcome.best_genome))} layers through {names(genome.space.sources)} "
                f"({genome.space.repeats} repeats, scales {genome.scales}), {genome.dimension} genes evolved by "
                f"{stage.method} ({outcome.evaluations} evaluations{found})")
    recipe = genome.decode(outcome.best_genome)
    return (f"PS: `{recipe.merge_method}` merge of {names(recipe.referenced_models())}, {genome.dimension} genes "
            f"evolved by {stage.method} ({outcome.evaluations} evaluations{found})")


def card_notes(lines: list[str], results: dict | None, config: RunConfig) -> str:
    notes = ["## Evolution", "", "Made by `evomerge evolve` (method `" + config.method + "`, seed "
             f"{config.seed}); fitness: mean of {', '.join(config.fitness.names)} ({config.fitness.split} split"
             f"{f', first {config.fitness.limit} examples' if config.fitness.limit else ''}).", ""]
    notes += [f"{i + 1}. {step}" for i, step in enumerate(lines)]
    if results:
        notes += ["", f"## Scores ({config.report.split} split, mean ± standard error)", "",
                  report_table(results, markdown=True)]
    return "\n".join(notes) + "\n"


def export(recipe: Recipe, out_dir: Path, config: RunConfig, references: References, *, notes: str) -> None:
    """Write a stage's best candidate as a checkpoint (atomically, replacing an older one),
    its card naming models as the config did. When the checkpoint there already holds this
    recipe (a resumed or extended run whose best did not change), only its card is brought
    up to date: rewriting the weights would change the checkpoint's identity, and a DFS
    stage over it would refuse its own log."""
    from merging.engine import merge_to_disk, open_models, plan_merge, resolve_device

    if config.dtype:  # candidates were scored in the run's dtype: the export is that model
        recipe = recipe.model_copy(update={"out_dtype": config.dtype})
    card = out_dir / "README.md"
    text = card.read_text() if card.is_file() else ""
    head, marker, _ = text.partition("\n## Evolution\n")  # the notes end the card (merging/card.py)
    if marker and references.in_text(recipe.to_yaml()).strip() in head:
        if text != f"{head}\n{notes.strip()}\n":
            write_atomic(card, f"{head}\n{notes.strip()}\n")
        return
    plan = plan_merge(recipe, open_models(recipe))
    try:
        # on the device candidates were merged on: a random method's masks come from that
        # device's generator, so another device would export another model
        merge_to_disk(plan, out_dir, device=resolve_device(config.device), seed=config.seed, overwrite=True,
                      card_notes=notes)
    finally:
        plan.close()
    for written in (card, out_dir / "recipe.yaml"):
        if written.is_file():
            text = references.in_text(written.read_text())
            if written == card and text != written.read_text() and "--zoo" not in text:
                # the recipe names `zoo:` models now, and they resolve only with --zoo
                text = text.replace("evomerge merge recipe.yaml OUT_DIR", "evomerge merge recipe.yaml OUT_DIR --zoo ZOO")
            write_atomic(written, text)


def results_of(config: RunConfig, outcomes: list[tuple[Stage, Outcome]], report: dict, references: References) -> dict:
    """results.json's content (wall time added at the end of the run)."""
    stages = {}
    for stage, outcome in outcomes:
        recipe = stage.genome.decode(outcome.best_genome).model_dump(mode="json", exclude_none=True)
        stages[outcome.name] = {"best_fitness": outcome.best_fitness, "best_kind": outcome.best_kind,
                                "evaluations": outcome.evaluations,
                                "best_genome": outcome.best_genome.tolist(),
                                "best_recipe": json.loads(references.in_text(json.dumps(recipe)))}
    paper: dict[str, dict[str, float]] = {}
    for task, scores in config.paper_scores.items():
        for row, score in scores.items():
            paper.setdefault(row, {})[task] = score
    return {"method": config.method, "stages": stages,
            "executor": {outcome.name: outcome.executor for _, outcome in outcomes},
            "report": {"split": config.report.split, "limit": config.report.limit, "scores": report, "paper": paper}}
