"""Optional backend: lm-evaluation-harness tasks on the same in-memory candidate.

For users who want lm-eval's task catalogue (or their own lm-eval YAML tasks). The
candidate is passed to lm-eval as a live `transformers` model object, so it is the very
model the harness merged in place: nothing is written to disk. Per-example scores come
from lm-eval's logged samples, so M2N2 and the score cache work as for native tasks.
Install with `pip install 'evomerge[lmeval]'`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from evaluation.tasks import TaskResult
from merging.errors import EvomergeError


TASK_SPLIT = "own"
"""The split of an lm-eval task by default: the one its YAML scores (test, else validation)."""


@dataclass
class LmEvalTask:
    """An lm-eval task by name; `include_path` adds a folder of custom task YAMLs."""

    name: str
    lm_eval_task: str
    include_path: str | None = None
    num_fewshot: int | None = None
    metric: str | None = None
    """The per-example metric to return (default: the task's first, e.g. acc, exact_match)."""
    split: str = TASK_SPLIT
    """lm-eval scores the split its YAML names; another one asked for is an error, not ignored."""

    def fingerprint(self) -> str:
        """What identifies the task's data cheaply: lm-eval's version (its task catalogue
        and the datasets it points to) and the content of the custom task YAMLs, if any."""
        import hashlib
        from importlib.metadata import PackageNotFoundError, version

        digest = hashlib.sha256()
        try:
            digest.update(version("lm_eval").encode())
        except PackageNotFoundError:
            pass
        if self.include_path:
            for path in sorted(Path(self.include_path).rglob("*")):
                if path.is_file():
                    digest.update(str(path.relative_to(self.include_path)).encode() + path.read_bytes())
        return digest.hexdigest()[:20]

    def run(self, model, tokenizer, *, limit: int | None, batch_size: int) -> TaskResult:
        try:
            from lm_eval import simple_evaluate
            from lm_eval.models.huggingface import HFLM
            from lm_eval.tasks import TaskManager, get_task_dict
        except ImportError as exc:
            raise EvomergeError("lm-eval tasks need lm-eval: pip install 'evomerge[lmeval]'") from exc
        manager = TaskManager(include_path=str(self.include_path)) if self.include_path else TaskManager()
        try:
            tasks = (manager.load(self.lm_eval_task)["tasks"] if hasattr(manager, "load")  # newer lm-eval
                     else get_task_dict([self.lm_eval_task], manager))
        except (KeyError, ValueError) as exc:
            raise EvomergeError(f"lm-eval cannot load the task {self.lm_eval_task!r}: {exc}") from exc
        task = tasks.get(self.lm_eval_task)
        if task is None:
            raise EvomergeError(f"lm-eval {self.lm_eval_task!r} is a group of tasks; name one of its tasks")
        self._check_split(task)
        results = simple_evaluate(
            model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size),
            tasks=[task], task_manager=manager, num_fewshot=self.num_fewshot, limit=limit,
            log_samples=True, bootstrap_iters=0, verbosity="ERROR",
        )
        samples = sorted(results["samples"][self.lm_eval_task], key=lambda s: s["doc_id"])
        if not samples:
            raise EvomergeError(f"lm-eval task {self.lm_eval_task!r} returned no samples")
        metric = self.metric or next(k for k in results["results"][self.lm_eval_task]
                                     if "," in k and "stderr" not in k).split(",")[0]
        if metric not in samples[0]:
            raise EvomergeError(f"lm-eval task {self.lm_eval_task!r} has no per-example metric {metric!r}")
        return TaskResult(self.name, [float(s[metric]) for s in samples])

    def _check_split(self, task) -> None:
        """lm-eval picks the split from the task's YAML; a different one asked for would be
        silently replaced, so it is refused before any forward pass."""
        config = getattr(task, "config", None)
        own = getattr(config, "test_split", None) or getattr(config, "validation_split", None)
        if self.split not in (TASK_SPLIT, own):
            raise EvomergeError(f"lm-eval task {self.lm_eval_task!r} is scored on its {own!r} split, not "
                                f"{self.split!r}; drop --split or change the split in the task's YAML")


def lm_eval_task(spec: str, include_path: str | Path | None = None, split: str | None = None) -> LmEvalTask:
    """`lm_eval:TASK` (as written on the command line) -> an LmEvalTask; `split` None
    means the task's own split."""
    name = spec.removeprefix("lm_eval:")
    return LmEvalTask(name=spec, lm_eval_task=name, include_path=str(include_path) if include_path else None,
                      split=split or TASK_SPLIT)
