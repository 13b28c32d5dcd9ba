"""The fitness harness: turn a recipe into scores without a disk round trip, once.

A search scores thousands of candidates that share one architecture. Loading each from
disk would dominate the run, so the harness keeps one model resident on the device
and writes each candidate's merged tensors into its parameters in place, straight from
the merge engine. A candidate is identified by the content hash of its resolved recipe
(the recipe, the resolved model folders and the seed); scores are cached per
(candidate, task settings) in a JSONL file, so a candidate is never scored twice on the
same task, even across a killed and resumed run.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from evaluation.scoring import evaluate
from evaluation.tasks import Task, TaskResult
from merging.engine import iter_merged, output_config, plan_merge, resolve_device
from merging.errors import EvomergeError
from merging.recipe import Recipe


def candidate_hash(recipe: Recipe, model_paths: dict[str, Path], seed: int) -> str:
    """Content identity of a candidate: same recipe, same sources, same seed -> same hash.

    A source is identified by its `checkpoint_hash` (path, weight file sizes and times),
    not its path alone: a model rebuilt in place must not reuse the old model's scores."""
    payload = json.dumps({
        "recipe": recipe.model_dump(mode="json", exclude_none=True),
        "models": {ref: checkpoint_hash(path) for ref, path in sorted(model_paths.items())},
        "seed": seed,
    }, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def checkpoint_hash(path: str | Path) -> str:
    """Identity of a checkpoint folder on disk: its resolved path and its weight files'
    sizes and modification times (hashing the bytes of a 7B model would take minutes)."""
    path = Path(path).resolve()
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                   for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
    return hashlib.sha256(json.dumps([str(path), files]).encode()).hexdigest()[:20]


def task_key(task: Task, limit: int | None) -> str:
    """Everything about a task that changes its scores (data, split, prompt, decoding)."""
    return hashlib.sha256(json.dumps([asdict(task), limit], sort_keys=True).encode()).hexdigest()[:16]


def read_jsonl(path: Path) -> list[dict]:
    """The rows of an append-only JSONL log, after cutting off a last line that a kill
    left unfinished (so the next append starts on a fresh line instead of gluing itself
    to the fragment and being lost with it)."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        with path.open("r+b") as handle:
            handle.truncate(len(data))
    rows = []
    for line in data.decode().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # written by an older version that did not repair: skip
            continue
    return rows


class ScoreCache:
    """Append-only JSONL of per-example scores keyed by (candidate, task settings)."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self._entries: dict[tuple[str, str], TaskResult] = {}
        for row in read_jsonl(self.path) if self.path else []:
            self._entries[(row["candidate"], row["task_key"])] = TaskResult(row["task"], row["scores"])

    def get(self, candidate: str, key: str) -> TaskResult | None:
        return self._entries.get((candidate, key))

    def put(self, candidate: str, key: str, result: TaskResult) -> None:
        self._entries[(candidate, key)] = result
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as handle:
                handle.write(json.dumps({"candidate": candidate, "task_key": key, "task": result.task,
                                         "scores": result.scores}) + "\n")

    def __len__(self) -> int:
        return len(self._entries)


@dataclass
class Timings:
    """Where a candidate's time went (seconds), for benchmarks and run logs."""

    plan: float = 0.0
    """Resolving the recipe into a per-tensor plan (headers only)."""
    merge: float = 0.0
    """Computing the merged tensors and copying them into the resident model."""
    evaluate: dict[str, float] = field(default_factory=dict)
    new_tokens: dict[str, int] = field(default_factory=dict)
    """Tokens generated per task (generation tasks), for tokens per second."""
    cached: list[str] = field(default_factory=list)


class Harness:
    """Scores recipes (merged into a resident model) and checkpoints on tasks."""

    def __init__(self, template: str | Path, *, device: str = "auto", cache: str | Path | None = None,
                 batch_size: int = 32, dtype: torch.dtype | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = resolve_device(device)
        self.dtype = dtype
        self.batch_size = batch_size
        self.template = Path(template)
        self.tokenizer = AutoTokenizer.from_pretrained(self.template)
        self.model = AutoModelForCausalLM.from_pretrained(self.template, dtype=dtype).to(self.device).eval()
        self.cache = ScoreCache(cache)
        self.resident: str | None = checkpoint_hash(self.template)
        """Identity of the weights in the resident model now (template or candidate)."""
        self.forward_passes = 0
        self.model.register_forward_pre_hook(self._count)
        self.last_timings = Timings()

    def _count(self, *_):
        self.forward_passes += 1

    def load_candidate(self, plan, *, seed: int = 0) -> None:
        """Write a planned merge into the resident model, tensor by tensor, on the device.

        A plan whose depth differs from the resident model's (layer stacking) gets a
        fresh model of the new shape first.
        """
        from transformers import AutoConfig, AutoModelForCausalLM

        from merging.architecture import num_layers_key

        config = output_config(plan)
        if config[num_layers_key(config)] != self.model.config.num_hidden_layers:
            with torch.device(self.device):
                self.model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config),
                                                              dtype=self.dtype).eval()
            self.model.register_forward_pre_hook(self._count)
        state = self.model.state_dict()
        untouched = set(state) - {t.output.name for t in plan.tasks}
        if getattr(self.model.config, "tie_word_embeddings", False):  # the head is the embedding matrix
            untouched = {n for n in untouched if not n.endswith("lm_head.weight")}
        if untouched:
            raise EvomergeError(f"the merge does not produce {sorted(untouched)[:3]} of the resident model "
                                f"(from {self.template}); a candidate must write every tensor of it")
        with torch.no_grad():
            for name, tensor in iter_merged(plan, device=self.device, seed=seed):
                state[name].copy_(tensor)

    def score_recipe(self, recipe: Recipe, checkpoints: dict, tasks: Sequence[Task], *,
                     limit: int | None = None, seed: int = 0) -> dict[str, TaskResult]:
        """Scores of the candidate `recipe` makes; cached tasks cost nothing, and the merge
        itself is skipped when every task is cached."""
        candidate = candidate_hash(recipe, {r: c.path for r, c in checkpoints.items()}, seed)
        timings = Timings()
        results, todo = {}, []
        for task in tasks:
            hit = self.cache.get(candidate, task_key(task, limit))
            if hit is not None:
                results[task.name] = hit
                timings.cached.append(task.name)
            else:
                todo.append(task)
        if todo and self.resident != candidate:
            start = time.perf_counter()
            self.resident = None  # half-written weights belong to no candidate
            plan = plan_merge(recipe, checkpoints)
            timings.plan = time.perf_counter() - start
            self.load_candidate(plan, seed=seed)
            if self.device.type == "cuda":  # the copies are queued: wait for them before reading the clock
                torch.cuda.synchronize(self.device)
            self.resident = candidate
            timings.merge = time.perf_counter() - start - timings.plan
        for task in todo:
            results[task.name] = self._evaluate(candidate, task, limit, timings)
        self.last_timings = timings
        return {task.name: results[task.name] for task in tasks}

    def score_resident(self, tasks: Sequence[Task], *, limit: int | None = None) -> dict[str, TaskResult]:
        """Scores of the weights resident now (the template, or the last candidate)."""
        if self.resident is None:
            raise RuntimeError("the resident model holds a half-loaded candidate (a load failed)")
        timings = Timings()
        results = {}
        for task in tasks:
            results[task.name] = self.cache.get(self.resident, task_key(task, limit)) or \
                self._evaluate(self.resident, task, limit, timings)
        self.last_timings = timings
        return results

    def _evaluate(self, candidate: str, task: Task, limit: int | None, timings: Timings) -> TaskResult:
        start, stats = time.perf_counter(), {}
        result = evaluate(self.model, self.tokenizer, task, limit=limit, batch_size=self.batch_size, stats=stats)
        timings.evaluate[task.name] = time.perf_counter() - start
        timings.new_tokens[task.name] = stats.get("new_tokens", 0)
        self.cache.put(candidate, task_key(task, limit), result)
        return result
