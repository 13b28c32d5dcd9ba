"""The fitness harness: turn a recipe into the scores of the model it exports, once.

A search scores thousands of candidates that share one architecture. Loading each from
disk would dominate the run, so the harness keeps one model resident on the device
and writes each candidate's merged tensors into its parameters in place, straight from
the merge engine. The resident model is the model `from_pretrained` would give for the
checkpoint the candidate exports: same config, same dtype, same generation config, and
the tokenizer is the one the checkpoint gets (a recipe's tokenizer source, union
vocabulary, added tokens, chat template), so a logged score is what `evomerge eval`
measures on the exported checkpoint.

Nothing is scored twice: scores are cached per (candidate key, task key)
(evaluation/identity.py) in a JSONL file, and a new candidate that computes the same
function as one already scored reuses its scores (evaluation/functional.py).
"""
from __future__ import annotations

import gc
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from evaluation.cache import ScoreCache, read_jsonl
from evaluation.functional import ProbeStore, probe_file, probe_output, probe_setting
from evaluation.identity import checkpoint_hash, plan_key, task_key
from evaluation.scoring import evaluate, wants_bos
from evaluation.tasks import Task, TaskResult
from merging.checkpoint import Checkpoint, all_finite
from merging.engine import DTYPES, MergePlan, iter_merged, output_config, plan_merge, resolve_device
from merging.errors import CheckpointError, EvomergeError
from merging.recipe import Recipe
from merging.tokenizer import tokenizer_identity, write_tokenizer_files

__all__ = ["Harness", "Timings", "ScoreCache", "read_jsonl", "checkpoint_hash", "plan_key",
           "quiet_transformers"]


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' own progress bars ("Loading weights", "Writing model shards") off
    while evomerge loads or saves a model: evomerge shows its own progress."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


@dataclass
class Timings:
    """Where a candidate's time went (seconds), for benchmarks and run logs."""

    plan: float = 0.0
    """Resolving the recipe into a per-tensor plan (headers only) and its key."""
    merge: float = 0.0
    """Computing the merged tensors and copying them into the resident model."""
    probe: float = 0.0
    """Running the functional-hash probe (0 when every task was cached)."""
    evaluate: dict[str, float] = field(default_factory=dict)
    new_tokens: dict[str, int] = field(default_factory=dict)
    """Tokens generated per task (generation tasks), for tokens per second."""
    cached: list[str] = field(default_factory=list)
    twin: list[str] = field(default_factory=list)
    """Tasks whose scores were reused from a functional twin."""


_IGNORED_CONFIG_KEYS = {"_name_or_path", "transformers_version", "dtype", "torch_dtype"}


class Harness:
    """Scores recipes (merged into a resident model) and checkpoints on tasks.

    `dtype` None loads every model in the dtype `from_pretrained` picks for it (its
    config's); `functional` False turns functional hashing off. After each
    `score_recipe`, `last_candidate` is the candidate's key and `last_twin` the key of
    the functional twin whose scores it reused (None when it was scored itself)."""

    def __init__(self, template: str | Path, *, device: str = "auto", cache: str | Path | None = None,
                 batch_size: int = 32, dtype: torch.dtype | None = None, functional: bool = True):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = resolve_device(device)
        self.dtype = dtype
        self.batch_size = batch_size
        self.template = Path(template)
        if any(self.template.glob("*.safetensors")):  # a truncated or corrupt file: an error naming it
            Checkpoint(str(self.template), self.template).close()
        with quiet_transformers():
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(self.template)
                model = AutoModelForCausalLM.from_pretrained(self.template, dtype=dtype or "auto")
            except (OSError, ValueError, RuntimeError) as exc:
                raise CheckpointError(f"model {str(self.template)!r}: transformers cannot load it ({exc})") from exc
        self._tokenizer_identity: str | None = None
        """Whose tokenizer `self.tokenizer` is (merging.tokenizer.tokenizer_identity); None: the template's
        (until a candidate is planned)."""
        self.cache = ScoreCache(cache)
        self.probes = ProbeStore(probe_file(cache) if cache else None) if functional else None
        self.forward_passes = 0
        self.rebuilds = 0
        """How often a candidate's config made the harness build a new resident model."""
        self._install(model.to(self.device))
        self.resident: str | None = checkpoint_hash(self.template)
        """Key of the weights in the resident model now (template or candidate)."""
        self.last_candidate: str | None = None
        self.last_twin: str | None = None
        self.last_timings = Timings()

    def _install(self, model) -> None:
        self.model = model.eval()
        self.model.register_forward_pre_hook(self._count)
        self.model.register_forward_hook(_refuse_non_finite_logits)

    def _count(self, *_):
        self.forward_passes += 1

    def task_key(self, task: Task, limit: int | None) -> str:
        """The cache key of `task` measured by this harness (see evaluation/identity.py)."""
        settings = {"dtype": str(self.dtype) if self.dtype else "auto", "batch_size": self.batch_size}
        if isinstance(task, Task) and task.kind == "generate":
            settings["bos"] = wants_bos(task, self.tokenizer)
        return task_key(task, limit, settings)

    def load_candidate(self, plan: MergePlan, *, seed: int = 0) -> None:
        """Write a planned merge into the resident model, tensor by tensor, on the device.

        A plan whose config (depth, layer types, anything) or dtype differs from the
        resident model's gets a new resident model first, built as `from_pretrained`
        would build the exported checkpoint."""
        self._use_exported_tokenizer(plan)
        config = output_config(plan)
        dtype = self.dtype or _exported_dtype(plan, config)
        if dtype != self.model.dtype or _comparable(_config_dict(config)) != _comparable(self.model.config.to_dict()):
            self._rebuild(config, dtype)
        state = self.model.state_dict()
        produced = {task.output.name: task for task in plan.tasks}
        untouched = set(state) - set(produced)
        if getattr(self.model.config, "tie_word_embeddings", False):  # the head is the embedding matrix
            untouched = {n for n in untouched if not n.endswith("lm_head.weight")}
        if untouched:
            raise EvomergeError(f"the merge does not produce {sorted(untouched)[:3]} of the resident model "
                                f"(from {self.template}); a candidate must write every tensor of it")
        ignored = self._ignorable(set(produced) - set(state), produced)
        with torch.no_grad():
            for name, tensor in iter_merged(plan, device=self.device, seed=seed):
                if name not in ignored:
                    state[name].copy_(tensor)

    def _use_exported_tokenizer(self, plan: MergePlan) -> None:
        """Score with the tokenizer the plan's checkpoint gets, not the template's: written as
        the merge writes it and loaded back, once per distinct tokenizer (a run's
        candidates share one)."""
        from transformers import AutoTokenizer

        identity = tokenizer_identity(plan)
        if identity == self._tokenizer_identity:
            return
        with tempfile.TemporaryDirectory(prefix="evomerge-tokenizer-") as folder:
            write_tokenizer_files(plan, Path(folder))
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self._tokenizer_identity = identity

    def _ignorable(self, extra: set[str], produced: dict) -> set[str]:
        """Tensors of the sources that the model does not have: the buffers
        `from_pretrained` ignores (older Llama checkpoints' `rotary_emb.inv_freq`, old
        `position_ids`), or an error naming the tensor and its model."""
        import re

        patterns = set(getattr(self.model, "_keys_to_ignore_on_load_unexpected", None) or ())
        buffers = [name for name, _ in self.model.named_buffers()]
        if any(name.endswith("rotary_emb.inv_freq") for name in buffers):
            patterns.add(r"rotary_emb\.inv_freq")
        if any(name.endswith("position_ids") for name in buffers):
            patterns.add(r"(^|\.)position_ids$")
        for name in sorted(extra):
            if not any(re.search(pattern, name) for pattern in patterns):
                task = produced[name]
                source = (task.inputs or [task.base])[0]
                raise CheckpointError(f"tensor {source.name} of model {source.model!r} has no place in the "
                                      f"{type(self.model).__name__} its config describes")
        return extra

    def _rebuild(self, config: dict, dtype: torch.dtype) -> None:
        """A new resident model for `config` in `dtype`, with the template's generation
        config; the old one is freed first (two models need not fit at once), and the new
        one's weights are not initialised (the merge writes every one)."""
        from transformers import AutoModelForCausalLM
        try:
            from transformers.initialization import no_init_weights
        except ImportError:  # transformers 4.x keeps it in modeling_utils
            from transformers.modeling_utils import no_init_weights

        generation_config = self.model.generation_config
        self.model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        with quiet_transformers(), torch.device(self.device), no_init_weights():
            model = AutoModelForCausalLM.from_config(_config_object(config), dtype=dtype)
        model.tie_weights()  # no_init_weights skips the tying init_weights does
        model.generation_config = generation_config
        self.rebuilds += 1
        self._install(model)

    def score_recipe(self, recipe: Recipe, checkpoints: dict, tasks: Sequence[Task], *,
                     limit: int | None = None, seed: int = 0) -> dict[str, TaskResult]:
        """Scores of the candidate `recipe` makes; cached tasks cost nothing, the merge is
        skipped when every task is cached, and a functional twin's scores are reused."""
        timings = Timings()
        start = time.perf_counter()
        plan = plan_merge(recipe, checkpoints)
        self._use_exported_tokenizer(plan)  # the task keys depend on it (BOS)
        candidate = plan_key(plan, seed)
        timings.plan = time.perf_counter() - start
        self.last_candidate, self.last_twin = candidate, None
        keys = {task.name: self.task_key(task, limit) for task in tasks}
        results: dict[str, TaskResult] = {}
        for task in tasks:
            hit = self.cache.get(candidate, keys[task.name])
            if hit is not None:
                results[task.name] = hit.result
                timings.cached.append(task.name)
                self.last_twin = hit.twin or self.last_twin
        todo = [task for task in tasks if task.name not in results]
        if todo:
            if self.resident != candidate:
                self._load(plan, seed, candidate, timings)
            probe = self._probe(timings) if self.probes is not None else None
            if probe is not None:
                todo = self._reuse_twin(candidate, probe, todo, keys, results, timings)
            for task in todo:
                results[task.name] = self._evaluate(candidate, task, keys[task.name], limit, timings)
            if probe is not None and self.last_twin is None:
                self.probes.add(candidate, *probe)
        self.last_timings = timings
        return {task.name: results[task.name] for task in tasks}

    def _load(self, plan: MergePlan, seed: int, candidate: str, timings: Timings) -> None:
        start = time.perf_counter()
        self.resident = None  # half-written weights belong to no candidate
        self.load_candidate(plan, seed=seed)
        if self.device.type == "cuda":  # the copies are queued: wait for them before reading the clock
            torch.cuda.synchronize(self.device)
        self.resident = candidate
        timings.merge = time.perf_counter() - start

    def _probe(self, timings: Timings) -> tuple[str, torch.Tensor] | None:
        start = time.perf_counter()
        output = probe_output(self.model)
        timings.probe = time.perf_counter() - start
        return (probe_setting(self.model), output) if output is not None else None

    def _reuse_twin(self, candidate: str, probe: tuple[str, torch.Tensor], todo: list[Task], keys: dict[str, str],
                    results: dict[str, TaskResult], timings: Timings) -> list[Task]:
        """Take the scores of a functional twin for the tasks it has them for; the tasks left."""
        twin = self.probes.find(*probe, exclude=candidate)
        if twin is None:
            return todo
        self.last_twin = twin
        left = []
        for task in todo:
            hit = self.cache.get(twin, keys[task.name])
            if hit is None:
                left.append(task)
                continue
            results[task.name] = hit.result
            self.cache.put(candidate, keys[task.name], hit.result, twin=twin)
            timings.twin.append(task.name)
        return left

    def score_resident(self, tasks: Sequence[Task], *, limit: int | None = None) -> dict[str, TaskResult]:
        """Scores of the weights resident now (the template, or the last candidate)."""
        if self.resident is None:
            raise RuntimeError("the resident model holds a half-loaded candidate (a load failed)")
        timings = Timings()
        self.last_candidate, self.last_twin = self.resident, None
        results = {}
        for task in tasks:
            key = self.task_key(task, limit)
            hit = self.cache.get(self.resident, key)
            results[task.name] = hit.result if hit else self._evaluate(self.resident, task, key, limit, timings)
        self.last_timings = timings
        return results

    def _evaluate(self, candidate: str, task: Task, key: str, limit: int | None, timings: Timings) -> TaskResult:
        start, stats = time.perf_counter(), {}
        result = evaluate(self.model, self.tokenizer, task, limit=limit, batch_size=self.batch_size, stats=stats)
        timings.evaluate[task.name] = time.perf_counter() - start
        timings.new_tokens[task.name] = stats.get("new_tokens", 0)
        self.cache.put(candidate, key, result)
        return result


def _refuse_non_finite_logits(_module, _inputs, output) -> None:
    """A candidate whose logits hold NaN or Inf (a merge that overflowed its dtype) is
    broken: its scores would rank garbage (argmax of NaN, a NaN mean), so scoring it stops
    with an error the run logs as the candidate's failure. One min/max pass over the
    logits, small next to the matrix product that made them."""
    logits = getattr(output, "logits", output)
    if isinstance(logits, torch.Tensor) and logits.is_floating_point() and logits.numel() and not all_finite(logits):
        raise EvomergeError("the candidate's logits are not finite (NaN or Inf): its merged weights overflow "
                            "or are broken")


def _config_dict(config: dict) -> dict:
    return _config_object(config).to_dict()


def _config_object(config: dict):
    from transformers import AutoConfig

    return AutoConfig.for_model(**config)


def _comparable(config: dict) -> dict:
    """A config as a dict without what does not change the model (its path, the version
    that wrote it, the dtype, which is compared on the weights)."""
    return {key: value for key, value in config.items() if key not in _IGNORED_CONFIG_KEYS}


def _exported_dtype(plan: MergePlan, config: dict) -> torch.dtype:
    """The dtype `from_pretrained` gives the exported checkpoint: its config's, else its
    first floating-point tensor's."""
    name = config.get("dtype") or config.get("torch_dtype")
    if isinstance(name, str) and name in DTYPES:
        return DTYPES[name]
    return next(task.output.dtype for task in plan.tasks if task.output.dtype.is_floating_point)
