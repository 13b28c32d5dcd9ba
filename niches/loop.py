"""The one loop that drives any search of niches/search.py in a run folder:

    ask -> score the whole population in one call, logging a line per candidate as it
    finishes -> tell (in ask order) -> log the search's summary -> ... -> the best candidate

It is the only code that reads or writes the candidate log (candidates.jsonl). Scoring is
one call, `scorer.score(candidates)`, which yields candidates as they finish (an
executor scores them on many devices, evaluation/executors/), so a line's place in the
log is its finish order; its `index` is its place in the ask order.

Failures. A candidate that raised while built or scored (out of memory, NaN logits, a
build error) is logged with its `error` and `fitness` null, and told to the search as
failed (ranked below every scored candidate); the run goes on. More than
`max_failures` failures in a row stop it with the last error: a broken config fails every
candidate, and the run should not spend its budget logging that.

Resume. A killed run is rerun with the same command and replays: searches are
deterministic under their seed, so the search asks again for the candidates it asked for
before; each one that has a line in the log is checked against it (same genome, same
round) and its per-example scores come from the harness's score cache (no forward pass).
The first candidate without a line is scored for real. A logged failure is told as failed
again without scoring it (it may have been a transient out-of-memory; the log is what the
search saw). A logged `mean` (CMA-ES's distribution mean, asked once at the end) is
matched by genome, since a run extended with --max-evals ends at another mean. A `start`
(the search's starting genome, asked with its first generation) is replayed like a
sample; a stage logged before searches asked for it is rerun without one (niches/run.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Iterator, Optional, Protocol, Sequence

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
    error: Optional[str] = None
    """Why the candidate has no scores (None: it was scored)."""


class Scorer(Protocol):
    def score(self, candidates: Sequence[Candidate]) -> Iterator[tuple[int, Scored]]:
        """Build and score every candidate, yielding (position in `candidates`, its
        evaluation) as each finishes."""
        ...

    def busy(self) -> str:
        """Workers busy now, for the progress bar ("" when there is nothing to say)."""
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
    """Samples evaluated (the budget's count: seeds, the start and the mean are outside it)."""
    history: list[dict] = field(default_factory=list)
    executor: dict = field(default_factory=dict)
    """What scored the candidates and how busy its workers were (evaluation/executors/)."""
    best_kind: str = "sample"
    """The best candidate's kind: `start` when no sample beat where the search began."""


def run_search(stage: str, search: Search, scorer: Scorer, folder: RunFolder, *, progress: bool,
               total: int, max_failures: int = 5) -> Outcome:
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
    failures = _Failures(max_failures, stage)
    best, failed = None, 0
    round_ = 0
    try:
        while not search.stop():
            candidates = search.ask()
            numbered = [_numbered(c, round_, logged, counts, stage, folder) for c in candidates]
            rows: list[Optional[dict]] = [row if row and row.get("error") else None for _, row in numbered]
            todo = [i for i, row in enumerate(rows) if row is None]  # logged failures are not scored again
            told: list[Optional[dict[str, np.ndarray]]] = [None] * len(candidates)
            fresh = False
            for position, evaluation in scorer.score([candidates[i] for i in todo]):
                i = todo[position]
                (index, row), candidate = numbered[i], candidates[i]
                evaluation = _checked(evaluation, stage)
                if row is None:
                    row = _row(stage, candidate, index, round_, evaluation, task_keys, folder.session)
                    folder.append(folder.candidates_file, row)
                    bar.update(int(candidate.kind == "sample"))
                    fresh = True
                    failures.count(row)
                else:
                    _check_replayed(row, evaluation, folder)
                rows[i], told[i] = row, None if evaluation.error else evaluation.scores
                if row.get("error"):
                    failed += 1
                else:
                    best = row["fitness"] if best is None else max(best, row["fitness"])
                bar.set_postfix(_postfix(best, failed, scorer), refresh=False)
            history.extend(rows)
            search.tell(candidates, told)
            if fresh or round_ not in summarised:  # (an extended run's rounds after its old end are new)
                folder.append(folder.optimizer_file, {"stage": stage, "round": round_, **search.summary()})
            round_ += 1
    finally:
        bar.close()
    if not history:
        raise EvomergeError(f"the {stage} stage's search asked for nothing: no candidate to export")
    if all(row.get("error") for row in history):
        raise EvomergeError(f"every candidate of the {stage} stage failed (the last: {history[-1]['error']}); "
                            "nothing to export")
    best = search.best().genome
    row = next(r for r in reversed(history)
               if not r.get("error") and np.array_equal(np.asarray(r["genome"]), np.asarray(best).ravel()))
    return Outcome(stage, np.asarray(row["genome"]), row["fitness"], sum(r["kind"] == "sample" for r in history),
                   history, best_kind=row["kind"])


class _Failures:
    """Counts failed candidates in a row (as they finish) and stops the run past the limit."""

    def __init__(self, limit: int, stage: str):
        self.limit, self.stage, self.in_a_row = limit, stage, 0

    def count(self, row: dict) -> None:
        self.in_a_row = self.in_a_row + 1 if row.get("error") else 0
        if self.in_a_row > self.limit:
            raise EvomergeError(
                f"{self.in_a_row} candidates of the {self.stage} stage failed in a row (max_failures: {self.limit}); "
                f"the last: {row['error']}. Fix the cause (a lower batch_size for out of memory, the template for a "
                "build error), or raise max_failures; rerunning the same command goes on past the logged failures")


def _postfix(best: Optional[float], failed: int, scorer: Scorer) -> dict[str, str]:
    """The bar's tail: best fitness so far, workers busy, failed candidates."""
    postfix = {"best": "-" if best is None else f"{best:.4f}"}
    if busy := scorer.busy():
        postfix["busy"] = busy
    if failed:
        postfix["failed"] = str(failed)
    return postfix


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


def _checked(scored: Scored, stage: str) -> Scored:
    """A task without examples is the config's fault: refused before anything is logged, so
    the corrected config may restart the folder. A score that is not finite (a NaN loss)
    is the candidate's: it becomes its failure."""
    for task, values in scored.scores.items():
        if len(values) == 0:
            raise EvomergeError(f"the {stage} stage's fitness task {task!r} gave no examples: check its data, "
                                "split and limit")
        if scored.error is None and not np.isfinite(values).all():
            return replace(scored, scores={}, error=f"task {task!r} gave a score that is not finite")
    return scored


def _check_replayed(row: dict, scored: Scored, folder: RunFolder) -> None:
    """A replayed candidate must be the one that was scored, with the scores that were
    logged: a changed task file or setting changes the task key, the cache misses, and
    the search would be told other scores than the log holds."""
    if scored.error:
        raise EvomergeError(f"{folder.candidates_file}: {row['kind']} {row['index']} of stage {row['stage']} was "
                            f"logged with fitness {row['fitness']} and now fails: {scored.error}")
    if scored.key != row["candidate"] or fitness(scored.scores) != row["fitness"]:
        raise EvomergeError(
            f"{folder.candidates_file}: {row['kind']} {row['index']} of stage {row['stage']} was logged with "
            f"fitness {row['fitness']} (candidate {row['candidate']}) and now scores {fitness(scored.scores)} "
            f"(candidate {scored.key}): the fitness tasks' data or settings, or a source model, changed since. "
            "Use a new --run-dir")


def _row(stage: str, candidate: Candidate, index: int, round_: int, scored: Scored, task_keys: dict[str, str],
         session: Optional[float]) -> dict:
    row = {"stage": stage, "kind": candidate.kind, "index": index, "round": round_,
           "genome": np.asarray(candidate.genome, dtype=np.float64).ravel().tolist(), "candidate": scored.key,
           "twin": scored.twin, "tasks": task_keys,
           "scores": {task: float(np.mean(s)) for task, s in scored.scores.items()},
           "fitness": None if scored.error else fitness(scored.scores), "seconds": round(scored.seconds, 3),
           "session": session, "at": round(time.time(), 1)}
    if scored.error:
        row["error"] = scored.error
    return row
