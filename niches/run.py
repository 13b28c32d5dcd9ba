"""Evolution runs: a config, a run folder, CMA-ES stages (PS, DFS, PS then DFS) or M2N2, resume.

    evomerge evolve recipes/zoo-small-ps.yaml --run-dir runs/ps

The run folder holds everything a run makes:

    config.yaml          the config as given (a rerun must give the same one)
    template.yaml        the PS recipe template, as read
    m2n2_gram.safetensors  (m2n2) the sources' per-tensor Gram matrices
    candidates.jsonl     one line per evaluated candidate: stage, index, genome, recipe
                         hash, per-task fitness scores, fitness, seconds
    scores.jsonl         the harness's per-example score cache
    optimizer.jsonl      the optimizer's state after every generation (M2N2: after every child)
    ps/best/             (ps+dfs) the PS merge that joins the DFS pool
    best/                the best candidate as a Hugging Face checkpoint, with a model
                         card giving the recipe, the lineage and the test scores
    results.json         fitness of the best candidates, report scores of them and the sources
    sessions.jsonl       wall seconds of each invocation that finished
    sources.json         per stage, the identity of each source checkpoint its logged
                         fitness was measured on (a changed one stops the replay)
    plots/               fitness against evaluations, PS per-layer heatmap, DFS path,
                         M2N2 best member's coefficients

Resume. A killed run is rerun with the same command. The optimizer is not unpickled:
CMA-ES and M2N2 are deterministic under their seed (niches/cmaes.py, niches/m2n2.py),
so the run replays every generation, feeding back the fitness logged in candidates.jsonl after checking that the
genome asked for is the one logged; the first candidate without a line is evaluated
for real (a candidate scored just before the kill is still found in the score cache,
so no forward pass is lost either way). Logged fitness is only replayed while the source
checkpoints are the ones it was measured on (sources.json): in a ps+dfs run extended
with --max-evals, a PS stage that finds a new best rewrites ps/best, and the DFS stage's
logged fitness then belongs to a model that no longer exists, so the run stops and says so.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional, Union

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Tag, ValidationError

from evaluation.harness import Harness, candidate_hash, checkpoint_hash, read_jsonl
from evaluation.tasks import Task, TaskResult, resolve_task
from merging.checkpoint import Checkpoint, resolve_model_path
from merging.dataflow import DataflowSpace
from merging.errors import EvomergeError, RecipeError
from merging.recipe import Recipe, load_yaml, located
from niches.cmaes import CMAES
from niches.coefficients import CoefficientGenome, SourceGram, slerp_split_members
from niches.genome import DataflowGenome, LayerLayout, RecipeGenome

PS_MODEL = "ps"
"""In a ps+dfs config's `dfs.sources`, the PS stage's best merge."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OptimizerSettings(_Strict):
    """CMA-ES over the unit box of genes (niches/cmaes.py)."""

    max_evals: int = 100
    popsize: Optional[int] = None
    sigma0: float = 0.2
    restarts: int = 0
    separable: Union[bool, Literal["auto"]] = "auto"


class PSSettings(_Strict):
    template: str
    """Recipe template with free markers (niches/genome.py), relative to the config file."""
    optimizer: OptimizerSettings = OptimizerSettings()


class DFSSettings(_Strict):
    sources: Optional[list[str]] = None
    """Models laid out in the slots, model 0 first (it gives embeddings, first and last
    layer). In ps+dfs, `ps` names the PS merge; default: the PS merge, then `models`."""
    repeats: int = 2
    scales: Literal["layer_pairs", "model_pairs", "none"] = "layer_pairs"
    scale_bounds: tuple[float, float] = (0.5, 2.0)
    init: Literal["first_model", "uniform"] = "first_model"
    optimizer: OptimizerSettings = OptimizerSettings()


class M2N2Settings(_Strict):
    """M2N2 over members stored as per-tensor coefficients of the sources (niches/m2n2.py,
    niches/coefficients.py). The switches are the paper's ablations."""

    max_evals: int = 200
    """Children evaluated (the sources themselves are evaluated first, outside the budget)."""
    population_size: int = 20
    alpha: float = 1.0
    crossover: bool = True
    split_point: bool = True
    attraction: bool = True
    split_at: Literal["tensor", "layer"] = "tensor"
    """Where split points may fall: any tensor boundary, or only between layers."""


class TaskSpec(_Strict):
    """A task defined in the config: a data set scored the way a built-in task is, e.g.
    EvoLLM-JP's fitness set (GSM8K test problems outside MGSM, in Japanese) from the Hub,
    which no built-in task names."""

    name: str
    data: str
    """`hf:DATASET_ID[:CONFIG]` (a `datasets` id) or a JSONL path, relative to the config file."""
    like: str
    """The built-in task whose prompt template, answer field, stop strings and token budget it uses."""
    split: Optional[str] = None
    """The data set's split (default: the section's `split`)."""


TaskEntry = Annotated[Union[Annotated[str, Tag("name")], Annotated[TaskSpec, Tag("spec")]],
                      Discriminator(lambda entry: "name" if isinstance(entry, str) else "spec")]
"""A task by name, or one defined in place (errors then point into the mapping, not at a name)."""


class TaskSettings(_Strict):
    tasks: list[TaskEntry]
    """Zoo task names, built-in benchmarks (mgsm_ja, gsm8k, ...), JSONL paths, or tasks
    defined here ({name, data, like, split})."""
    split: str
    limit: Optional[int] = None
    like: Optional[str] = None
    """Score JSONL tasks the way this built-in task does (its prompt template, answer
    field, stop strings, token budget), e.g. a Japanese GSM8K-style training set scored
    like `mgsm_ja_evollm`."""

    @property
    def names(self) -> list[str]:
        """The names the tasks' scores are reported under."""
        return [t.name if isinstance(t, TaskSpec) else Path(t).stem if t.endswith(".jsonl") else t
                for t in self.tasks]

    def resolve(self, zoo_dir: Path | None, base_dir: Path) -> list[Task]:
        from dataclasses import replace

        tasks = []
        for spec in self.tasks:
            if isinstance(spec, TaskSpec):
                local = not spec.data.startswith("hf:") and not Path(spec.data).is_absolute()
                task = replace(_builtin(spec.like), name=spec.name, data=str(base_dir / spec.data) if local
                               else spec.data, split=spec.split or self.split)
            elif spec.endswith(".jsonl"):
                path = Path(spec) if Path(spec).is_absolute() else base_dir / spec
                task = resolve_task(str(path), split=self.split)
                if self.like:
                    task = replace(_builtin(self.like), name=task.name, data=task.data, split=self.split)
            else:
                task = resolve_task(spec, zoo_dir=zoo_dir, split=self.split)
            tasks.append(task)
        return tasks


def _builtin(name: str) -> Task:
    from evaluation.tasks import BUILTIN_TASKS

    if name not in BUILTIN_TASKS:
        raise RecipeError(f"like: {name!r} is not a built-in task; known: {', '.join(sorted(BUILTIN_TASKS))}")
    return BUILTIN_TASKS[name]


class RunConfig(_Strict):
    method: Literal["ps", "dfs", "ps+dfs", "m2n2"]
    models: list[str]
    """The source models (paths, Hub ids, or zoo:NAME): DFS's default pool; the report
    scores each of them beside the evolved merge."""
    baselines: list[str] = []
    """More models to score in the report only (e.g. the base the sources came from)."""
    fitness: TaskSettings
    report: TaskSettings
    ps: Optional[PSSettings] = None
    dfs: Optional[DFSSettings] = None
    m2n2: Optional[M2N2Settings] = None
    zoo: Optional[str] = None
    """A zoo size (micro, small, real) or folder: `zoo:NAME` models and zoo task names."""
    seed: int = 0
    device: str = "auto"
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None
    """Dtype of the resident model that candidates are scored in (None: the checkpoint's)."""
    batch_size: int = 32
    threads: Optional[int] = None
    """torch CPU threads (None: torch's default, one per core). On a CPU shared with other
    work, more threads than free cores make small models many times slower (the threads
    spin waiting for each other): give the number of free cores."""
    paper_scores: dict[str, dict[str, float]] = {}
    """Published scores printed beside ours in the report, {report task: {row: score}}: a
    row is `evolved` (this run's merge), `ps` (ps+dfs: the PS merge) or a model of
    `models` or `baselines` as written there; scores on our scale (accuracy in 0-1)."""


@dataclass
class Stage:
    """One search: a genome over some models, the search's settings (CMA-ES or M2N2)."""

    name: str
    genome: RecipeGenome | DataflowGenome | CoefficientGenome
    settings: OptimizerSettings | M2N2Settings
    checkpoints: dict[str, Checkpoint]
    reference: str
    """The model the resident harness model starts as (same architecture as candidates)."""


@dataclass
class Outcome:
    """What a stage found."""

    name: str
    best_genome: np.ndarray
    best_fitness: float
    best_recipe: Recipe
    evaluations: int
    history: list[dict] = field(default_factory=list)


def load_config(path: str | Path) -> RunConfig:
    """Parse and validate a run config; errors name the line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise EvomergeError(f"cannot read run config {path}: {exc.strerror}") from exc
    data, root = load_yaml(text, str(path))
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        message = f"unknown key {error['loc'][-1]!r}" if error["type"] == "extra_forbidden" else error["msg"]
        raise RecipeError(f"{located(root, tuple(error['loc']), str(path))}: {message}") from None
    needs = {"ps": ["ps"], "dfs": ["dfs"], "ps+dfs": ["ps", "dfs"], "m2n2": ["m2n2"]}[config.method]
    for section in needs:
        if getattr(config, section) is None:
            raise RecipeError(f"{path}: method {config.method} needs a `{section}:` section")
    if config.method == "dfs" and PS_MODEL in (config.dfs.sources or []):
        raise RecipeError(f"{located(root, ('dfs', 'sources'), str(path))}: names `{PS_MODEL}` but method dfs "
                          "has no PS stage (method ps+dfs has)")
    rows = {"evolved", *config.models, *config.baselines} | ({PS_MODEL} if config.method == "ps+dfs" else set())
    for task, scores in config.paper_scores.items():
        if task not in config.report.names:
            raise RecipeError(f"{located(root, ('paper_scores', task), str(path))}: {task!r} is not a report task "
                              f"({', '.join(config.report.names)})")
        for row in scores:
            if row not in rows:
                raise RecipeError(f"{located(root, ('paper_scores', task, row), str(path))}: {row!r} is no row of "
                                  f"the report; rows: {', '.join(sorted(rows))}")
    return config


class RunFolder:
    """The files of one run; appends are line-atomic enough for JSONL (see read_jsonl)."""

    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()
        self.candidates_file = self.path / "candidates.jsonl"
        self.optimizer_file = self.path / "optimizer.jsonl"
        self.scores_file = self.path / "scores.jsonl"
        self.sessions_file = self.path / "sessions.jsonl"

    def start(self, config_text: str, template_text: str | None) -> None:
        """Record the config (first run) or check that a rerun gives the same one."""
        self.path.mkdir(parents=True, exist_ok=True)
        for name, text in (("config.yaml", config_text), ("template.yaml", template_text)):
            if text is None:
                continue
            stored = self.path / name
            if stored.is_file():
                if _normalised(stored.read_text()) != _normalised(text):
                    raise EvomergeError(f"run folder {self.path} was started with a different {name}; "
                                        "rerun with the config it was started with, or use a new --run-dir")
            else:
                _write_atomic(stored, text)

    def candidates(self, stage: str) -> list[dict]:
        return [row for row in read_jsonl(self.candidates_file) if row["stage"] == stage]

    def append(self, file: Path, row: dict) -> None:
        with file.open("a") as handle:
            handle.write(json.dumps(row) + "\n")


def evolve(config_path: str | Path, run_dir: str | Path, *, max_evals: int | None = None,
           progress: bool = True) -> dict:
    """Run (or resume) the evolution a config describes; return results.json's content."""
    import torch

    config = load_config(config_path)
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _evolve(config, Path(config_path), Path(run_dir), max_evals, progress)
    finally:
        torch.set_num_threads(threads)


def _evolve(config: RunConfig, config_path: Path, run_dir: Path, max_evals: int | None, progress: bool) -> dict:
    started = time.perf_counter()
    base_dir = config_path.parent
    zoo_dir = _zoo_dir(config.zoo, base_dir)
    resolve = _reference_resolver(zoo_dir, base_dir)
    template_text = _read_template(base_dir / config.ps.template, config_path) if config.ps else None
    fitness_tasks = config.fitness.resolve(zoo_dir, base_dir)
    report_tasks = config.report.resolve(zoo_dir, base_dir)
    models = [resolve(m) for m in config.models]
    # Build what can be built before the run folder is touched, so that a bad template or
    # DFS setting fails now, not after the PS stage's hours of work.
    ps_stage = (_ps_stage(config, base_dir / config.ps.template, template_text, resolve, max_evals)
                if config.method in ("ps", "ps+dfs") else None)
    if config.method == "ps+dfs":  # the PS merge has the architecture of the model its template merges onto
        _dfs_genome(config, _dfs_pool(config, resolve, str(ps_stage.checkpoints[ps_stage.reference].path)))
    dfs_stage = _dfs_stage(config, _dfs_pool(config, resolve, None), max_evals) if config.method == "dfs" else None
    folder = RunFolder(run_dir)
    folder.start(config_path.read_text(), template_text)
    stages: list[Stage] = []
    outcomes: list[Outcome] = []
    lineage: list[str] = []
    others: dict[str, str] = {}  # report rows besides the evolved merge: row key -> model folder or Hub id
    if ps_stage is not None:
        stages.append(ps_stage)
        outcomes.append(_search(ps_stage, config, folder, fitness_tasks, progress))
        lineage.append(f"PS: `{outcomes[-1].best_recipe.merge_method}` merge of "
                       f"{', '.join(f'`{m}`' for m in outcomes[-1].best_recipe.referenced_models())}, "
                       f"{ps_stage.genome.dimension} genes evolved by CMA-ES ({outcomes[-1].evaluations} evaluations)")
    if config.method == "ps+dfs":
        ps_dir = folder.path / "ps" / "best"
        _export(outcomes[0], ps_dir, config, notes=_card_notes(lineage, None, config))
        others[PS_MODEL] = str(ps_dir)
        dfs_stage = _dfs_stage(config, _dfs_pool(config, resolve, str(ps_dir)), max_evals)
    if dfs_stage is not None:
        stages.append(dfs_stage)
        outcomes.append(_search(dfs_stage, config, folder, fitness_tasks, progress))
        lineage.append(f"DFS: a path of {len(dfs_stage.genome.path(outcomes[-1].best_genome))} layers through "
                       f"{', '.join(f'`{m}`' for m in dfs_stage.genome.space.sources)} ({dfs_stage.genome.space.repeats} "
                       f"repeats, scales {dfs_stage.genome.scales}), {dfs_stage.genome.dimension} genes evolved by "
                       f"CMA-ES ({outcomes[-1].evaluations} evaluations)")
    if config.method == "m2n2":
        stage = _m2n2_stage(config, models, folder, max_evals)
        stages.append(stage)
        outcomes.append(_m2n2_search(stage, config, folder, fitness_tasks, progress))
        settings = config.m2n2
        lineage.append(f"M2N2: an archive of {settings.population_size} members, each a per-tensor linear "
                       f"combination of {', '.join(f'`{m}`' for m in models)}, evolved by SLERP crossovers "
                       f"(split points at {settings.split_at} boundaries{'' if settings.split_point else ', off'}; "
                       f"attraction {'on' if settings.attraction else 'off'}; alpha {settings.alpha}) over "
                       f"{outcomes[-1].evaluations} child evaluations")
    final = outcomes[-1]
    others.update({m: m for m in models + [resolve(m) for m in config.baselines]})
    report = _report(final, others, config, folder, report_tasks, progress)
    results = {
        "method": config.method,
        "stages": {o.name: {"best_fitness": o.best_fitness, "evaluations": o.evaluations,
                            "best_genome": o.best_genome.tolist(), "best_recipe": o.best_recipe.model_dump(
                                mode="json", exclude_none=True)} for o in outcomes},
        "report": {"split": config.report.split, "limit": config.report.limit, "scores": report,
                   "paper": _paper_rows(config, resolve)},
    }
    _export(final, folder.path / "best", config, notes=_card_notes(lineage, results, config))
    from niches.plots import plot_run

    plot_run(folder.path / "plots", [(s.genome, o) for s, o in zip(stages, outcomes)])
    folder.append(folder.sessions_file, {"seconds": round(time.perf_counter() - started, 1)})
    # wall time of the invocations that finished (a killed one's time is not recorded)
    results["wall_seconds"] = sum(row["seconds"] for row in read_jsonl(folder.sessions_file))
    _write_atomic(folder.path / "results.json", json.dumps(results, indent=2) + "\n")
    return results


def _paper_rows(config: RunConfig, resolve: Callable[[str], str]) -> dict[str, dict[str, float]]:
    """The config's paper_scores keyed like the report's rows: {row key: {task: score}}."""
    rows: dict[str, dict[str, float]] = {}
    for task, scores in config.paper_scores.items():
        for row, score in scores.items():
            rows.setdefault(row if row in ("evolved", PS_MODEL) else resolve(row), {})[task] = score
    return rows


def _read_template(path: Path, config_path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise EvomergeError(f"{config_path}: ps.template {path}: {exc.strerror}") from None


def _ps_stage(config: RunConfig, template_path: Path, template_text: str, resolve: Callable[[str], str],
              max_evals: int | None) -> Stage:
    genome = _ps_genome(template_path, template_text, resolve)
    recipe = genome.decode(genome.x0)
    checkpoints = {ref: Checkpoint(ref, resolve_model_path(ref)) for ref in recipe.referenced_models()}
    reference = recipe.base_model or recipe.referenced_models()[0]
    return Stage("ps", genome, _budget(config.ps.optimizer, max_evals), checkpoints, reference)


def _ps_genome(template_path: Path, template_text: str, resolve: Callable[[str], str]) -> RecipeGenome:
    data, root = load_yaml(template_text, str(template_path))
    if not isinstance(data, dict):
        raise RecipeError(f"{template_path}: a recipe template is a YAML mapping")
    _resolve_models(data, resolve)
    first = data.get("base_model") or next(iter((data.get("models") or [{}])), {}).get("model")
    if first is None and data.get("slices"):
        first = data["slices"][0]["sources"][0]["model"]
    if not isinstance(first, str):
        raise RecipeError(f"{template_path}: the template names no model")
    with closing(Checkpoint(first, resolve_model_path(first))) as checkpoint:
        layout = LayerLayout.of(checkpoint)
    return RecipeGenome(data, root, str(template_path), layout)


def _dfs_pool(config: RunConfig, resolve: Callable[[str], str], ps_model: str | None) -> list[str]:
    """The DFS stage's models, model 0 first, with `ps` standing for `ps_model` (the PS
    merge's folder, or a model of its architecture while the merge does not exist yet)."""
    pool = config.dfs.sources or ([PS_MODEL] if config.method == "ps+dfs" else []) + config.models
    return [ps_model if m == PS_MODEL else resolve(m) for m in pool]


def _dfs_genome(config: RunConfig, pool: list[str]) -> DataflowGenome:
    settings = config.dfs
    space = DataflowSpace(pool, repeats=settings.repeats)
    return DataflowGenome(space, scales=settings.scales, scale_bounds=settings.scale_bounds, init=settings.init)


def _dfs_stage(config: RunConfig, pool: list[str], max_evals: int | None) -> Stage:
    checkpoints = {ref: Checkpoint(ref, resolve_model_path(ref)) for ref in pool}
    return Stage("dfs", _dfs_genome(config, pool), _budget(config.dfs.optimizer, max_evals), checkpoints, pool[0])


def _m2n2_stage(config: RunConfig, models: list[str], folder: RunFolder, max_evals: int | None) -> Stage:
    checkpoints = {ref: Checkpoint(ref, resolve_model_path(ref)) for ref in models}
    gram = SourceGram.load_or_compute(folder.path / "m2n2_gram.safetensors", [checkpoints[m] for m in models])
    return Stage("m2n2", CoefficientGenome(gram), _budget(config.m2n2, max_evals), checkpoints, models[0])


def _budget(settings, max_evals: int | None):
    return settings if max_evals is None else settings.model_copy(update={"max_evals": max_evals})


class Candidates:
    """A stage's candidates: evaluated through the harness and logged, or, when a resumed
    run reaches one that was logged before, replayed from the log after checking that the
    search asked for the same genome (per-example scores then come from the score cache,
    without a forward pass)."""

    def __init__(self, stage: Stage, config: RunConfig, folder: RunFolder, tasks: list[Task], progress: bool,
                 total: int):
        from tqdm.auto import tqdm

        self.stage, self.config, self.folder, self.tasks = stage, config, folder, tasks
        self.logged = {(row["kind"], row["index"]): row for row in folder.candidates(stage.name)}
        _check_sources(stage, folder, len(self.logged))
        self.history: list[dict] = []
        self.best_fitness = -math.inf
        self._harness: Harness | None = None
        self._next = {}  # kind -> index of its next candidate
        # replayed samples cost no time: the bar starts past them, so its rate and time left are the real ones
        replayed = sum(kind == "sample" for kind, _ in self.logged)
        self.bar = tqdm(total=total, initial=min(replayed, total), desc=f"{stage.name} evaluations",
                        disable=not progress, unit="cand", dynamic_ncols=True)

    def evaluate(self, genome: np.ndarray, generation: int, kind: str = "sample",
                 per_example: bool = False) -> tuple[dict, np.ndarray | None]:
        """The logged row of a candidate, and its per-example scores over all fitness tasks
        (concatenated) when asked for."""
        if kind == "mean":  # a run extended with --max-evals ends at another mean: match by genome
            same = [row for (k, _), row in self.logged.items() if k == kind]
            matches = [row for row in same if np.allclose(row["genome"], genome, rtol=0, atol=1e-12)]
            index = matches[0]["index"] if matches else len(same)
        else:
            index = self._next.get(kind, 0)
            self._next[kind] = index + 1
        recipe = self.stage.genome.decode(genome)
        row = self.logged.get((kind, index))
        if row is not None:
            if row["generation"] != generation or not np.allclose(row["genome"], genome, rtol=0, atol=1e-12):
                raise EvomergeError(
                    f"{self.folder.candidates_file}: {kind} {index} of stage {self.stage.name} does not replay "
                    "(the logged genome differs from the one the search asks for now); the run was made with "
                    "other settings or another version. Use a new --run-dir")
            results = self._score(recipe) if per_example else None
            fresh = False
        else:
            fresh = True
            start = time.perf_counter()
            results = self._score(recipe)
            row = {"stage": self.stage.name, "kind": kind, "index": index, "generation": generation,
                   "genome": np.asarray(genome).ravel().tolist(), "recipe_hash": _recipe_hash(recipe, self.stage, self.config),
                   "scores": {name: r.mean for name, r in results.items()}, "fitness": _fitness(results),
                   "seconds": round(time.perf_counter() - start, 3)}
            self.folder.append(self.folder.candidates_file, row)
        self.history.append(row)
        self.best_fitness = max(self.best_fitness, row["fitness"])
        if kind == "sample":
            self.bar.update(int(fresh))
            self.bar.set_postfix(best=f"{self.best_fitness:.4f}", refresh=False)
        scores = np.concatenate([results[t.name].scores for t in self.tasks]) if per_example else None
        return row, scores

    def _score(self, recipe: Recipe) -> dict[str, TaskResult]:
        if self._harness is None:
            self._harness = _harness(self.stage.checkpoints[self.stage.reference].path, self.config, self.folder)
        return self._harness.score_recipe(recipe, self.stage.checkpoints, self.tasks, limit=self.config.fitness.limit,
                                          seed=self.config.seed)

    def close(self) -> None:
        self.bar.close()
        for checkpoint in self.stage.checkpoints.values():
            checkpoint.close()

    def outcome(self, evaluations: int) -> Outcome:
        """The best candidate by fitness over everything evaluated."""
        best = max(self.history, key=lambda row: row["fitness"])
        genome = np.asarray(best["genome"])
        return Outcome(self.stage.name, genome, best["fitness"], self.stage.genome.decode(genome), evaluations,
                       self.history)


def _check_sources(stage: Stage, folder: RunFolder, logged: int) -> None:
    """Record the identity of the stage's source checkpoints, and refuse to replay logged
    fitness measured on a source that has changed since (a replay checks genomes, which
    stay the same when a model under them is rewritten)."""
    record = folder.path / "sources.json"
    recorded = json.loads(record.read_text()) if record.is_file() else {}
    now = {ref: checkpoint_hash(checkpoint.path) for ref, checkpoint in stage.checkpoints.items()}
    before = recorded.get(stage.name)
    if before == now:
        return
    changed = [ref for ref in now if before is not None and before.get(ref) != now[ref]]
    if logged and changed:
        raise EvomergeError(
            f"{folder.path}: the {stage.name} stage's {logged} logged candidates were scored with "
            f"{', '.join(changed)} as it was then, and it has been rewritten since (as ps/best is when the PS stage "
            "of a ps+dfs run, extended with --max-evals, finds a new best), so their fitness cannot be replayed. "
            "Use a new --run-dir; to keep the new model, copy it out first and name it in the new config")
    recorded[stage.name] = now
    _write_atomic(record, json.dumps(recorded, indent=2) + "\n")


def _search(stage: Stage, config: RunConfig, folder: RunFolder, tasks: list[Task], progress: bool) -> Outcome:
    """CMA-ES over the stage's genome; the distribution mean is evaluated at the end."""
    settings = stage.settings
    optimizer = CMAES(stage.genome.x0, settings.sigma0, bounds=(0.0, 1.0), popsize=settings.popsize,
                      seed=config.seed, separable=settings.separable, restarts=settings.restarts,
                      max_evals=settings.max_evals)
    logged_generations = {row["generation"] for row in read_jsonl(folder.optimizer_file)
                          if row["stage"] == stage.name}
    candidates = Candidates(stage, config, folder, tasks, progress, settings.max_evals)
    try:
        while not optimizer.stop():
            genomes = optimizer.ask()
            generation = optimizer.generation
            rows = [candidates.evaluate(genome, generation)[0] for genome in genomes]
            optimizer.tell(genomes, [row["fitness"] for row in rows])
            if optimizer.generation not in logged_generations:
                folder.append(folder.optimizer_file, {"stage": stage.name, **optimizer.state()})
        # under noisy fitness the distribution mean often beats the best single sample
        candidates.evaluate(optimizer.mean, optimizer.generation, kind="mean")
    finally:
        candidates.close()
    return candidates.outcome(optimizer.evaluations)


def _m2n2_search(stage: Stage, config: RunConfig, folder: RunFolder, tasks: list[Task], progress: bool) -> Outcome:
    """M2N2 over coefficient members (niches/coefficients.py): the sources are the seeds
    (evaluated outside the budget, as in the reference), then one child per evaluation."""
    from niches.m2n2 import NaturalNiches

    settings: M2N2Settings = stage.settings
    genome: CoefficientGenome = stage.genome
    gram = genome.gram
    search = NaturalNiches(settings.population_size, alpha=settings.alpha, crossover=settings.crossover,
                           split_point=settings.split_point, attraction=settings.attraction,
                           n_params=int(gram.sizes.sum()), allowed_boundaries=gram.boundaries(settings.split_at),
                           crossover_fn=lambda a, b, w, split: slerp_split_members(a, b, w, split, gram),
                           seed=config.seed)
    candidates = Candidates(stage, config, folder, tasks, progress, settings.max_evals)
    try:
        for source in range(len(gram.sources)):
            member = gram.one_hot(source)
            _, scores = candidates.evaluate(member.ravel(), -1, kind="seed", per_example=True)
            search.tell(member, _check_resources(scores, tasks))
        for step in range(settings.max_evals):
            child = search.ask()
            row, scores = candidates.evaluate(child.ravel(), step, per_example=True)
            slot = search.tell(child, _check_resources(scores, tasks))
            if ("sample", step) not in candidates.logged:
                folder.append(folder.optimizer_file, {
                    "stage": stage.name, "generation": step + 1, "evaluations": search.evaluations,
                    "slot": slot, "archive_size": len(search.members),
                    "archive_mean_scores": search.scores.mean(axis=1).tolist()})
    finally:
        candidates.close()
    # M2N2's answer is the archive member best on the training data
    best = search.best().ravel()
    row = next(r for r in reversed(candidates.history) if np.allclose(r["genome"], best, rtol=0, atol=1e-12))
    return Outcome(stage.name, best, row["fitness"], genome.decode(best), settings.max_evals, candidates.history)


def _check_resources(scores: np.ndarray, tasks: list[Task]) -> np.ndarray:
    if (scores < 0).any():
        raise EvomergeError(f"M2N2 shares per-example scores as resources, so they must be >= 0; tasks "
                            f"{', '.join(t.name for t in tasks)} give negative ones (perplexity tasks do)")
    return scores


def _harness(template: Path, config: RunConfig, folder: RunFolder) -> Harness:
    import torch

    dtype = getattr(torch, config.dtype) if config.dtype else None
    return Harness(template, device=config.device, cache=folder.scores_file, batch_size=config.batch_size,
                   dtype=dtype)


def _fitness(results: dict[str, TaskResult]) -> float:
    """Mean over fitness tasks of the task's mean score."""
    return float(np.mean([r.mean for r in results.values()]))


def _recipe_hash(recipe: Recipe, stage: Stage, config: RunConfig) -> str:
    return candidate_hash(recipe, {ref: ck.path for ref, ck in stage.checkpoints.items()}, config.seed)


def _report(final: Outcome, others: dict[str, str], config: RunConfig, folder: RunFolder, tasks: list[Task],
            progress: bool) -> dict[str, dict[str, dict]]:
    """Report-split scores of the evolved merge and of every other row (row key -> model)."""
    from merging.engine import open_models

    report: dict[str, dict[str, dict]] = {}
    recipe = final.best_recipe
    checkpoints = open_models(recipe)
    first = recipe.base_model or recipe.referenced_models()[0]
    harness = _harness(checkpoints[first].path, config, folder)
    try:
        results = harness.score_recipe(recipe, checkpoints, tasks, limit=config.report.limit, seed=config.seed)
    finally:
        for checkpoint in checkpoints.values():
            checkpoint.close()
    report["evolved"] = {name: _summary(r) for name, r in results.items()}
    for key, model in others.items():
        if progress:
            print(f"scoring {model} on {', '.join(t.name for t in tasks)}", flush=True)
        harness = _harness(resolve_model_path(model), config, folder)
        report[key] = {name: _summary(r) for name, r in harness.score_resident(tasks, limit=config.report.limit).items()}
    return report


def _summary(result: TaskResult) -> dict:
    return {"mean": result.mean, "stderr": result.stderr, "n": len(result.scores)}


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
    return f"`{key}`" if markdown else Path(key).name


def _export(outcome: Outcome, out_dir: Path, config: RunConfig, *, notes: str) -> None:
    """Write a stage's best candidate as a checkpoint (atomically, replacing an older one).
    When the checkpoint there already holds this recipe (a resumed or extended run whose
    best did not change), only its card is brought up to date: rewriting the weights would
    change the checkpoint's identity, and a DFS stage over it would refuse its own log."""
    from merging.engine import merge_to_disk, open_models, plan_merge

    recipe = outcome.best_recipe
    card = out_dir / "README.md"
    text = card.read_text() if card.is_file() else ""
    head, marker, _ = text.partition("\n## Evolution\n")  # the notes end the card (merging/card.py)
    if marker and recipe.to_yaml().strip() in head:
        if text != f"{head}\n{notes.strip()}\n":
            _write_atomic(card, f"{head}\n{notes.strip()}\n")
        return
    plan = plan_merge(recipe, open_models(recipe))
    try:
        merge_to_disk(plan, out_dir, seed=config.seed, overwrite=True, card_notes=notes)
    finally:
        plan.close()


def _card_notes(lineage: list[str], results: dict | None, config: RunConfig) -> str:
    lines = ["## Evolution", "", "Made by `evomerge evolve` (method `" + config.method + "`, seed "
             f"{config.seed}); fitness: mean of {', '.join(config.fitness.names)} ({config.fitness.split} split"
             f"{f', first {config.fitness.limit} examples' if config.fitness.limit else ''}).", ""]
    lines += [f"{i + 1}. {step}" for i, step in enumerate(lineage)]
    if results:
        lines += ["", f"## Scores ({config.report.split} split, mean ± standard error)", "",
                  report_table(results, markdown=True)]
    return "\n".join(lines) + "\n"


# --- model references ---------------------------------------------------------------

def _zoo_dir(zoo: str | None, base_dir: Path) -> Path | None:
    if zoo is None:
        return None
    from evaluation.zoo import SIZES, ZOO_HOME

    if zoo in SIZES or zoo == "real":
        path = ZOO_HOME / zoo
        hint = f"build it with `evomerge zoo build --size {zoo}`"
    else:
        path = Path(zoo).expanduser()
        path = path if path.is_absolute() else base_dir / path
        hint = "build one with `evomerge zoo build --out FOLDER`"
    if not (path / "zoo.json").is_file():
        raise EvomergeError(f"zoo {zoo!r}: no zoo at {path}; {hint}")
    return path


def _reference_resolver(zoo_dir: Path | None, base_dir: Path) -> Callable[[str], str]:
    """`zoo:NAME` -> the zoo's model folder; a relative folder that exists beside the
    config -> its absolute path; anything else (absolute folders, Hub ids) unchanged."""
    def resolve(reference: str) -> str:
        if reference.startswith("zoo:"):
            if zoo_dir is None:
                raise EvomergeError(f"model {reference!r}: the config sets no `zoo:`")
            name = reference[4:]
            path = zoo_dir / "models" / name
            if not path.is_dir():
                known = sorted(p.name for p in (zoo_dir / "models").iterdir())
                raise EvomergeError(f"model {reference!r}: the zoo at {zoo_dir} has no model {name!r}; "
                                    f"it has {', '.join(known)}")
            return str(path.resolve())
        local = Path(reference).expanduser()
        if not local.is_absolute() and (base_dir / local).is_dir():
            return str((base_dir / local).resolve())
        return str(local.resolve()) if local.is_dir() else reference
    return resolve


def _resolve_models(data: dict, resolve: Callable[[str], str]) -> None:
    """Rewrite a template's model references in place (before it becomes a genome)."""
    if isinstance(data.get("base_model"), str):
        data["base_model"] = resolve(data["base_model"])
    for source in data.get("models") or []:
        if isinstance(source, dict) and isinstance(source.get("model"), str):
            source["model"] = resolve(source["model"])
    for slice_ in data.get("slices") or []:
        if isinstance(slice_, dict):
            if isinstance(slice_.get("base_model"), str):
                slice_["base_model"] = resolve(slice_["base_model"])
            for source in slice_.get("sources") or []:
                if isinstance(source, dict) and isinstance(source.get("model"), str):
                    source["model"] = resolve(source["model"])
    if data.get("tokenizer_source") not in (None, "base", "union"):
        data["tokenizer_source"] = resolve(data["tokenizer_source"])


def _normalised(text: str) -> Any:
    return yaml.safe_load(text)


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    temporary.replace(path)

