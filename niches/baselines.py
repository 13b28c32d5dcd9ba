"""The baselines searches are compared with, under the same budget of evaluations, each a
search of niches/search.py (ask/tell over per-example scores, state/from_state):

* `genetic_algorithm`: M2N2 without resource competition (alpha = 0) and without
  attraction, i.e. fitness-proportional parents, SLERP crossover with a split point and
  replace-the-worst (the reference's `--method ga`);
* `MapElites`: a grid of elites over two behaviour descriptors read from the scores (the
  reference: accuracy on the odd and on the even classes), quality = fitness;
* `SlerpSweep`: brute force over SLERP ratios between two models (the pre-trained case);
* `RandomSearch`: uniform genomes in the unit box, the baseline of a CMA-ES PS search
  (what a reader asks first: does the search beat chance at the same budget?);
* CMA-ES itself: niches/cmaes.py.

M2N2's baselines follow the reference (github.com/SakanaAI/natural_niches) and, like
niches/m2n2.py, know nothing of what a member is: the caller evaluates.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np

from niches.m2n2 import Crossover, NaturalNiches, slerp, slerp_split
from niches.search import Candidate, Scores, fitness

Descriptor = Callable[[Scores], tuple[float, float]]
"""A candidate's scores -> its two behaviour descriptors in [0, 1]."""


def genetic_algorithm(population_size: int = 20, **settings) -> NaturalNiches:
    """The GA baseline: the M2N2 loop with alpha = 0 and no attraction (other settings, such
    as `seeds`, `max_evals`, `mutation_std` or `seed`, as for `NaturalNiches`)."""
    return NaturalNiches(population_size, alpha=0.0, attraction=False, **settings)


class MapElites:
    """MAP-Elites on a `cells` x `cells` grid over two descriptors in [0, 1].

    `descriptor(scores)` places a candidate; `quality(scores)` (default: `fitness`) ranks
    it within its cell. The first `ask` gives the seeds (kind "seed", outside the budget
    `max_evals`); then a child is the crossover (SLERP with a split point) of two elites
    drawn in proportion to their quality, plus N(0, mutation_std^2) noise; it takes its
    cell if the cell is empty or it beats the elite there. A descriptor of exactly 1 goes
    in the last cell (the reference's floor(d * 10) would index past the grid).
    """

    def __init__(self, descriptor: Descriptor, cells: int = 10, *, seeds: Sequence[np.ndarray] = (),
                 max_evals: Optional[int] = None, quality: Callable[[Scores], float] = fitness,
                 mutation_std: float = 0.0, n_params: Optional[int] = None, crossover_fn: Optional[Crossover] = None,
                 seed: int = 0):
        self.descriptor = descriptor
        self.quality_of = quality
        self.cells = cells
        self.seeds = [np.asarray(s) for s in seeds]
        self.max_evals = max_evals
        self.mutation_std = float(mutation_std)
        self.n_params = n_params
        self.crossover_fn: Crossover = crossover_fn or slerp_split
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.elites: dict[tuple[int, int], np.ndarray] = {}
        self.quality = np.zeros((cells, cells))
        self.evaluations = 0
        self.children = 0
        self.last_inserted: list[bool] = []
        """Whether each candidate of the last `tell` became the elite of its cell."""

    def cell(self, descriptors: tuple[float, float]) -> tuple[int, int]:
        """The grid cell of two descriptors in [0, 1]."""
        i, j = (min(self.cells - 1, max(0, int(math.floor(d * self.cells)))) for d in descriptors)
        return i, j

    def ask(self) -> list[Candidate]:
        """The seeds while they are not told; then two elites by quality (with replacement
        while the qualities sum to less than 2, as the reference: for accuracies a sum of 2
        guarantees the two cells of positive quality that two distinct draws need), crossed
        over at a uniform split point, mutated."""
        if self.seeds:
            return [Candidate(seed, "seed") for seed in self.seeds]
        if not self.elites:
            raise RuntimeError("the grid is empty: give seeds, or tell at least one evaluated member first")
        cells = sorted(self.elites)
        quality = np.array([self.quality[c] for c in cells])
        p = quality / quality.sum() if quality.sum() > 0 else np.full(len(cells), 1.0 / len(cells))
        first, second = self.rng.choice(len(cells), size=2, p=p,
                                        replace=bool(quality.sum() < 2 or np.count_nonzero(quality) < 2))
        a, b = self.elites[cells[first]], self.elites[cells[second]]
        split = int(self.rng.integers(0, self.n_params or a.size))
        child = self.crossover_fn(a, b, float(self.rng.uniform()), split)
        if self.mutation_std > 0:
            noise = self.rng.standard_normal(child.shape, dtype=np.float32 if child.dtype == np.float32 else np.float64)
            child = (child + noise * self.mutation_std).astype(child.dtype)
        return [Candidate(child)]

    def tell(self, candidates: Sequence[Candidate], scores: Sequence[Optional[Scores]]) -> None:
        """Offer evaluated candidates, in order; `last_inserted` says which took a cell (a
        failed candidate, None, takes none)."""
        if len(candidates) != len(scores):
            raise ValueError(f"{len(candidates)} candidates but {len(scores)} scores")
        self.last_inserted = [self._offer(c, s) for c, s in zip(candidates, scores)]
        if any(c.kind == "seed" for c in candidates):
            self.seeds = []

    def _offer(self, candidate: Candidate, scores: Optional[Scores]) -> bool:
        self.evaluations += 1
        self.children += candidate.kind == "sample"
        if scores is None:
            return False
        cell, quality = self.cell(self.descriptor(scores)), float(self.quality_of(scores))
        if cell in self.elites and quality <= self.quality[cell]:
            return False
        self.elites[cell] = candidate.genome
        self.quality[cell] = quality
        return True

    def stop(self) -> bool:
        return self.max_evals is not None and not self.seeds and self.children >= self.max_evals

    def best(self) -> Candidate:
        """The elite of highest quality (first cell in row-major order on ties)."""
        return Candidate(self.elites[max(sorted(self.elites), key=lambda c: self.quality[c])])

    def summary(self) -> dict:
        return {"evaluations": self.evaluations, "children": self.children, "occupied": len(self.elites),
                "best_quality": float(self.quality.max()), "inserted": self.last_inserted}

    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        """(arrays, meta) for niches.m2n2.save_state; `from_state` continues the same run."""
        cells = sorted(self.elites)
        arrays = {"quality": self.quality}
        if cells:
            arrays["elites"] = np.stack([self.elites[c] for c in cells])
        if self.seeds:
            arrays["seeds"] = np.stack(self.seeds)
        meta = {"cells": self.cells, "max_evals": self.max_evals, "mutation_std": self.mutation_std,
                "n_params": self.n_params, "seed": self.seed, "occupied": [list(c) for c in cells],
                "evaluations": self.evaluations, "children": self.children, "rng": self.rng.bit_generator.state}
        return arrays, meta

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], meta: dict, *, descriptor: Descriptor,
                   quality: Callable[[Scores], float] = fitness,
                   crossover_fn: Optional[Crossover] = None) -> "MapElites":
        """The search `state` described; the descriptor, quality and crossover functions are
        code: pass them again."""
        search = cls(descriptor, meta["cells"], seeds=list(arrays.get("seeds", [])), max_evals=meta["max_evals"],
                     quality=quality, mutation_std=meta["mutation_std"], n_params=meta["n_params"],
                     crossover_fn=crossover_fn, seed=meta["seed"])
        search.rng.bit_generator.state = meta["rng"]
        search.quality = arrays["quality"].copy()
        search.elites = {tuple(c): e for c, e in zip(meta["occupied"], arrays.get("elites", []))}
        search.evaluations, search.children = meta["evaluations"], meta["children"]
        return search


class SlerpSweep:
    """Brute force for two parents: SLERP(a, b; t) at `steps` ratios evenly spaced in [0, 1],
    asked `batch_size` at a time (so that one evaluation call scores many). The answer is
    the first ratio of highest fitness (the reference keeps a new best only when strictly
    better)."""

    def __init__(self, a: np.ndarray, b: np.ndarray, steps: int = 10_000, batch_size: int = 200):
        self.a, self.b = np.asarray(a), np.asarray(b)
        self.ratios = np.linspace(0.0, 1.0, steps)
        self.batch_size = batch_size
        self.fitness: list[float] = []
        """The fitness of every ratio told so far, in order."""

    def ask(self) -> list[Candidate]:
        start = len(self.fitness)
        return [Candidate(slerp(self.a, self.b, float(t))) for t in self.ratios[start: start + self.batch_size]]

    def tell(self, candidates: Sequence[Candidate], scores: Sequence[Optional[Scores]]) -> None:
        if len(candidates) != len(scores):
            raise ValueError(f"{len(candidates)} candidates but {len(scores)} scores")
        self.fitness.extend(fitness(s) for s in scores)

    def stop(self) -> bool:
        return len(self.fitness) >= len(self.ratios)

    @property
    def best_ratio(self) -> float:
        return float(self.ratios[int(np.argmax(self.fitness))])

    def best(self) -> Candidate:
        return Candidate(slerp(self.a, self.b, self.best_ratio))

    def summary(self) -> dict:
        return {"evaluations": len(self.fitness), "best_ratio": self.best_ratio if self.fitness else None}

    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        return ({"a": self.a, "b": self.b, "fitness": np.array(self.fitness, dtype=np.float64)},
                {"steps": len(self.ratios), "batch_size": self.batch_size})

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], meta: dict) -> "SlerpSweep":
        search = cls(arrays["a"], arrays["b"], meta["steps"], meta["batch_size"])
        search.fitness = arrays["fitness"].tolist()
        return search


def slerp_sweep(a: np.ndarray, b: np.ndarray, evaluate: Callable[[np.ndarray], np.ndarray],
                steps: int = 10_000, batch_size: int = 200) -> tuple[float, np.ndarray]:
    """Run a `SlerpSweep` where `evaluate` maps a (K, ...) stack of candidates to (K,)
    fitness values (a classifier's accuracies, say). Returns the best ratio and the
    fitness of every ratio."""
    sweep = SlerpSweep(a, b, steps, batch_size)
    while not sweep.stop():
        candidates = sweep.ask()
        values = np.asarray(evaluate(np.stack([c.genome for c in candidates])), dtype=np.float64)
        sweep.tell(candidates, [{"fitness": np.array([v])} for v in values])
    return sweep.best_ratio, np.array(sweep.fitness)


class RandomSearch:
    """Genomes drawn uniformly in the unit box [0, 1]^dimension, `popsize` per `ask`, until
    `max_evals` are told; the answer is the first genome of highest fitness. Seeded: the
    same seed asks the same genomes, so a run resumes by replaying its log like CMA-ES.
    `start`: a genome asked with the first batch (kind "start", outside the budget), as
    CMA-ES's `evaluate_start` asks its x0, so the baseline starts from the same point."""

    def __init__(self, dimension: int, *, max_evals: int, popsize: int = 10, seed: int = 0,
                 start: Optional[Sequence[float]] = None):
        if dimension < 1 or max_evals < 0 or popsize < 1:
            raise ValueError("random search needs dimension >= 1, max_evals >= 0 and popsize >= 1")
        self.dimension, self.max_evals, self.popsize, self.seed = dimension, max_evals, popsize, seed
        self.start = None if start is None else np.clip(np.array(start, dtype=float), 0.0, 1.0)  # as CMA-ES's x0
        self.rng = np.random.default_rng(seed)
        self.evaluations = 0
        self.start_told = False
        self.best_genome: Optional[np.ndarray] = None
        self.best_fitness = -math.inf

    def ask(self) -> list[Candidate]:
        count = min(self.popsize, self.max_evals - self.evaluations)
        start = [Candidate(self.start, "start")] if self.start is not None and not self.start_told else []
        return start + [Candidate(genome) for genome in self.rng.uniform(0.0, 1.0, (count, self.dimension))]

    def tell(self, candidates: Sequence[Candidate], scores: Sequence[Optional[Scores]]) -> None:
        if len(candidates) != len(scores):
            raise ValueError(f"{len(candidates)} candidates but {len(scores)} scores")
        for candidate, score in zip(candidates, scores):
            value = fitness(score)
            if value > self.best_fitness:
                self.best_fitness, self.best_genome = value, np.array(candidate.genome, dtype=float)
        self.start_told = self.start_told or any(c.kind == "start" for c in candidates)
        self.evaluations += sum(c.kind == "sample" for c in candidates)

    def stop(self) -> bool:
        return self.evaluations >= self.max_evals

    def best(self) -> Candidate:
        if self.best_genome is None:
            raise RuntimeError("nothing evaluated yet")
        return Candidate(self.best_genome)

    def summary(self) -> dict:
        return {"evaluations": self.evaluations,
                "best_fitness": self.best_fitness if self.best_genome is not None else None,
                "best_genome": None if self.best_genome is None else self.best_genome.tolist()}

    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        arrays = {} if self.best_genome is None else {"best_genome": self.best_genome}
        if self.start is not None:
            arrays["start"] = self.start
        return arrays, {"dimension": self.dimension, "max_evals": self.max_evals, "popsize": self.popsize,
                        "seed": self.seed, "evaluations": self.evaluations, "start_told": self.start_told,
                        "best_fitness": self.best_fitness if self.best_genome is not None else None,
                        "rng": self.rng.bit_generator.state}

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], meta: dict) -> "RandomSearch":
        search = cls(meta["dimension"], max_evals=meta["max_evals"], popsize=meta["popsize"], seed=meta["seed"],
                     start=arrays.get("start"))
        search.rng.bit_generator.state = meta["rng"]
        search.evaluations, search.start_told = meta["evaluations"], meta.get("start_told", False)
        if "best_genome" in arrays:
            search.best_genome, search.best_fitness = arrays["best_genome"], meta["best_fitness"]
        return search
