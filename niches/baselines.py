"""The baselines M2N2 is compared with in its paper, under the same budget of evaluations.

* a genetic algorithm: M2N2 without resource competition (alpha = 0) and without
  attraction, i.e. fitness-proportional parents, SLERP crossover with a split point and
  replace-the-worst (the reference's `--method ga`);
* MAP-Elites: a grid of elites over two behaviour descriptors (the reference: accuracy on
  the odd and on the even classes), quality = accuracy;
* a brute-force SLERP sweep between two models (the pre-trained case);
* CMA-ES: niches/cmaes.py.

All follow the reference (github.com/SakanaAI/natural_niches) and are generic like
niches/m2n2.py: the caller evaluates.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np

from niches.m2n2 import Crossover, NaturalNiches, vector_angle, slerp_scales, slerp_split


def genetic_algorithm(population_size: int = 20, **settings) -> NaturalNiches:
    """The GA baseline: the M2N2 loop with alpha = 0 and no attraction (other settings, such
    as `mutation_std` or `seed`, as for `NaturalNiches`)."""
    return NaturalNiches(population_size, alpha=0.0, attraction=False, **settings)


class MapElites:
    """MAP-Elites on a `cells` x `cells` grid over two descriptors in [0, 1], ask/tell.

    A child is the crossover (SLERP with a split point) of two elites drawn in proportion
    to their quality, plus N(0, mutation_std^2) noise; it takes its cell if the cell is
    empty or it beats the elite there. A descriptor of exactly 1 goes in the last cell
    (the reference's floor(d * 10) would index past the grid).
    """

    def __init__(self, cells: int = 10, *, mutation_std: float = 0.0, n_params: Optional[int] = None,
                 crossover_fn: Optional[Crossover] = None, seed: int = 0):
        self.cells = cells
        self.mutation_std = float(mutation_std)
        self.n_params = n_params
        self.crossover_fn: Crossover = crossover_fn or slerp_split
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.elites: dict[tuple[int, int], np.ndarray] = {}
        self.quality = np.zeros((cells, cells))
        self.evaluations = 0

    def cell(self, descriptors: tuple[float, float]) -> tuple[int, int]:
        """The grid cell of two descriptors in [0, 1]."""
        i, j = (min(self.cells - 1, max(0, int(math.floor(d * self.cells)))) for d in descriptors)
        return i, j

    def ask(self) -> np.ndarray:
        """Two elites by quality (with replacement while the qualities sum to less than 2, as
        the reference: for accuracies a sum of 2 guarantees the two cells of positive quality
        that two distinct draws need), crossed over at a uniform split point, mutated."""
        if not self.elites:
            raise RuntimeError("the grid is empty: tell at least one evaluated member first")
        cells = sorted(self.elites)
        quality = np.array([self.quality[c] for c in cells])
        p = quality / quality.sum() if quality.sum() > 0 else np.full(len(cells), 1.0 / len(cells))
        first, second = self.rng.choice(len(cells), size=2, p=p, replace=bool(quality.sum() < 2 or np.count_nonzero(quality) < 2))
        a, b = self.elites[cells[first]], self.elites[cells[second]]
        split = int(self.rng.integers(0, self.n_params or a.size))
        child = self.crossover_fn(a, b, float(self.rng.uniform()), split)
        if self.mutation_std > 0:
            noise = self.rng.standard_normal(child.shape, dtype=np.float32 if child.dtype == np.float32 else np.float64)
            child = (child + noise * self.mutation_std).astype(child.dtype)
        return child

    def tell(self, member: np.ndarray, descriptors: tuple[float, float], quality: float) -> bool:
        """Offer an evaluated member; True if it became the elite of its cell."""
        self.evaluations += 1
        cell = self.cell(descriptors)
        if cell in self.elites and quality <= self.quality[cell]:
            return False
        self.elites[cell] = member
        self.quality[cell] = quality
        return True

    def best(self) -> np.ndarray:
        """The elite of highest quality (first cell in row-major order on ties)."""
        return self.elites[max(sorted(self.elites), key=lambda c: self.quality[c])]

    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        """(arrays, meta) for niches.m2n2.save_state; `from_state` continues the same run."""
        cells = sorted(self.elites)
        arrays = {"quality": self.quality}
        if cells:
            arrays["elites"] = np.stack([self.elites[c] for c in cells])
        meta = {"cells": self.cells, "mutation_std": self.mutation_std, "n_params": self.n_params, "seed": self.seed,
                "occupied": [list(c) for c in cells], "evaluations": self.evaluations,
                "rng": self.rng.bit_generator.state}
        return arrays, meta

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], meta: dict,
                   crossover_fn: Optional[Crossover] = None) -> "MapElites":
        search = cls(meta["cells"], mutation_std=meta["mutation_std"], n_params=meta["n_params"],
                     crossover_fn=crossover_fn, seed=meta["seed"])
        search.rng.bit_generator.state = meta["rng"]
        search.quality = arrays["quality"].copy()
        search.elites = {tuple(c): e for c, e in zip(meta["occupied"], arrays.get("elites", []))}
        search.evaluations = meta["evaluations"]
        return search


def slerp_sweep(a: np.ndarray, b: np.ndarray, evaluate: Callable[[np.ndarray], np.ndarray],
                steps: int = 10_000, batch_size: int = 200) -> tuple[float, np.ndarray]:
    """Brute force for two parents: SLERP(a, b; t) at `steps` ratios evenly spaced in [0, 1],
    each scored by `evaluate` (a (K, n) stack of candidates -> (K,) fitness), in batches so
    that one call scores many. Returns the first ratio of highest fitness (the reference
    keeps a new best only when strictly better) and the fitness of every ratio."""
    ratios = np.linspace(0.0, 1.0, steps)
    omega = vector_angle(a, b)
    a64, b64 = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    fitness = []
    for start in range(0, steps, batch_size):
        scales = np.array([slerp_scales(omega, t) for t in ratios[start: start + batch_size]])
        batch = (scales[:, :1] * a64 + scales[:, 1:] * b64).astype(a.dtype).reshape(-1, *a.shape)
        fitness.append(np.asarray(evaluate(batch), dtype=np.float64))
    fitness = np.concatenate(fitness)
    return float(ratios[int(np.argmax(fitness))]), fitness
