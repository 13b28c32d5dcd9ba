"""The stages of a run: for PS, DFS and M2N2, a genome (vector <-> recipe), the search over
it, the checkpoints its candidates are built from, and the scorer that builds and scores
them (the harness, one resident model). Each stage is set up completely before it runs,
so a bad template or setting fails before any candidate is scored.
"""
from __future__ import annotations

import sys
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from evaluation.executors import Executor, HarnessSpec, Job, build_harness, make_executor
from evaluation.harness import Harness
from evaluation.tasks import Task
from merging.checkpoint import Checkpoint, resolve_model_path
from merging.dataflow import DataflowSpace
from merging.errors import RecipeError
from merging.recipe import load_yaml
from niches.baselines import RandomSearch
from niches.cmaes import CMAES, default_popsize
from niches.coefficients import CoefficientGenome, SourceGram, slerp_split_members
from niches.config import PS_MODEL, OptimizerSettings, References, RunConfig
from niches.genome import DataflowGenome, LayerLayout, RecipeGenome
from niches.loop import Outcome, Scored, logged_candidates, run_search
from niches.m2n2 import NaturalNiches
from niches.runfolder import RunFolder
from niches.search import Candidate, Search

Genome = RecipeGenome | DataflowGenome | CoefficientGenome


@dataclass
class Stage:
    """One search: a genome over some models and the search over it."""

    name: str
    genome: Genome
    search: Search
    budget: int
    """Samples the search evaluates (the progress bar's total)."""
    checkpoints: dict[str, Checkpoint]
    reference: str
    """The model the resident harness model starts as (same architecture as candidates)."""

    @property
    def method(self) -> str:
        """How the genome was searched, in words (for the card's lineage)."""
        if isinstance(self.search, RandomSearch):
            return "uniform random search (the baseline)"
        return "CMA-ES" if isinstance(self.search, CMAES) else "M2N2"

    def close(self) -> None:
        for checkpoint in self.checkpoints.values():
            checkpoint.close()


def run_stage(stage: Stage, config: RunConfig, folder: RunFolder, tasks: list[Task], progress: bool) -> Outcome:
    """The stage's search, driven by the loop in the run folder, scored by the run's executor."""
    folder.check_sources(stage.name, {ref: c.path for ref, c in stage.checkpoints.items()},
                         len(logged_candidates(folder, stage.name)))
    try:
        with make_executor(config.executor, harness_spec(stage.checkpoints[stage.reference].path, config,
                                                         folder.scores_file),
                           config.workers, ray_address=config.ray_address,
                           workers_per_gpu=config.workers_per_gpu) as executor:
            scorer = HarnessScorer(stage, config, executor, tasks)
            outcome = run_search(stage.name, stage.search, scorer, folder, progress=progress, total=stage.budget,
                                 max_failures=config.max_failures)
            outcome.executor = {"executor": executor.name, **executor.usage().summary()}
            return outcome
    finally:
        stage.close()


def harness_spec(template: Path, config: RunConfig, cache: Path) -> HarnessSpec:
    """How the run's harnesses are built: resident model from `template`, the run's device,
    dtype and batch size, the run folder's score cache."""
    return HarnessSpec(str(template), device=config.device, batch_size=config.batch_size, dtype=config.dtype,
                       cache=str(cache), threads=config.threads, sources=config.sources)


class HarnessScorer:
    """Builds each candidate's recipe from its genome and hands the whole round to the
    executor, which scores the candidates per example on the fitness tasks, each merged into
    a resident model (candidates in the score cache cost no forward pass), and gives each
    back as it finishes."""

    def __init__(self, stage: Stage, config: RunConfig, executor: Executor, tasks: list[Task]):
        self.stage, self.config, self.executor, self.tasks = stage, config, executor, tasks
        self._said = False

    def task_keys(self) -> dict[str, str]:
        return self.executor.task_keys(self.tasks, self.config.fitness.limit)

    def score(self, candidates: Sequence[Candidate]) -> Iterator[tuple[int, Scored]]:
        checkpoints = {ref: str(checkpoint.path) for ref, checkpoint in self.stage.checkpoints.items()}
        jobs = [Job(self.stage.genome.decode(c.genome), checkpoints, self.tasks, self.config.fitness.limit,
                    self.config.seed) for c in candidates]
        for index, result in self.executor.score(jobs):
            self._say_placement()
            yield index, Scored({name: np.asarray(values, dtype=np.float64) for name, values in result.scores.items()},
                                result.key, result.twin, result.seconds, result.error)

    def _say_placement(self) -> None:
        """Print once where the workers keep the sources (known after their first candidate)."""
        placement = self.executor.usage().placement
        if placement and not self._said:
            from tqdm.auto import tqdm

            count = self.executor.workers
            workers = f"{count} worker{'s' * (count > 1)}"
            search = self.stage.search
            if isinstance(search, NaturalNiches) and search.children_per_ask < count:
                workers += (f" (M2N2 draws {search.children_per_ask} per round, so some stay idle: "
                            f"m2n2.children_per_ask: {count} keeps them busy)")
            tqdm.write(f"{self.stage.name}: executor {self.executor.name}, {workers}; {'; '.join(placement)}",
                       file=sys.stderr)
            self._said = True

    def busy(self) -> str:
        executor = self.executor
        return f"{executor.busy()}/{executor.workers}" if executor.workers > 1 else ""


def make_harness(template: Path, config: RunConfig, cache: Path) -> Harness:
    """A harness in this process with the run's settings (the report's scoring)."""
    return build_harness(harness_spec(template, config, cache), device=config.device, shared_cache=True)


def genome_search(genome: RecipeGenome | DataflowGenome, settings: OptimizerSettings, seed: int) -> Search:
    """CMA-ES from the genome's start (its distribution mean evaluated at the end), or
    uniform random genomes at the same budget; both evaluate the start itself with their
    first generation unless `evaluate_start` is off."""
    start = genome.x0 if settings.evaluate_start else None
    if settings.search == "random":
        return RandomSearch(genome.dimension, max_evals=settings.max_evals,
                            popsize=settings.popsize or default_popsize(max(genome.dimension, 2)), seed=seed,
                            start=start)
    try:
        return CMAES(genome.x0, settings.sigma0, bounds=(0.0, 1.0), popsize=settings.popsize, seed=seed,
                     separable=settings.separable, restarts=settings.restarts, max_evals=settings.max_evals,
                     evaluate_mean=True, evaluate_start=settings.evaluate_start)
    except ValueError as exc:
        raise RecipeError(f"optimizer: {exc}") from None


def budget(settings, max_evals: int | None):
    """The settings with the budget --max-evals gives, if it gives one."""
    return settings if max_evals is None else settings.model_copy(update={"max_evals": max_evals})


def ps_stage(config: RunConfig, template_path: Path, template_text: str, references: References,
             max_evals: int | None) -> Stage:
    genome = _ps_genome(template_path, template_text, references)
    recipe = genome.decode(genome.x0)
    checkpoints = {ref: Checkpoint(ref, resolve_model_path(ref)) for ref in recipe.referenced_models()}
    settings = budget(config.ps.optimizer, max_evals)
    return Stage("ps", genome, genome_search(genome, settings, config.seed), settings.max_evals, checkpoints,
                 recipe.base_model or recipe.referenced_models()[0])


def _ps_genome(template_path: Path, template_text: str, references: References) -> RecipeGenome:
    data, root = load_yaml(template_text, str(template_path))
    if not isinstance(data, dict):
        raise RecipeError(f"{template_path}: a recipe template is a YAML mapping")
    references.in_template(data)
    first = data.get("base_model") or next(iter((data.get("models") or [{}])), {}).get("model")
    if first is None and data.get("slices"):
        first = data["slices"][0]["sources"][0]["model"]
    if not isinstance(first, str):
        raise RecipeError(f"{template_path}: the template names no model")
    with closing(Checkpoint(first, resolve_model_path(first))) as checkpoint:
        layout = LayerLayout.of(checkpoint)
    return RecipeGenome(data, root, str(template_path), layout)


def dfs_pool(config: RunConfig, references: References, ps_model: str | None) -> list[str]:
    """The DFS stage's models, model 0 first, with `ps` standing for `ps_model` (the PS
    merge's folder, or a model of its architecture while the merge does not exist yet)."""
    pool = config.dfs.sources or ([PS_MODEL] if config.method == "ps+dfs" else []) + config.models
    return [ps_model if m == PS_MODEL else references.resolve(m) for m in pool]


def dfs_genome(config: RunConfig, pool: list[str]) -> DataflowGenome:
    settings = config.dfs
    space = DataflowSpace(pool, repeats=settings.repeats)
    return DataflowGenome(space, scales=settings.scales, scale_bounds=settings.scale_bounds, init=settings.init)


def dfs_stage(config: RunConfig, pool: list[str], max_evals: int | None) -> Stage:
    genome = dfs_genome(config, pool)
    checkpoints = {ref: Checkpoint(ref, resolve_model_path(ref)) for ref in pool}
    settings = budget(config.dfs.optimizer, max_evals)
    return Stage("dfs", genome, genome_search(genome, settings, config.seed), settings.max_evals, checkpoints, pool[0])


def check_m2n2_tasks(tasks: list[Task]) -> None:
    negative = [t.name for t in tasks if t.kind == "perplexity"]
    if negative:
        raise RecipeError(f"M2N2 shares per-example scores as resources, so they must be >= 0; fitness tasks "
                          f"{', '.join(negative)} are perplexity tasks, whose scores are negative")


def m2n2_stage(config: RunConfig, models: list[str], folder: RunFolder, max_evals: int | None) -> Stage:
    """M2N2 over coefficient members (niches/coefficients.py): the sources are the seeds
    (evaluated outside the budget, as in the reference), then `children_per_ask` children per round."""
    checkpoints = {ref: Checkpoint(ref, resolve_model_path(ref)) for ref in models}
    gram = SourceGram.load_or_compute(folder.path / "m2n2_gram.safetensors", [checkpoints[m] for m in models])
    settings = budget(config.m2n2, max_evals)
    crossover: Callable = lambda a, b, w, split: slerp_split_members(a, b, w, split, gram)  # noqa: E731
    search = NaturalNiches(settings.population_size, seeds=[gram.one_hot(s) for s in range(len(models))],
                           max_evals=settings.max_evals, alpha=settings.alpha, crossover=settings.crossover,
                           split_point=settings.split_point, attraction=settings.attraction,
                           n_params=int(gram.sizes.sum()), allowed_boundaries=gram.boundaries(settings.split_at),
                           crossover_fn=crossover, children_per_ask=settings.children_per_ask, seed=config.seed)
    return Stage("m2n2", CoefficientGenome(gram), search, settings.max_evals, checkpoints, models[0])

