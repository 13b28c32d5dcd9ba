"""Several candidates of `evomerge eval` (recipes and checkpoints) as jobs for the
executors (evaluation/executors/), all built in one resident model.

A recipe is a job as it is. A checkpoint (folder, zoo:NAME, Hub id) becomes the
one-model passthrough recipe: passthrough copies each tensor (through float32, which
holds every float16 and bfloat16 value exactly) and the harness writes it back in the
checkpoint's own dtype, so the resident model holds that checkpoint's weights bit for bit
and scores what `evomerge eval CHECKPOINT` alone scores.

The resident model starts as the first candidate's model (its template). Every candidate
must have its architecture, checked on headers before anything is scored: the same config
but for the depth and the dtype, which the harness rebuilds the resident model for (a
layer stack, a bfloat16 candidate), as `from_pretrained` would. The template's tokenizer
and generation settings serve every candidate, as in `evomerge evolve`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from evaluation.executors import HarnessSpec, Job, JobResult, make_executor
from merging.checkpoint import Checkpoint, resolve_model_path
from merging.engine import open_models, output_config, plan_merge
from merging.errors import EvomergeError
from merging.recipe import ModelSource, Recipe, load_recipe

_UNCOMPARED = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "layer_types"}
"""Config keys that do not make another architecture (the depth key is added per config)."""


@dataclass
class Candidate:
    """One MODEL_OR_RECIPE argument, opened (headers only) and planned."""

    name: str
    """The argument as the user gave it: the candidate's name in the table and the JSON."""
    recipe: Recipe
    checkpoints: dict[str, Checkpoint]
    template: Path
    """The model the recipe's output takes its config from (what a resident model starts as)."""
    config: dict
    """The config of the model the recipe makes."""

    def close(self) -> None:
        for checkpoint in self.checkpoints.values():
            checkpoint.close()


def checkpoint_recipe(reference: str) -> Recipe:
    """The recipe that rebuilds checkpoint `reference` exactly (module docstring)."""
    return Recipe(merge_method="passthrough", models=[ModelSource(model=reference)])


def open_candidate(argument: str, *, zoo_dir: Optional[Path] = None, allow_pickle: bool = False) -> Candidate:
    """A recipe .yaml (its models resolved as `evomerge merge` does) or a checkpoint."""
    if argument.endswith((".yaml", ".yml")):
        recipe = load_recipe(argument)
        checkpoints = open_models(recipe, allow_pickle=allow_pickle, recipe_dir=Path(argument).parent, zoo_dir=zoo_dir)
    else:
        recipe = checkpoint_recipe(argument)
        path = resolve_model_path(argument, allow_pickle=allow_pickle, zoo_dir=zoo_dir)
        checkpoints = {argument: Checkpoint(argument, path, allow_pickle=allow_pickle)}
    try:
        pickled = [c.reference for c in checkpoints.values()
                   if any(not info.file.endswith(".safetensors") for info in c.tensors.values())]
        if pickled:
            raise EvomergeError(f"candidate {argument!r}: model {pickled[0]!r} has pickled weights, which the "
                                "workers that score several candidates do not read; convert it to safetensors, "
                                "or score it alone")
        plan = plan_merge(recipe, checkpoints)
        return Candidate(argument, recipe, checkpoints, checkpoints[plan.reference].path, output_config(plan))
    except Exception:
        for checkpoint in checkpoints.values():
            checkpoint.close()
        raise


def architecture(config: dict) -> dict:
    """What of a config must match for one resident model to build both candidates: the
    config as transformers normalises it, without the depth, dtype and bookkeeping keys."""
    from transformers import AutoConfig

    from merging.architecture import num_layers_key

    try:
        full = AutoConfig.for_model(**config).to_dict()
    except (KeyError, ValueError) as exc:
        raise EvomergeError(f"model type {config.get('model_type')!r}: transformers does not know it ({exc})") from exc
    ignored = _UNCOMPARED | {num_layers_key(config)}
    return {key: value for key, value in full.items() if key not in ignored}


def check_same_architecture(candidates: Sequence[Candidate]) -> None:
    """Refuse, naming it, the first candidate whose architecture is not the first one's."""
    first = architecture(candidates[0].config)
    for candidate in candidates[1:]:
        other = architecture(candidate.config)
        differences = [f"{key} {other.get(key)!r} (not {first.get(key)!r})"
                       for key in sorted(set(first) | set(other)) if first.get(key) != other.get(key)]
        if differences:
            raise EvomergeError(
                f"candidate {candidate.name!r} is not built like the first candidate {candidates[0].name!r}, whose "
                f"model every candidate is built in: {', '.join(differences[:4])}"
                f"{' ...' if len(differences) > 4 else ''}; score it in its own `evomerge eval`")


def score_candidates(candidates: Sequence[Candidate], tasks: Sequence, spec: HarnessSpec, *, executor: str,
                     workers: Optional[int] = None, ray_address: Optional[str] = None, limit: Optional[int] = None,
                     seed: int = 0, on_result: Callable[[int, JobResult], None] = lambda index, result: None,
                     ) -> list[JobResult]:
    """Every candidate's JobResult (scored, or failed with its error), in the order given;
    `on_result` hears of each as it finishes (in any order). `spec.template` is the first
    candidate's template."""
    check_same_architecture(candidates)
    jobs = [Job(c.recipe, {ref: str(ck.path) for ref, ck in c.checkpoints.items()}, list(tasks), limit, seed)
            for c in candidates]
    results: list[Optional[JobResult]] = [None] * len(jobs)
    with make_executor(executor, spec, workers, ray_address=ray_address) as running:
        for index, result in running.score(jobs):
            results[index] = result
            on_result(index, result)
    return results
