"""The one loop that drives any search of niches/search.py in a run folder:

    ask -> score the whole population in one call -> log a line per candidate -> tell (in
    ask order) -> log the search's summary -> ... -> the best candidate

It is the only code that reads or writes the candidate log (candidates.jsonl). Scoring is
one call, `scorer.score(candidates)`, so that an executor scoring on many devices can
take its place.

Resume. A killed run is rerun with the same command and replays: searches are
deterministic under their seed, so the search asks again for the candidates it asked for
before; each one that has a line in the log is checked against it (same genome, same
round) and its per-example scores come from the harness's score cache (no forward pass).
The first candidate without a line is scored for real. A logged `mean` (CMA-ES's
distribution mean, asked once at the end) is matched by genome, since a run extended with
--max-evals ends at another mean.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol, Sequence

import numpy as np

from merging.errors import EvomergeError
from niches.runfolder import RunFolder
from niches.search import Candidate, Search, fitness


@dataclass
class Scored:
    """A candidate's evaluation: per-example scores per task, and where they came from."""

    scores: dict[str, np.ndarray]
    key: str
    """The candidate's identity in the score cache."""
    twin: Optional[str] = None
    """The key of a functionally identical candidate whose scores were reused (None: scored)."""
    seconds: float = 0.0


class Scorer(Protocol):
    def score(self, candidates: Sequence[Candidate]) -> list[Scored]:
        """Build and score every candidate (in order)."""
        ...

    def task_keys(self) -> dict[str, str]:
        """Each fitness task's identity: its data, settings and what scores it (the score
        cache's task key). A logged candidate replays only under the same keys."""
        ...


@dataclass
class Outcome:
    """What a stage's search found: its answer and every candidate's log line."""

    name: str
    best_genome: np.ndarray
    best_fitness: float
    evaluations: int
    """Samples evaluated (the budget's count: seeds and the mean are outside it)."""
    history: list[dict] = field(default_factory=list)
    executor: dict = field(default_factory=dict)
    """What scored the candidates and how busy its workers were (evaluation/executors.py)."""


def run_search(stage: str, search: Search, scorer: Scorer, folder: RunFolder, *, progress: bool,
               total: int) -> Outcome:
    """Drive `search` to its end, logging every candidate of stage `stage`; its best."""
    from tqdm.auto import tqdm

    logged = {(row["kind"], row["index"]): row for row in logged_candidates(folder, stage)}
    if any("round" not in row for row in logged.values()):
        raise EvomergeError(f"{folder.candidates_file} was written by an older evomerge (its lines have no `round`) "
                            "and cannot be replayed; use a new --run-dir")
    task_keys = scorer.task_keys()
    if any(row.get("tasks") != task_keys for row in logged.values()):
        raise EvomergeError(
            f"{folder.candidates_file}: the {stage} stage's candidates were scored on fitness tasks whose data or "
            "settings have changed since (their task keys differ), so their fitness cannot be replayed. Use a new "
            "--run-dir, or restore the task data")
    summarised = {row.get("round") for row in folder.rows(folder.optimizer_file) if row["stage"] == stage}
    # replayed samples cost no time: the bar starts past them, so its rate and time left are the real ones
    replayed = sum(kind == "sample" for kind, _ in logged)
    bar = tqdm(total=total, initial=min(replayed, total), desc=f"{stage} evaluations", disable=not progress,
               unit="cand", dynamic_ncols=True)
    history: list[dict] = []
    counts: dict[str, int] = {}
    round_ = 0
    try:
        while not search.stop():
            candidates = search.ask()
            numbered = [_numbered(c, round_, logged, counts, stage, folder) for c in candidates]
            scored = scorer.score(candidates)
            for evaluation in scored:
                _check_finite(evaluation, stage)
            fresh = any(row is None for _, row in numbered)
            for candidate, (index, row), evaluation in zip(candidates, numbered, scored):
                if row is None:
                    row = _row(stage, candidate, index, round_, evaluation, task_keys)
                    folder.append(folder.candidates_file, row)
                    bar.update(int(candidate.kind == "sample"))
                else:
                    _check_replayed(row, evaluation, folder)
                history.append(row)
            search.tell(candidates, [s.scores for s in scored])
            if fresh or round_ not in summarised:  # (an extended run's rounds after its old end are new)
                folder.append(folder.optimizer_file, {"stage": stage, "round": round_, **search.summary()})
            bar.set_postfix(best=f"{max(r['fitness'] for r in history):.4f}", refresh=False)
            round_ += 1
    finally:
        bar.close()
    if not history:
        raise EvomergeError(f"the {stage} stage's search asked for nothing: no candidate to export")
    best = search.best().genome
    row = next(r for r in reversed(history) if np.array_equal(np.asarray(r["genome"]), np.asarray(best).ravel()))
    return Outcome(stage, np.asarray(row["genome"]), row["fitness"], sum(r["kind"] == "sample" for r in history),
                   history)


def logged_candidates(folder: RunFolder, stage: str | None = None) -> list[dict]:
    """The candidate log's lines (of one stage, or all)."""
    return [row for row in folder.rows(folder.candidates_file) if stage in (None, row["stage"])]


def _numbered(candidate: Candidate, round_: int, logged: dict, counts: dict[str, int], stage: str,
              folder: RunFolder) -> tuple[int, Optional[dict]]:
    """The candidate's index among its kind, and its line in the log (checked), or None
    when it has none yet."""
    genome = np.asarray(candidate.genome).ravel()
    if candidate.kind == "mean":
        means = [row for (kind, _), row in logged.items() if kind == "mean"]
        row = next((r for r in means if np.array_equal(np.asarray(r["genome"]), genome)), None)
        return (row["index"] if row else len(means)), row
    index = counts.get(candidate.kind, 0)
    counts[candidate.kind] = index + 1
    row = logged.get((candidate.kind, index))
    if row is not None and (row["round"] != round_ or not np.array_equal(np.asarray(row["genome"]), genome)):
        raise EvomergeError(
            f"{folder.candidates_file}: {candidate.kind} {index} of stage {stage} does not replay (the logged "
            "genome differs from the one the search asks for now); the run was made with other settings or "
            "another version. Use a new --run-dir")
    return index, row


def _check_finite(scored: Scored, stage: str) -> None:
    """Refuse scores no search can rank (a task without examples gives a NaN mean) before
    anything is logged, so the corrected config may restart the folder."""
    for task, values in scored.scores.items():
        if len(values) == 0 or not np.isfinite(values).all():
            raise EvomergeError(f"the {stage} stage's fitness task {task!r} gave "
                                f"{'no examples' if len(values) == 0 else 'a score that is not finite'}: "
                                "check its data, split and limit")


def _check_replayed(row: dict, scored: Scored, folder: RunFolder) -> None:
    """A replayed candidate must be the one that was scored, with the scores that were
    logged: a changed task file or setting changes the task key, the cache misses, and
    the search would be told other scores than the log holds."""
    if scored.key != row["candidate"] or fitness(scored.scores) != row["fitness"]:
        raise EvomergeError(
            f"{folder.candidates_file}: {row['kind']} {row['index']} of stage {row['stage']} was logged with "
            f"fitness {row['fitness']} (candidate {row['candidate']}) and now scores {fitness(scored.scores)} "
            f"(candidate {scored.key}): the fitness tasks' data or settings, or a source model, changed since. "
            "Use a new --run-dir")


def _row(stage: str, candidate: Candidate, index: int, round_: int, scored: Scored, task_keys: dict[str, str]) -> dict:
    return {"stage": stage, "kind": candidate.kind, "index": index, "round": round_,
            "genome": np.asarray(candidate.genome, dtype=np.float64).ravel().tolist(), "candidate": scored.key,
            "twin": scored.twin, "tasks": task_keys,
            "scores": {task: float(np.mean(s)) for task, s in scored.scores.items()},
            "fitness": fitness(scored.scores), "seconds": round(scored.seconds, 3)}
