"""The run config of `evomerge evolve`: its schema, its validation, and what its names mean.

Every setting is checked here, when the config is read, before a run folder exists: a bad
value is refused with the config line at fault (a typo'd key is named, with the known key
it is nearest to), so no run folder is left behind holding a config that cannot run.
Model names are folders, Hub ids or `zoo:NAME`; `References` turns them into paths and,
for what a run writes (cards, results.json), back into the names the config used.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from evaluation.tasks import Task, resolve_task
from evaluation.zoo import find_zoo
from merging.checkpoint import ZOO_PREFIX, zoo_model_path
from merging.errors import EvomergeError, RecipeError
from merging.recipe import load_yaml, located, unknown_key_message

PS_MODEL = "ps"
"""In a ps+dfs config's `dfs.sources`, the PS stage's best merge."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OptimizerSettings(_Strict):
    """The search over the unit box of genes: CMA-ES (niches/cmaes.py), or uniform random
    genomes at the same budget (niches/baselines.py RandomSearch), the baseline a search
    has to beat."""

    search: Literal["cmaes", "random"] = "cmaes"
    max_evals: int = Field(100, ge=1)
    popsize: Optional[int] = Field(None, ge=2)
    """Candidates per generation (random search: per batch); default pycma's 4 + 3 ln n."""
    sigma0: float = Field(0.2, gt=0, le=1)
    restarts: int = Field(0, ge=0)
    separable: Union[bool, Literal["auto"]] = "auto"
    evaluate_start: bool = True
    """Evaluate the starting genome (the template's `init` values; DFS: model A's layers in
    order) with the first generation, outside the budget: the stage's best is then never
    worse than where it started (in ps+dfs, the PS merge itself), and the log says whether
    the search improved on it."""


class PSSettings(_Strict):
    template: str
    """Recipe template with free markers (niches/genome.py), relative to the config file."""
    optimizer: OptimizerSettings = OptimizerSettings()


class DFSSettings(_Strict):
    sources: Optional[list[str]] = Field(None, min_length=1)
    """Models laid out in the slots, model 0 first (it gives embeddings, first and last
    layer). In ps+dfs, `ps` names the PS merge; default: the PS merge, then `models`."""
    repeats: int = Field(2, ge=1)
    scales: Literal["layer_pairs", "model_pairs", "none"] = "layer_pairs"
    scale_bounds: tuple[float, float] = (0.5, 2.0)
    init: Literal["first_model", "uniform"] = "first_model"
    optimizer: OptimizerSettings = OptimizerSettings()

    @model_validator(mode="after")
    def _bounds(self) -> "DFSSettings":
        low, high = self.scale_bounds
        if not 0 < low < 1 < high:
            raise ValueError(f"scale_bounds must satisfy 0 < low < 1 < high, got {list(self.scale_bounds)}")
        return self


class M2N2Settings(_Strict):
    """M2N2 over members stored as per-tensor coefficients of the sources (niches/m2n2.py,
    niches/coefficients.py). The switches are the paper's ablations."""

    max_evals: int = Field(200, ge=1)
    """Children evaluated (the sources themselves are evaluated first, outside the budget)."""
    population_size: int = Field(20, ge=1)
    alpha: float = Field(1.0, ge=0)
    crossover: bool = True
    split_point: bool = True
    attraction: bool = True
    split_at: Literal["tensor", "layer"] = "tensor"
    """Where split points may fall: any tensor boundary, or only between layers."""
    children_per_ask: int = Field(1, ge=1)
    """Children drawn from one archive state and scored together (set it to the workers of a
    pool or Ray executor to keep them busy); 1, the paper's loop, scores one at a time."""


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
    bos: Optional[bool] = None
    """Whether generation prompts start with the BOS token (default: `like`'s setting, which
    without one is where the tokenizer adds it by default, as HF pipelines and vLLM do)."""


TaskEntry = Annotated[Union[Annotated[str, Tag("name")], Annotated[TaskSpec, Tag("spec")]],
                      Discriminator(lambda entry: "name" if isinstance(entry, str) else "spec")]
"""A task by name, or one defined in place (errors then point into the mapping, not at a name)."""


class TaskSettings(_Strict):
    tasks: list[TaskEntry] = Field(min_length=1)
    """Zoo task names, built-in benchmarks (mgsm_ja, gsm8k, ...), JSONL paths, or tasks
    defined here ({name, data, like, split})."""
    split: str
    limit: Optional[int] = Field(None, ge=1)
    like: Optional[str] = None
    """Score JSONL tasks the way this built-in task does (its prompt template, answer
    field, stop strings, token budget), e.g. a Japanese GSM8K-style training set scored
    like `mgsm_ja_evollm`."""

    @model_validator(mode="after")
    def _distinct_names(self) -> "TaskSettings":
        """Scores are reported by task name: two tasks of one name would keep one's scores."""
        repeated = sorted({name for name in self.names if self.names.count(name) > 1})
        if repeated:
            raise ValueError(f"tasks {', '.join(map(repr, repeated))} named twice; give each task its own "
                             "name (a JSONL task is named by its file name without .jsonl)")
        return self

    @property
    def names(self) -> list[str]:
        """The names the tasks' scores are reported under."""
        return [t.name if isinstance(t, TaskSpec) else Path(t).stem if t.endswith(".jsonl") else t
                for t in self.tasks]

    def resolve(self, zoo_dir: Path | None, base_dir: Path) -> list[Task]:
        tasks = []
        for spec in self.tasks:
            if isinstance(spec, TaskSpec):
                local = not spec.data.startswith("hf:") and not Path(spec.data).is_absolute()
                task = replace(_builtin(spec.like), name=spec.name, data=str(base_dir / spec.data) if local
                               else spec.data, split=spec.split or self.split)
                if spec.bos is not None:
                    task = replace(task, bos=spec.bos)
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
    models: list[str] = Field(min_length=1)
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
    seed: int = Field(0, ge=0)
    device: str = "auto"
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None
    """Dtype of the resident model that candidates are scored in, and of the exported merge
    (None: bfloat16 on a GPU, the checkpoint's on the CPU)."""
    batch_size: int = Field(32, ge=1)
    threads: Optional[int] = Field(None, ge=1)
    """torch CPU threads (None: torch's default, one per core). On a CPU shared with other
    work, more threads than free cores make small models many times slower (the threads
    spin waiting for each other): give the number of free cores."""
    executor: Literal["serial", "pool", "ray"] = "serial"
    """What scores the candidates (evaluation/executors/): `serial` in this process, `pool`
    worker processes on this machine, `ray` Ray actors (a local cluster, or `ray_address`)."""
    workers: Optional[int] = Field(None, ge=1)
    """Workers of a pool or on Ray (None: `workers_per_gpu` per GPU on CUDA, else 2); each
    keeps one resident model and gets `threads` / `workers` CPU threads."""
    workers_per_gpu: int = Field(1, ge=1)
    """Workers sharing one GPU (small models leave a GPU idle between kernels: two or more
    workers fill it)."""
    ray_address: Optional[str] = None
    """The Ray cluster to join (`auto`, or HOST:PORT of its head); None: a local cluster
    started for the run."""
    sources: Literal["auto", "device", "host"] = "auto"
    """Where each worker keeps the source models: `device` (read once onto its device),
    `host` (memory-mapped, streamed per candidate), `auto` (on a GPU when they take at most
    half of its free memory, else host; evaluation/executors/worker.py, Worker.place_sources)."""
    max_failures: int = Field(5, ge=0)
    """Candidates that may fail in a row (out of memory, NaN logits, a build error: each is
    logged with its error and ranked last) before the run stops."""
    paper_scores: dict[str, dict[str, float]] = {}
    """Published scores printed beside ours in the report, {report task: {row: score}}: a
    row is `evolved` (this run's merge), `ps` (ps+dfs: the PS merge) or a model of
    `models` or `baselines` as written there; scores on our scale (accuracy in 0-1)."""


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
        # an unknown key first: a typo'd `fitnes:` also makes `fitness` missing, and the
        # typo is what the user has to fix
        errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        error = errors[0]
        # without the tag pydantic puts after a list index for TaskEntry's two forms
        loc = tuple(part for i, part in enumerate(error["loc"])
                    if not (i and isinstance(error["loc"][i - 1], int) and part in ("name", "spec")))
        if error["type"] == "extra_forbidden":
            message = unknown_key_message(RunConfig, loc)
        else:
            message = error["msg"]
        raise RecipeError(f"{located(root, loc, str(path))}: {message}") from None
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


# --- model references ---------------------------------------------------------------

class References:
    """What the config's model names mean: `zoo:NAME` -> the zoo's model folder; a
    relative folder that exists beside the config -> its absolute path; anything else
    (absolute folders, Hub ids) unchanged. `written` maps a resolved path back to the
    name as the config wrote it, for what the run writes for people (cards, results)."""

    def __init__(self, zoo: str | None, base_dir: Path):
        self.base_dir = base_dir
        self.zoo_dir = None if zoo is None else find_zoo(zoo, base_dir)
        self._written: dict[str, str] = {}

    def resolve(self, reference: str) -> str:
        if reference.startswith(ZOO_PREFIX):
            if self.zoo_dir is None:
                raise EvomergeError(f"model {reference!r}: the config sets no `zoo:`")
            path = zoo_model_path(reference, self.zoo_dir)
            resolved = str(path.resolve())
            self._written[resolved] = reference
            return resolved
        local = Path(reference).expanduser()
        if not local.is_absolute() and (self.base_dir / local).is_dir():
            return str((self.base_dir / local).resolve())
        return str(local.resolve()) if local.is_dir() else reference

    def written(self, reference: str) -> str:
        """A resolved reference as the config named it (`zoo:lang`, not the cache path)."""
        return self._written.get(reference, reference)

    def in_text(self, text: str) -> str:
        """`text` with every resolved zoo path written back as its `zoo:` name (longest first,
        so that a path that extends another is not cut)."""
        for path in sorted(self._written, key=len, reverse=True):
            text = text.replace(path, self._written[path])
        return text

    def in_template(self, data: dict) -> None:
        """Resolve a recipe template's model references in place (before it becomes a genome)."""
        if isinstance(data.get("base_model"), str):
            data["base_model"] = self.resolve(data["base_model"])
        for source in data.get("models") or []:
            if isinstance(source, dict) and isinstance(source.get("model"), str):
                source["model"] = self.resolve(source["model"])
        for slice_ in data.get("slices") or []:
            if isinstance(slice_, dict):
                if isinstance(slice_.get("base_model"), str):
                    slice_["base_model"] = self.resolve(slice_["base_model"])
                for source in slice_.get("sources") or []:
                    if isinstance(source, dict) and isinstance(source.get("model"), str):
                        source["model"] = self.resolve(source["model"])
        if data.get("tokenizer_source") not in (None, "base", "union"):
            data["tokenizer_source"] = self.resolve(data["tokenizer_source"])
        tokenizer = data.get("tokenizer")
        if isinstance(tokenizer, dict):
            self._in_tokenizer(tokenizer)

    def _in_tokenizer(self, tokenizer: dict) -> None:
        """The models of a `tokenizer:` block: its `source` and each token's row source
        (`source: MODEL`, or `{kind: model_token, model: MODEL, ...}`)."""
        if isinstance(tokenizer.get("source"), str) and tokenizer["source"] not in ("base", "union"):
            tokenizer["source"] = self.resolve(tokenizer["source"])
        for entry in (tokenizer.get("tokens") or {}).values() if isinstance(tokenizer.get("tokens"), dict) else ():
            source = entry.get("source") if isinstance(entry, dict) else None
            if isinstance(source, str):
                entry["source"] = self.resolve(source)
            elif isinstance(source, dict) and isinstance(source.get("model"), str):
                source["model"] = self.resolve(source["model"])
