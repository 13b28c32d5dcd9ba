"""CMA-ES through the search protocol (niches/search.py): pycma with bounds, a budget,
IPOP restarts and a separable mode.

    search = CMAES(x0, sigma0=0.2, bounds=(0, 1), seed=0, max_evals=200, evaluate_mean=True)
    while not search.stop():
        candidates = search.ask()
        search.tell(candidates, [evaluate(c.genome) for c in candidates])  # {task: per-example scores}
    search.best().genome

Why a wrapper and not pycma as it is:
* the protocol's scores are reduced to `niches.search.fitness` and *maximised*; pycma
  minimises, so `tell` negates;
* pycma draws from numpy's global random state, so anything else that touches
  `np.random` between two `ask` calls would change the run. The wrapper swaps in its own
  state around every pycma call: the same seed gives the same genomes, which is what
  `from_state` relies on (it replays the told fitness, see there);
* restarts (IPOP: a new strategy with the population doubled) exist in pycma only
  inside `cma.fmin2`, not for an ask/tell loop; pycma's own stop criteria trigger them,
  and a plateau does not end the last strategy (`PLATEAU_IS_NOT_CONVERGENCE`);
* step size by CSA at every dimension (pycma silently switches to TPA from 300 on);
* a budget of evaluations that holds across restarts, the starting point evaluated with
  the first generation (`evaluate_start`) and the distribution mean once at the end
  (`evaluate_mean`), both outside the budget.
"""
from __future__ import annotations

import hashlib
import math
import warnings
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import numpy as np

from niches.search import Candidate, Scores, fitness

FULL_COVARIANCE_MAX_DIM = 500
"""`separable="auto"` switches to the diagonal (sep-CMA) variant above this dimension:
a full covariance costs O(n^2) memory and O(n^3) per eigendecomposition, and sep-CMA
learns faster on large, nearly separable genomes (pycma's advice starts at ~100)."""


PLATEAU_IS_NOT_CONVERGENCE = {"tolfun": 0, "tolfunhist": 0, "tolflatfitness": np.inf, "tolstagnation": 0}
"""pycma's stop criteria on fitness *values* (a small range of values, a flat generation,
no improvement of the median), switched off for the last strategy a run may use.

While a restart is left, every pycma criterion applies as pycma documents it, and any of
them starts the next strategy (IPOP, as `cma.fmin2` restarts). The last strategy stops
only on the budget or on criteria about the distribution itself (tolx, noeffectaxis,
conditioncov, tolupsigma, ...): with no restart left, stopping on a plateau would end the
run, and merged LLMs often score 0 on every candidate of the first generations. A user
who sets a budget expects it spent while the search can still move; on a flat fitness
pycma widens sigma, so the search goes on looking instead of ending after one generation."""


def default_popsize(dimension: int) -> int:
    """pycma's default population size, 4 + floor(3 ln n)."""
    return 4 + int(3 * math.log(dimension))


def _costs(fitnesses: Sequence[float]) -> list[float]:
    """pycma's values (it minimises): the negated fitness, and for a failed candidate
    (-inf) one more than the generation's worst cost, or 0 when all failed. CMA-ES uses
    ranks only, so this ranks a failure last without an infinity pycma cannot sort."""
    costs = [-float(f) for f in fitnesses]
    finite = [c for c in costs if math.isfinite(c)]
    worst = max(finite) + 1.0 if finite else 0.0
    return [c if math.isfinite(c) else worst for c in costs]


def _digest(genomes: Sequence[np.ndarray]) -> int:
    """A 63-bit fingerprint of a generation's genomes, to check a replay against."""
    h = hashlib.blake2b(digest_size=8)
    for genome in genomes:
        h.update(np.ascontiguousarray(genome, dtype=np.float64).tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


class CMAES:
    """A CMA-ES maximiser over a box, speaking the search protocol.

    `separable`: True (sep-CMA, diagonal covariance), False (full covariance) or "auto"
    (separable above `FULL_COVARIANCE_MAX_DIM` dimensions). `restarts`: how many times a
    stopped strategy is replaced by a fresh one with twice the population (IPOP), starting
    again from `x0` with a new seed. `max_evals`: total sampled evaluations over all
    restarts (None: until pycma's own criteria stop the last restart). `evaluate_mean`:
    once the search is over, `ask` returns the distribution mean (kind "mean") for one
    more evaluation outside the budget, and `stop` waits for it to be told: under noisy
    fitness the mean is often better than the best single sample. `evaluate_start`: the
    first `ask` also returns `x0` itself (kind "start", outside the budget, not told to
    pycma), so the search's best is never worse than where it started: a DFS path that
    begins as a known model (model A's layers in order, e.g. the PS merge in ps+dfs) keeps
    that model if no sample beats it, and the log shows whether the search improved on it.
    """

    def __init__(self, x0: Sequence[float], sigma0: float, *, bounds: tuple[float, float] = (0.0, 1.0),
                 popsize: int | None = None, seed: int = 0, separable: bool | str = "auto",
                 restarts: int = 0, max_evals: int | None = None, evaluate_mean: bool = False,
                 evaluate_start: bool = False):
        self.x0 = np.asarray(x0, dtype=float)
        if self.x0.ndim != 1 or len(self.x0) < 1:
            raise ValueError("x0 must be a non-empty vector")
        if not sigma0 > 0:
            raise ValueError(f"sigma0 must be positive, got {sigma0}")
        if popsize is not None and popsize < 2:
            raise ValueError(f"popsize must be at least 2, got {popsize}")
        if restarts < 0 or (max_evals is not None and max_evals < 0):
            raise ValueError("restarts and max_evals must not be negative")
        self.sigma0 = float(sigma0)
        self.bounds = (float(bounds[0]), float(bounds[1]))
        self.dimension = len(self.x0)
        self.separable = self.dimension > FULL_COVARIANCE_MAX_DIM if separable == "auto" else bool(separable)
        self.initial_popsize = popsize or default_popsize(max(self.dimension, 2))
        self.seed = seed
        self.max_restarts = restarts
        self.max_evals = max_evals
        self.evaluate_mean = evaluate_mean
        self.evaluate_start = evaluate_start
        self.restart = 0
        self.evaluations = 0
        self.generation = 0
        self._best: Candidate | None = None
        self.best_fitness = -math.inf
        self._pending: list[Candidate] = []
        self._asked: list[np.ndarray] = []
        self._mean_fitness: float | None = None
        self._start_fitness: float | None = None
        self._told_fitness: list[float] = []
        self._generation_sizes: list[int] = []
        self._digests: list[int] = []
        self._start_strategy()

    def _start_strategy(self) -> None:
        import cma

        seed = self.seed * 1000 + self.restart + 1  # pycma treats seed 0 as "no seed"
        self._random_state = np.random.RandomState(seed).get_state()
        options = {
            "bounds": list(self.bounds), "popsize": self.initial_popsize * 2 ** self.restart,
            "seed": seed, "verbose": -9, "CMA_diagonal": self.separable,
            # left to itself pycma picks two-point adaptation (TPA) instead of CSA from 300
            # dimensions on (4.5: always; 4.0: when separable), silently; on the digits MLP TPA
            # collapses sigma within a few thousand passes (docs/m2n2.md, "Results and gaps").
            # CSA is the step size CMA-ES is documented with.
            "AdaptSigma": cma.sigma_adaptation.CMAAdaptSigmaCSA,
            "maxfevals": np.inf,  # the budget is ours: it holds across restarts
        }
        if self.restart >= self.max_restarts:
            options.update(PLATEAU_IS_NOT_CONVERGENCE)
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

    def ask(self) -> list[Candidate]:
        """The next generation (kind "sample", inside the bounds, at most the remaining
        budget), the first one after `x0` (kind "start") when `evaluate_start` is set; once
        the search is over and `evaluate_mean` is set, the mean (kind "mean")."""
        if self._pending:
            raise RuntimeError("ask called again before the last candidates were told")
        if self._search_over():
            if not self.evaluate_mean or self._mean_fitness is not None:
                raise RuntimeError("the search has stopped: nothing more to ask")
            self._pending = [Candidate(self.mean, kind="mean")]
            return list(self._pending)
        with warnings.catch_warnings(), self._own_random_state():
            warnings.simplefilter("ignore")
            self._asked = self._es.ask()
        count = len(self._asked) if self.max_evals is None else min(len(self._asked), self.max_evals - self.evaluations)
        self._pending = [Candidate(np.array(x, dtype=float)) for x in self._asked[:count]]
        if self.evaluate_start and self.generation == 0 and self.restart == 0:
            self._pending.insert(0, Candidate(np.clip(self.x0, *self.bounds), kind="start"))
        return list(self._pending)

    def tell(self, candidates: Sequence[Candidate], scores: Sequence[Optional[Scores]]) -> None:
        """The scores of the candidates `ask` returned, in ask order; ranked by
        `niches.search.fitness` (higher is better; a failed candidate, None, ranks last). A
        generation cut short by the budget updates the record but not the strategy (pycma
        needs a full population)."""
        if len(candidates) != len(scores):
            raise ValueError(f"{len(candidates)} candidates but {len(scores)} scores")
        self._tell_fitness(candidates, [fitness(s) for s in scores])

    def _tell_fitness(self, candidates: Sequence[Candidate], fitnesses: Sequence[float]) -> None:
        if not self._pending or len(candidates) != len(self._pending) or any(
                c is not p for c, p in zip(candidates, self._pending)):
            raise ValueError("tell takes exactly the candidates the last ask returned, in order")
        for value in fitnesses:
            if math.isnan(value) or value == math.inf:
                raise ValueError(f"fitness must be finite, or -inf for a failed candidate; got {value}")
        self._pending = []
        for candidate, value in zip(candidates, fitnesses):
            if value > self.best_fitness:
                self.best_fitness, self._best = float(value), Candidate(candidate.genome.copy(), candidate.kind)
        if candidates[0].kind == "mean":
            self._mean_fitness = float(fitnesses[0])
            return
        if candidates[0].kind == "start":
            self._start_fitness = float(fitnesses[0])
            candidates, fitnesses = candidates[1:], fitnesses[1:]
        self._told_fitness.extend(float(v) for v in fitnesses)
        self._generation_sizes.append(len(candidates))
        self._digests.append(_digest([c.genome for c in candidates]))
        self.evaluations += len(candidates)
        self.generation += 1
        if len(candidates) == self.popsize:
            with warnings.catch_warnings(), self._own_random_state():
                warnings.simplefilter("ignore")
                # pycma's own arrays: it finds its samples by their bytes (given anything else it
                # re-derives them by inverting the bound transform)
                self._es.tell(self._asked, _costs(fitnesses))
        if self._strategy_stopped() and self.restart < self.max_restarts and not self._budget_spent():
            self.restart += 1
            self._start_strategy()

    def _budget_spent(self) -> bool:
        return self.max_evals is not None and self.evaluations >= self.max_evals

    def _strategy_stopped(self) -> bool:
        return bool(self._es.stop())

    def _search_over(self) -> bool:
        """No more samples: the budget is spent, or the last allowed strategy has stopped."""
        return self._budget_spent() or (self._strategy_stopped() and self.restart >= self.max_restarts)

    def stop(self) -> bool:
        """True when no more samples will be asked and, with `evaluate_mean`, the mean was told."""
        return self._search_over() and (not self.evaluate_mean or self._mean_fitness is not None)

    def best(self) -> Candidate:
        """The candidate with the highest fitness told so far (samples and the mean alike)."""
        if self._best is None:
            raise RuntimeError("nothing has been told yet")
        return self._best

    def summary(self) -> dict:
        """A JSON-ready summary of where the search stands, for the run log."""
        return {
            "generation": self.generation, "evaluations": self.evaluations, "restart": self.restart,
            "popsize": self.popsize, "sigma": self.sigma, "mean": self.mean.tolist(),
            "best_fitness": self.best_fitness if self._best is not None else None,
            "best_genome": None if self._best is None else self._best.genome.tolist(),
            "start_fitness": self._start_fitness, "separable": self.separable,
            "stop": {k: str(v) for k, v in dict(self._es.stop()).items()},
        }

    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        """(arrays, meta) that `from_state` rebuilds this search from.

        The state is the settings and every told fitness, not pycma's numeric state:
        `from_state` replays the run (ask, tell the recorded fitness) under the same seed.
        pycma's state is dozens of attributes (evolution paths, the sigma adaptation's
        object, boundary handler, stop-criterion histories, its sent-solution archive), which
        change between versions and have no documented way back in but pickle; a replay
        is exact by construction, and the digest kept per generation checks it (a replay
        that gives other genomes, e.g. under another pycma version, is refused). The cost is
        pycma's own time per generation once more (about 35 ms at 19,210 dimensions)."""
        if self._pending:
            raise RuntimeError("state taken between ask and tell: tell the candidates first")
        import cma

        arrays = {"x0": self.x0, "fitness": np.array(self._told_fitness, dtype=np.float64),
                  "generation_sizes": np.array(self._generation_sizes, dtype=np.int64),
                  "digests": np.array(self._digests, dtype=np.int64)}
        meta = {"sigma0": self.sigma0, "bounds": list(self.bounds), "popsize": self.initial_popsize,
                "seed": self.seed, "separable": self.separable, "restarts": self.max_restarts,
                "max_evals": self.max_evals, "evaluate_mean": self.evaluate_mean,
                "mean_fitness": self._mean_fitness, "evaluate_start": self.evaluate_start,
                "start_fitness": self._start_fitness, "pycma": cma.__version__}
        return arrays, meta

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], meta: dict) -> "CMAES":
        """The search `state` described, rebuilt by replaying its told fitness; raises if a
        replayed generation's genomes are not the ones that were told."""
        search = cls(arrays["x0"], meta["sigma0"], bounds=tuple(meta["bounds"]), popsize=meta["popsize"],
                     seed=meta["seed"], separable=meta["separable"], restarts=meta["restarts"],
                     max_evals=meta["max_evals"], evaluate_mean=meta["evaluate_mean"],
                     evaluate_start=meta.get("evaluate_start", False))
        told = iter(arrays["fitness"].tolist())
        for generation, (size, digest) in enumerate(zip(arrays["generation_sizes"].tolist(), arrays["digests"].tolist())):
            candidates = search.ask()
            start = [meta["start_fitness"]] if candidates[0].kind == "start" else []
            samples = candidates[len(start):]
            if len(samples) != size or _digest([c.genome for c in samples]) != digest:
                raise RuntimeError(f"replaying generation {generation} gave other genomes than were told "
                                   f"(state written under pycma {meta['pycma']}): cannot resume this search")
            search._tell_fitness(candidates, start + [next(told) for _ in samples])
        if meta["mean_fitness"] is not None:
            search._tell_fitness(search.ask(), [meta["mean_fitness"]])
        return search
