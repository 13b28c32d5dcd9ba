"""What makes two candidates, or two task settings, the same: the keys of the score cache.

A cached score may only be served for the very model and the very measurement it was
made on, and a search should never pay twice for one model. So keys are computed from
what determines the numbers, not from how they were asked for:

* a candidate is its resolved merge plan (`plan_key`): per output tensor the operator,
  its resolved parameters (numbers as floats: `weight: 1` is `weight: 1.0`) and the
  identity of every source tensor (its checkpoint's identity and its name), the output
  config, the seed only when the method draws random numbers, and the recipe's tokenizer
  settings when it has any. Two recipes that resolve to the same plan (a relative and an
  absolute path to one folder, a copy of a model, an unused seed) share a key; anything
  that changes a tensor changes it.
* a checkpoint on disk is the content of its weight and JSON files (`checkpoint_hash`):
  a model rewritten in place gets a new key, and the same bytes get the same key on any
  machine and at any path, so a run folder carried to a machine that rebuilt the zoo (a
  deterministic build) replays its scores there. A file's SHA-256 is computed once per
  version (~1 s per GB): it is kept under $EVOMERGE_CACHE/digests, keyed by the file's
  path, size, inode and modification time.
* a task measurement is the task's settings, a content hash of its data, the example
  limit and the harness settings that change scores (`task_key`).
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from merging.checkpoint import file_digest
from merging.engine import MergePlan, output_config
from merging.tokenizer import tokenizer_identity


def _digest(payload: Any, length: int = 20) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:length]


def checkpoint_hash(path: str | Path) -> str:
    """Identity of a checkpoint folder on disk: the names and contents of its weight and
    JSON files (not where it lies, nor when it was written)."""
    files = sorted((p.name, file_digest(p)) for p in Path(path).resolve().iterdir()
                   if p.suffix in (".safetensors", ".bin", ".json"))
    return _digest(files)


def normalise(value: Any) -> Any:
    """A resolved parameter as the key sees it: every number a float (so 1 and 1.0, and
    0.0 and -0.0, are one value), lists and maps normalised inside; booleans and strings
    as they are."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        number = float(value)
        return repr(number + 0.0) if math.isfinite(number) else repr(number)
    if isinstance(value, (list, tuple)):
        return [normalise(v) for v in value]
    if isinstance(value, dict):
        return {str(k): normalise(v) for k, v in value.items()}
    return repr(value)


def plan_key(plan: MergePlan, seed: int) -> str:
    """The candidate key of a resolved plan (see the module docstring)."""
    sources = {ref: checkpoint_hash(checkpoint.path) for ref, checkpoint in plan.checkpoints.items()}
    tensors = []
    for task in plan.tasks:
        tensors.append([
            task.output.name, list(task.output.shape), str(task.output.dtype),
            [sources[task.base.model], task.base.name] if task.base else None,
            [[sources[ref.model], ref.name] for ref in task.inputs],
            {name: normalise(value) for name, value in task.params.items()},
        ])
    payload = {"method": plan.method.name, "tensors": tensors, "config": output_config(plan),
               "seed": seed if plan.method.random else None}
    if plan.recipe.tokenizer_model_source is not None or plan.recipe.chat_template is not None:
        # `tokens:` rows and the tokenizer scored with (added tokens) are in no tensor's inputs
        payload["tokenizer"] = tokenizer_identity(plan)
    return _digest(payload)


def task_key(task, limit: int | None, settings: dict[str, Any]) -> str:
    """Everything that changes a task's scores: its settings (prompt, scorer, decoding),
    a content hash of its data (`task.fingerprint()`), the example limit, and the
    harness `settings` that change scores (dtype, batch size, and whether generation
    prompts start with BOS: the resolved choice, not the task's `bos` field, so that
    "the tokenizer's default" and the same choice written out share a key)."""
    from dataclasses import asdict

    fields = asdict(task)
    fields.pop("bos", None)
    return _digest({"task": fields, "data": task.fingerprint(), "limit": limit, "harness": settings}, 16)
