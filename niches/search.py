"""The search protocol: what every search (CMA-ES, M2N2, GA, MAP-Elites, random search,
the SLERP sweep) speaks, so that one loop (niches/loop.py) drives any of them and one
executor scores any of their candidates.

    search = SomeSearch(..., seed=0)
    while not search.stop():
        candidates = search.ask()                        # a whole population (>= 1)
        scores = [evaluate(c.genome) for c in candidates]  # {task: per-example scores}
        search.tell(candidates, scores)                  # in ask order
    search.best()

A search knows nothing of models or tensors (pycma / evosax style): a candidate is a
numpy array (a genome in the unit box, or an M2N2 member) that the caller turns into a
recipe. What it is told is per-example scores per task, not one number: M2N2 shares
examples as resources, MAP-Elites reads its descriptors from them, and CMA-ES reduces
them to `fitness` (the mean over tasks of each task's mean), the number a run logs.

Resume: `state()` gives (arrays, meta), numpy arrays and a JSON-ready dict, which
`from_state` turns back into a search that continues exactly as this one would (no
pickle: niches.m2n2.save_state writes them as one safetensors file). Runs of
`evomerge evolve` resume by replaying their log instead (niches/loop.py), which
also checks that every replayed candidate is the one that was scored.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Protocol, Sequence, runtime_checkable

import numpy as np

Scores = Mapping[str, np.ndarray]
"""One candidate's per-example scores, task name -> 1-D array (higher is better). A
candidate that could not be scored (it raised: out of memory, NaN logits, a build error)
is told as None: every search ranks it below every scored candidate."""


@dataclass
class Candidate:
    """What `ask` hands out. `kind` says why it is evaluated: a `sample` of the search
    (counted in its budget), a `seed` (a given starting model, e.g. M2N2's sources,
    evaluated outside the budget), or the `mean` of a CMA-ES distribution (its answer
    under noisy fitness, evaluated once at the end, outside the budget)."""

    genome: np.ndarray
    kind: str = "sample"


def fitness(scores: Optional[Scores]) -> float:
    """The one number a run logs and CMA-ES ranks by: the mean over tasks of each task's
    mean per-example score (so a task with more examples does not weigh more); -inf for a
    failed candidate (None)."""
    if scores is None:
        return -math.inf
    if not scores:
        raise ValueError("no task scores")
    return float(np.mean([np.mean(np.asarray(s, dtype=np.float64)) for s in scores.values()]))


def concatenated(scores: Scores) -> np.ndarray:
    """All tasks' per-example scores end to end, in task order: M2N2's resources."""
    return np.concatenate([np.asarray(s, dtype=np.float64).ravel() for s in scores.values()])


@runtime_checkable
class Search(Protocol):
    """Ask/tell over candidates. `tell` takes exactly the candidates `ask` returned (the
    same objects, in the same order) with their scores."""

    def ask(self) -> list[Candidate]: ...

    def tell(self, candidates: Sequence[Candidate], scores: Sequence[Optional[Scores]]) -> None: ...

    def stop(self) -> bool: ...

    def best(self) -> Candidate:
        """The search's answer: what it would export now."""
        ...

    def summary(self) -> dict:
        """JSON-ready: where the search stands (budget spent, best so far, the search's own
        figures), logged after every ask/tell round in the run's optimizer.jsonl."""
        ...

    def state(self) -> tuple[dict[str, np.ndarray], dict]: ...

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], meta: dict, **code) -> "Search":
        """The search `state` described; `code` passes again what state cannot hold (a
        crossover function, a descriptor function)."""
        ...
