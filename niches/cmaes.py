"""CMA-ES through ask/tell: pycma with bounds, a budget, IPOP restarts and a separable mode.

    optimizer = CMAES(x0, sigma0=0.2, bounds=(0, 1), seed=0, max_evals=200)
    while not optimizer.stop():
        genomes = optimizer.ask()
        optimizer.tell(genomes, [fitness(g) for g in genomes])   # higher is better
    optimizer.best_genome, optimizer.best_fitness

Why a wrapper and not pycma as it is:
* fitness here is *maximised* (accuracy); pycma minimises, so `tell` negates;
* pycma draws from numpy's global random state, so anything else that touches
  `np.random` between two `ask` calls would change the run. The wrapper swaps in its own
  state around every pycma call: the same seed gives the same genomes, which is what
  lets a killed run resume by replaying its logged generations (niches/run.py) instead
  of unpickling an optimizer;
* restarts (IPOP: a new strategy with the population doubled) exist in pycma only
  inside `cma.fmin2`, not for an ask/tell loop;
* a budget of evaluations that holds across restarts.
"""
from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np

FULL_COVARIANCE_MAX_DIM = 500
"""`separable="auto"` switches to the diagonal (sep-CMA) variant above this dimension:
a full covariance costs O(n^2) memory and O(n^3) per eigendecomposition, and sep-CMA
learns faster on large, nearly separable genomes (pycma's advice starts at ~100)."""


def default_popsize(dimension: int) -> int:
    """pycma's default population size, 4 + floor(3 ln n)."""
    return 4 + int(3 * math.log(dimension))


class CMAES:
    """A CMA-ES maximiser over a box, speaking ask/tell.

    `separable`: True (sep-CMA, diagonal covariance), False (full covariance) or "auto"
    (separable above `FULL_COVARIANCE_MAX_DIM` dimensions). `restarts`: how many times a
    stopped strategy is replaced by a fresh one with twice the population (IPOP), starting
    again from `x0` with a new seed. `max_evals`: total evaluations over all restarts
    (None: until pycma's own criteria stop the last restart).
    """

    def __init__(self, x0: Sequence[float], sigma0: float, *, bounds: tuple[float, float] = (0.0, 1.0),
                 popsize: int | None = None, seed: int = 0, separable: bool | str = "auto",
                 restarts: int = 0, max_evals: int | None = None):
        self.x0 = np.asarray(x0, dtype=float)
        if self.x0.ndim != 1 or len(self.x0) < 1:
            raise ValueError("x0 must be a non-empty vector")
        self.sigma0 = float(sigma0)
        self.bounds = (float(bounds[0]), float(bounds[1]))
        self.dimension = len(self.x0)
        self.separable = self.dimension > FULL_COVARIANCE_MAX_DIM if separable == "auto" else bool(separable)
        self.initial_popsize = popsize or default_popsize(max(self.dimension, 2))
        self.seed = seed
        self.max_restarts = restarts
        self.max_evals = max_evals
        self.restart = 0
        self.evaluations = 0
        self.generation = 0
        self.best_genome: np.ndarray | None = None
        self.best_fitness = -math.inf
        self._start_strategy()

    def _start_strategy(self) -> None:
        import cma

        seed = self.seed * 1000 + self.restart + 1  # pycma treats seed 0 as "no seed"
        self._random_state = np.random.RandomState(seed).get_state()
        options = {
            "bounds": list(self.bounds), "popsize": self.initial_popsize * 2 ** self.restart,
            "seed": seed, "verbose": -9, "CMA_diagonal": self.separable,
            # a budget stops the run, not a plateau: merged LLMs often score 0 on every
            # candidate of a generation at first, which pycma's tolfun would take for convergence
            "maxfevals": np.inf, "tolfun": 0, "tolfunhist": 0, "tolflatfitness": 10 ** 6,
        }
        with warnings.catch_warnings(), self._own_random_state():
            warnings.simplefilter("ignore")
            self._es = cma.CMAEvolutionStrategy(self.x0.tolist(), self.sigma0, options)

    @contextmanager
    def _own_random_state(self) -> Iterator[None]:
        """numpy's global random state is this optimizer's while pycma runs."""
        saved = np.random.get_state()
        np.random.set_state(self._random_state)
        try:
            yield
        finally:
            self._random_state = np.random.get_state()
            np.random.set_state(saved)

    @property
    def popsize(self) -> int:
        return self._es.popsize

    @property
    def sigma(self) -> float:
        return float(self._es.sigma)

    @property
    def mean(self) -> np.ndarray:
        """The distribution mean, mapped into the bounds (pycma's `xfavorite`): under noisy
        fitness a better estimate of the optimum than the best single sample."""
        return np.asarray(self._es.result.xfavorite, dtype=float)

    def ask(self) -> list[np.ndarray]:
        """The next generation's genomes, inside the bounds. At most the remaining budget."""
        with warnings.catch_warnings(), self._own_random_state():
            warnings.simplefilter("ignore")
            genomes = [np.asarray(x, dtype=float) for x in self._es.ask()]
        if self.max_evals is not None:
            genomes = genomes[: max(0, self.max_evals - self.evaluations)]
        return genomes

    def tell(self, genomes: Sequence[np.ndarray], fitnesses: Sequence[float]) -> None:
        """Report the fitness (higher is better) of the genomes `ask` returned, in order.
        A generation cut short by the budget updates the record but not the strategy
        (pycma needs a full population)."""
        if len(genomes) != len(fitnesses):
            raise ValueError(f"{len(genomes)} genomes but {len(fitnesses)} fitness values")
        for genome, fitness in zip(genomes, fitnesses):
            if not math.isfinite(fitness):
                raise ValueError(f"fitness must be finite, got {fitness}")
            if fitness > self.best_fitness:
                self.best_fitness, self.best_genome = float(fitness), np.array(genome, dtype=float)
        self.evaluations += len(genomes)
        self.generation += 1
        if len(genomes) == self.popsize:
            with warnings.catch_warnings(), self._own_random_state():
                warnings.simplefilter("ignore")
                self._es.tell([list(g) for g in genomes], [-float(f) for f in fitnesses])
        if self._strategy_stopped() and self.restart < self.max_restarts and not self._budget_spent():
            self.restart += 1
            self._start_strategy()

    def _budget_spent(self) -> bool:
        return self.max_evals is not None and self.evaluations >= self.max_evals

    def _strategy_stopped(self) -> bool:
        return bool(self._es.stop())

    def stop(self) -> bool:
        """True when the budget is spent, or the last allowed strategy has converged."""
        return self._budget_spent() or (self._strategy_stopped() and self.restart >= self.max_restarts)

    def state(self) -> dict:
        """A JSON-ready summary for the run log (not enough to rebuild the optimizer:
        runs resume by replaying their generations, see niches/run.py)."""
        return {
            "generation": self.generation, "evaluations": self.evaluations, "restart": self.restart,
            "popsize": self.popsize, "sigma": self.sigma, "mean": self.mean.tolist(),
            "best_fitness": self.best_fitness if self.best_genome is not None else None,
            "best_genome": None if self.best_genome is None else self.best_genome.tolist(),
            "separable": self.separable, "stop": {k: str(v) for k, v in dict(self._es.stop()).items()},
        }
