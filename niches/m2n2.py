"""M2N2, Model Merging of Natural Niches (Abrantes, Lange, Tang, GECCO 2025, arXiv 2508.16204).

An archive of P models competes for the training examples: an example is a resource
whose value is shared among the members that get it right, so a model that is the only
one solving some examples survives even with a low accuracy. Parents are drawn by that
shared fitness, the second one by *attraction* (it is good where the first is weak), and
merged by SLERP with a moving split point. The definitions follow the reference code
(github.com/SakanaAI/natural_niches) line by line; where it has an undefined case (a
division 0/0) the guard is said where it is made.

    search = NaturalNiches(population_size=20, seeds=[a, b], max_evals=1000, mutation_std=0.01, seed=0)
    while not search.stop():
        candidates = search.ask()            # first the seeds (kind "seed"), then the next child(ren)
        search.tell(candidates, [evaluate(c.genome) for c in candidates])   # {task: per-example scores >= 0}
    search.best()                            # the member with the best mean score on the training data

It speaks the search protocol of niches/search.py, so `evomerge evolve` drives it with the
same loop as CMA-ES (niches/loop.py). The seeds are evaluated outside the budget, as in
the reference; `max_evals` counts the children.

The search knows nothing about what a member is: any numpy array that the crossover
function can combine (a flat parameter vector by default; a per-tensor coefficient
matrix over source models for LLMs, see niches/coefficients.py). Split points and mixing
ratios are drawn here, from the search's own seeded generator, and handed to the
crossover function, so that two member representations follow the same random stream.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from merging.checkpoint import write_atomic
from merging.operators.slerp import slerp_scales
from niches.search import Candidate, Scores, concatenated

SMALL_SIN = 1e-6
"""The reference falls back to linear interpolation when sin(angle) is at most this."""

REFERENCE_DOT_THRESHOLD = math.sqrt(1.0 - SMALL_SIN ** 2)
"""The reference's rule in the SLERP operator's terms (linear where |cos| exceeds it):
sin(angle) <= 1e-6. The operator (merging/operators/slerp.py) follows mergekit, linear
from |cos| > 0.9995 (angles under 1.8 degrees), a guard for float32 tensors; M2N2 keeps
the reference's threshold, computed in float64 over whole members, because late in a run
parents are often that close and the reference's children are spherical there."""

Crossover = Callable[[np.ndarray, np.ndarray, float, int], np.ndarray]
"""(parent A, parent B, mixing ratio w, split point) -> child."""


def fitness_sharing(scores: np.ndarray, alpha: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Resource competition: (F, f) with F_ij = S_ij / z_j^alpha, z_j = sum_k S_kj (1 where
    z_j = 0, so an example nobody solves divides nothing) and f_i = sum_j F_ij.
    alpha = 0 is plain summed score (a standard GA); alpha = 1 shares every example fully."""
    scores = np.asarray(scores, dtype=np.float64)
    z = scores.sum(axis=0)
    z = np.where(z != 0, z, 1.0) ** alpha
    shared = scores / z[None, :]
    return shared, shared.sum(axis=1)


def _proportional(weights: np.ndarray, rng: np.random.Generator) -> int:
    """Index drawn with probability weights / sum; uniform when every weight is 0
    (the reference would divide 0 by 0 there)."""
    total = weights.sum()
    p = weights / total if total > 0 else np.full(len(weights), 1.0 / len(weights))
    return int(rng.choice(len(weights), p=p))


def select_first_parent(fitness: np.ndarray, rng: np.random.Generator) -> int:
    """Parent A with probability f_i / sum f."""
    return _proportional(np.asarray(fitness, dtype=np.float64), rng)


def attraction(shared: np.ndarray, first: int) -> np.ndarray:
    """g_k = sum_j max(0, F_kj - F_Aj): how much member k gains over parent A where A is weak."""
    return np.maximum(0.0, shared - shared[first][None, :]).sum(axis=1)


def select_second_parent(shared: np.ndarray, fitness: np.ndarray, first: int, rng: np.random.Generator) -> int:
    """Parent B with probability g_k / sum g. When every g is 0 (A is at least as good as
    everybody on every example), nobody complements A: B is then drawn by fitness among
    the others, so the evaluation is not spent on crossing A with itself."""
    g = attraction(shared, first)
    if g.sum() > 0:
        return _proportional(g, rng)
    if len(g) == 1:
        return first
    others = np.delete(np.arange(len(g)), first)
    return int(others[_proportional(np.asarray(fitness, dtype=np.float64)[others], rng)])


def vector_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of the angle between two whole members (flattened), computed in float64 (1
    when one is zero: no angle, linear interpolation). Products and sums rather than a
    BLAS dot: on a loaded machine a threaded BLAS call on one vector waited milliseconds
    for its threads, more than the forward pass M2N2 spends per child."""
    a64, b64 = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    norms = math.sqrt(float((a64 * a64).sum()) * float((b64 * b64).sum()))
    return float((a64 * b64).sum()) / norms if norms > 0 else 1.0


def member_slerp_scales(cosine: float, t: float) -> tuple[float, float]:
    """(p, q) with SLERP(A, B; t) = p A + q B: the SLERP operator's formula with the
    reference's degenerate case (REFERENCE_DOT_THRESHOLD)."""
    return slerp_scales(cosine, t, dot_threshold=REFERENCE_DOT_THRESHOLD)


def slerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """Spherical interpolation from a (t = 0) to b (t = 1), the angle taken between the
    whole vectors."""
    p, q = member_slerp_scales(vector_cosine(a, b), t)
    return (p * a.astype(np.float64) + q * b.astype(np.float64)).astype(a.dtype)


def slerp_split(a: np.ndarray, b: np.ndarray, w: float, split: int,
                allowed_boundaries: Optional[np.ndarray] = None) -> np.ndarray:
    """M2N2's crossover: SLERP(A, B; w) on flat coordinates [0, split) and SLERP(A, B; 1 - w)
    on [split, n), both with the angle of the whole vectors. The moving boundary lets a
    child take one parent's early layers and the other's late ones without the search
    fixing where layers end. `allowed_boundaries` (e.g. tensor or layer boundaries of an
    LLM) rejects any other split."""
    if allowed_boundaries is not None and not np.isin(split, allowed_boundaries):
        raise ValueError(f"split {split} is not one of the allowed boundaries")
    cosine = vector_cosine(a, b)
    flat_a, flat_b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    child = np.empty(a.size, dtype=np.float64)
    for part, t in ((slice(0, split), w), (slice(split, None), 1.0 - w)):
        p, q = member_slerp_scales(cosine, t)
        child[part] = p * flat_a[part] + q * flat_b[part]
    return child.reshape(a.shape).astype(a.dtype)


def replacement_index(scores: np.ndarray, child_scores: np.ndarray, alpha: float, capacity: int) -> Optional[int]:
    """Where a child goes: appended while the archive has room; otherwise it replaces the
    member of least shared fitness, computed with the child in the competition, unless the
    child is itself the least fit (None). Ties go against the member (the reference's
    argmin takes the first index, and the child comes last)."""
    if len(scores) < capacity:
        return len(scores)
    _, fitness = fitness_sharing(np.vstack([scores, child_scores[None, :]]), alpha)
    worst = int(np.argmin(fitness))
    return worst if worst < len(scores) else None


def save_state(path: str | Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """One safetensors file: arrays as tensors, `meta` as JSON in the header. Written
    atomically, so a kill leaves the old state or the new one, never half."""
    from safetensors.numpy import save_file

    tensors = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    write_atomic(path, lambda temporary: save_file(tensors, str(temporary), metadata={"meta": json.dumps(meta)}))


def load_state(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """What `save_state` wrote: (arrays, meta)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        arrays = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["meta"])
    return arrays, meta


class NaturalNiches:
    """The M2N2 archive and loop, as a search of niches/search.py. `ask` gives the seeds
    first (kind "seed", all at once: the starting models, evaluated outside the budget),
    then one child per call (kind "sample"); `tell` enters each candidate with its
    per-example scores (all tasks end to end are the resources, >= 0, higher is better).
    `max_evals` is the number of children (None: no end).

    Switches (the paper's ablations): `crossover=False` takes parent A as the child;
    `split_point=False` merges by one SLERP ratio everywhere; `attraction=False` draws B
    like A, by fitness; `alpha=0` removes resource competition (with attraction off: the
    GA baseline). `mutation_std` > 0 adds N(0, std^2) noise to every child, which the paper
    does only when evolving from scratch. `n_params` is the number of coordinates a split
    point ranges over (default: the members' size); `allowed_boundaries` restricts it to
    the given offsets. `crossover_fn(a, b, w, split)` combines two members (default
    `slerp_split`).

    `children_per_ask` > 1 draws that many children from the same archive per `ask` (all of
    them before any is told), so that a pool or Ray's workers score them at once; `tell`
    enters them in order. 1 is the paper's loop, where each child's parents come from the
    archive its predecessor left; with k, a child's parents may miss the last k - 1 entries
    (each of which replaces at most one member of the archive).
    """

    def __init__(self, population_size: int = 20, *, seeds: Sequence[np.ndarray] = (), max_evals: Optional[int] = None,
                 alpha: float = 1.0, crossover: bool = True, split_point: bool = True, attraction: bool = True,
                 mutation_std: float = 0.0, n_params: Optional[int] = None,
                 allowed_boundaries: Optional[np.ndarray] = None, crossover_fn: Optional[Crossover] = None,
                 children_per_ask: int = 1, seed: int = 0):
        if population_size < 1:
            raise ValueError("population_size must be at least 1")
        if children_per_ask < 1:
            raise ValueError("children_per_ask must be at least 1")
        self.population_size = population_size
        self.children_per_ask = children_per_ask
        self.seeds = [np.asarray(s) for s in seeds]
        """Seeds not told yet: the next `ask` gives them."""
        self.max_evals = max_evals
        self.alpha = float(alpha)
        self.crossover = crossover
        self.split_point = split_point
        self.attraction = attraction
        self.mutation_std = float(mutation_std)
        self.n_params = n_params
        self.allowed_boundaries = None if allowed_boundaries is None else np.asarray(allowed_boundaries, dtype=np.int64)
        self.crossover_fn: Crossover = crossover_fn or slerp_split
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.members: list[np.ndarray] = []
        self.kinds: list[str] = []
        self.scores = np.zeros((0, 0), dtype=np.float32)
        self.evaluations = 0
        """Candidates told, seeds included."""
        self.children = 0
        """Children told: what `max_evals` counts."""
        self.last_slots: list[Optional[int]] = []
        """The archive slot each candidate of the last `tell` took (None: rejected)."""
        self._asked = False

    def fitness(self) -> tuple[np.ndarray, np.ndarray]:
        """(F, f) of the current archive."""
        return fitness_sharing(self.scores, self.alpha)

    def ask(self) -> list[Candidate]:
        """The seeds while they are not told; then the next children (`children_per_ask`,
        fewer where the budget ends): parents by shared fitness (and attraction), crossover,
        mutation."""
        self._asked = True
        if self.seeds:
            return [Candidate(seed, "seed") for seed in self.seeds]
        if not self.members:
            raise RuntimeError("the archive is empty: give seeds, or tell at least one evaluated member first")
        count = self.children_per_ask
        if self.max_evals is not None:
            count = max(1, min(count, self.max_evals - self.children))
        shared, fitness = self.fitness()
        return [Candidate(self._child(shared, fitness)) for _ in range(count)]

    def _child(self, shared: np.ndarray, fitness: np.ndarray) -> np.ndarray:
        first = select_first_parent(fitness, self.rng)
        second = (select_second_parent(shared, fitness, first, self.rng) if self.attraction
                  else select_first_parent(fitness, self.rng))
        child = self.members[first]
        if self.crossover:
            split = self._draw_split(child.size)
            w = float(self.rng.uniform())
            child = self.crossover_fn(self.members[first], self.members[second], w, split)
        if self.mutation_std > 0:
            noise = self.rng.standard_normal(child.shape, dtype=np.float32 if child.dtype == np.float32 else np.float64)
            child = (child + noise * self.mutation_std).astype(child.dtype)
        return child

    def _draw_split(self, member_size: int) -> int:
        n = self.n_params or member_size
        if not self.split_point:
            return n  # every coordinate before the split: one ratio w everywhere
        if self.allowed_boundaries is not None:
            return int(self.rng.choice(self.allowed_boundaries))
        return int(self.rng.integers(0, n))

    def tell(self, candidates: Sequence[Candidate], scores: Sequence[Optional[Scores]]) -> None:
        """Enter evaluated candidates (asked for, or given starting models of kind "seed"),
        in order; `last_slots` says where each went (None: not entered; a failed candidate,
        told as None, never is, but counts as evaluated)."""
        if len(candidates) != len(scores):
            raise ValueError(f"{len(candidates)} candidates but {len(scores)} scores")
        self.last_slots = [self._enter(c.genome, None if s is None else concatenated(s), c.kind)
                           for c, s in zip(candidates, scores)]
        if any(c.kind == "seed" for c in candidates):
            self.seeds = []
        self._asked = False

    def _enter(self, member: np.ndarray, scores: Optional[np.ndarray], kind: str) -> Optional[int]:
        if scores is None:
            self.evaluations += 1
            self.children += kind == "sample"
            return None
        scores = scores.astype(np.float32)
        if self.members and scores.shape[0] != self.scores.shape[1]:
            raise ValueError(f"{scores.shape[0]} scores, the archive has {self.scores.shape[1]} examples")
        if (scores < 0).any() or not np.isfinite(scores).all():
            raise ValueError("per-example scores must be finite and >= 0 (they are shared as resources)")
        if not self.members:
            self.scores = np.zeros((0, scores.shape[0]), dtype=np.float32)
        slot = replacement_index(self.scores, scores, self.alpha, self.population_size)
        if slot == len(self.members):
            self.members.append(member)
            self.kinds.append(kind)
            self.scores = np.vstack([self.scores, scores[None, :]])
        elif slot is not None:
            self.members[slot] = member
            self.kinds[slot] = kind
            self.scores[slot] = scores
        self.evaluations += 1
        self.children += kind == "sample"
        return slot

    def stop(self) -> bool:
        """True once the seeds are told and `max_evals` children too."""
        return self.max_evals is not None and not self.seeds and self.children >= self.max_evals

    def best_index(self) -> int:
        """The member with the best mean score (the first on ties)."""
        return int(np.argmax(self.scores.mean(axis=1)))

    def best(self) -> Candidate:
        """M2N2's answer: the archive member best on the training data."""
        i = self.best_index()
        return Candidate(self.members[i], self.kinds[i])

    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        """(arrays, meta) that `from_state` rebuilds this search from, the random stream
        included: a restored search continues exactly as this one would. Not between an
        ask and its tell (the child would be lost)."""
        if self._asked:
            raise RuntimeError("state taken between ask and tell: tell the child first")
        arrays = {"scores": self.scores}
        if self.members:
            arrays["members"] = np.stack(self.members)
        if self.seeds:
            arrays["seeds"] = np.stack(self.seeds)
        if self.allowed_boundaries is not None:
            arrays["allowed_boundaries"] = self.allowed_boundaries
        meta = {"population_size": self.population_size, "max_evals": self.max_evals, "alpha": self.alpha,
                "crossover": self.crossover, "split_point": self.split_point, "attraction": self.attraction,
                "mutation_std": self.mutation_std, "n_params": self.n_params, "seed": self.seed,
                "children_per_ask": self.children_per_ask,
                "evaluations": self.evaluations, "children": self.children, "kinds": self.kinds,
                "rng": self.rng.bit_generator.state}
        return arrays, meta

    def summary(self) -> dict:
        """The archive as a run log shows it: its size, each member's kind and mean score,
        and the slot each candidate of the last `tell` took (None: rejected)."""
        return {"evaluations": self.evaluations, "children": self.children, "archive_size": len(self.members),
                "kinds": self.kinds, "archive_mean_scores": self.scores.mean(axis=1).tolist(),
                "slots": self.last_slots}

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], meta: dict,
                   crossover_fn: Optional[Crossover] = None) -> "NaturalNiches":
        """The search `state` described (the crossover function is code: pass it again)."""
        search = cls(meta["population_size"], seeds=list(arrays.get("seeds", [])), max_evals=meta["max_evals"],
                     alpha=meta["alpha"], crossover=meta["crossover"], split_point=meta["split_point"],
                     attraction=meta["attraction"], mutation_std=meta["mutation_std"], n_params=meta["n_params"],
                     allowed_boundaries=arrays.get("allowed_boundaries"), crossover_fn=crossover_fn,
                     children_per_ask=meta.get("children_per_ask", 1), seed=meta["seed"])
        search.rng.bit_generator.state = meta["rng"]
        search.scores = arrays["scores"].astype(np.float32)
        search.members = list(arrays["members"]) if "members" in arrays else []
        search.kinds = list(meta["kinds"])
        search.evaluations = meta["evaluations"]
        search.children = meta["children"]
        return search
