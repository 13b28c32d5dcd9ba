"""What every executor is (Executor), how busy its workers were (Usage), and the driver
side shared by the executors whose workers are elsewhere (DriverExecutor: the score
cache's one writer, repeats, keeping every worker fed)."""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Optional, Sequence

from evaluation.cache import ScoreCache
from evaluation.executors.worker import HarnessSpec, Job, JobResult
from evaluation.identity import plan_key
from evaluation.tasks import Task, TaskResult
from merging.checkpoint import Checkpoint


@dataclass
class Usage:
    """How busy the workers were while the driver waited for scores."""

    busy: list[float]
    wall: float = 0.0
    startup: float = 0.0
    scored: int = 0
    cached: int = 0
    failed: int = 0
    restarts: int = 0
    placement: list[str] = field(default_factory=list)
    """Where the workers keep the sources, in words (each distinct answer once)."""

    def note_placement(self, text: str) -> None:
        if text and text not in self.placement:
            self.placement.append(text)

    def summary(self) -> dict:
        return {"workers": len(self.busy), "busy_seconds": [round(b, 3) for b in self.busy],
                "wall_seconds": round(self.wall, 3), "startup_seconds": round(self.startup, 3),
                "utilisation": [round(b / self.wall, 3) if self.wall else 0.0 for b in self.busy],
                "scored": self.scored, "cached": self.cached, "failed": self.failed, "restarts": self.restarts,
                "placement": self.placement}


class Executor(ABC):
    """Scores jobs; `score` yields (index in `jobs`, result) as each finishes."""

    name: str
    workers: int

    @abstractmethod
    def task_keys(self, tasks: Sequence[Task], limit: Optional[int]) -> dict[str, str]:
        """Each task's key in the score cache, as the workers measure it."""

    @abstractmethod
    def score(self, jobs: Sequence[Job]) -> Iterator[tuple[int, JobResult]]:
        """Score every job, yielding each result as it finishes."""

    @abstractmethod
    def busy(self) -> int:
        """Workers scoring a candidate now (for the progress bar)."""

    @abstractmethod
    def usage(self) -> Usage: ...

    @abstractmethod
    def close(self) -> None:
        """Free the workers (idempotent)."""

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *_) -> None:
        self.close()


class DriverExecutor(Executor):
    """An executor whose workers are elsewhere (processes, Ray actors): the driver owns the
    score cache, answers cached and repeated candidates itself and keeps every worker fed
    (module docstring). Subclasses start the workers and move jobs and results."""

    def __init__(self, spec: HarnessSpec, workers: int):
        self.spec, self.workers = spec, workers
        self._cache = ScoreCache(spec.cache)
        self._planner: dict[tuple[str, str], Checkpoint] = {}
        self._usage = Usage([0.0] * workers)
        self._in_flight = 0
        self._task_keys: dict[tuple, dict[str, str]] = {}
        self._processes: dict[int, int] = {}
        """Each worker's process id as last seen (a new one: Ray restarted it)."""

    @abstractmethod
    def _start(self) -> None:
        """Start the workers (once); raises EvomergeError naming a worker that cannot start."""

    @abstractmethod
    def _worker_task_keys(self, tasks: Sequence[Task], limit: Optional[int]) -> dict[str, str]:
        """The task keys as a worker measures them (its tokenizer decides some settings)."""

    def task_keys(self, tasks: Sequence[Task], limit: Optional[int]) -> dict[str, str]:
        """Asked of a worker once per tasks and limit, not once per round."""
        self._start()
        asked = (tuple(task.name for task in tasks), limit)
        if asked not in self._task_keys:
            self._task_keys[asked] = self._worker_task_keys(tasks, limit)
        return self._task_keys[asked]

    @abstractmethod
    def _idle(self) -> int:
        """How many more jobs the workers can take now."""

    @abstractmethod
    def _submit(self, index: int, job: Job) -> None: ...

    @abstractmethod
    def _collect(self) -> tuple[int, int, JobResult]:
        """Wait for the next finished job: (worker, index, result)."""

    def score(self, jobs: Sequence[Job]) -> Iterator[tuple[int, JobResult]]:
        self._start()
        start = time.perf_counter()
        try:
            keys = self.task_keys(jobs[0].tasks, jobs[0].limit) if jobs else {}
            waiting: deque[tuple[int, Job]] = deque()
            first: dict[str, int] = {}  # a candidate's key -> the job that scores it
            repeats: dict[int, list[int]] = {}  # that job -> the jobs that take its result
            outstanding = 0
            for index, job in enumerate(jobs):
                key = self._plan_key(job)
                cached = self._cached(key, job, keys)
                if cached is not None:
                    self._usage.cached += 1
                    yield index, cached
                elif key in first:
                    repeats[first[key]].append(index)
                else:
                    first[key], repeats[index] = index, []
                    waiting.append((index, job))
                    outstanding += 1
                    self._feed(waiting)  # the workers start while the driver plans the next candidates
            while outstanding:
                worker, index, result = self._collect()
                self._in_flight -= 1
                outstanding -= 1
                self._account(worker, result, jobs[index], keys)
                self._feed(waiting)  # before the result is handed on: no worker waits for the caller
                yield index, result
                for repeat in repeats[index]:  # the same candidate: its scores, or its failure
                    self._usage.cached += result.error is None
                    yield repeat, replace(result, seconds=0.0, worker=None)
        finally:
            self._usage.wall += time.perf_counter() - start

    def _feed(self, waiting: deque[tuple[int, Job]]) -> None:
        """Give waiting jobs to the workers while they can take them."""
        while waiting and self._idle():
            self._submit(*waiting.popleft())
            self._in_flight += 1

    def _plan_key(self, job: Job) -> str:
        from merging.engine import plan_merge

        checkpoints = {}
        for reference, path in job.checkpoints.items():
            if (reference, path) not in self._planner:
                self._planner[reference, path] = Checkpoint(reference, Path(path))
            checkpoints[reference] = self._planner[reference, path]
        return plan_key(plan_merge(job.recipe, checkpoints), job.seed)

    def _cached(self, key: str, job: Job, keys: dict[str, str]) -> Optional[JobResult]:
        hits = {task.name: self._cache.get(key, keys[task.name]) for task in job.tasks}
        if any(hit is None for hit in hits.values()):
            return None
        twins = [hit.twin for hit in hits.values() if hit.twin]
        return JobResult({name: list(hit.result.scores) for name, hit in hits.items()}, key,
                         twins[0] if twins else None, 0.0, None)

    def _account(self, worker: int, result: JobResult, job: Job, keys: dict[str, str]) -> None:
        """Cache a finished candidate's scores and count the worker's time and restarts."""
        if result.error is None:
            for task in job.tasks:
                self._cache.put(result.key, keys[task.name], TaskResult(task.name, result.scores[task.name]))
            self._usage.scored += 1
        else:
            self._usage.failed += 1
        self._usage.busy[worker] += result.seconds
        self._usage.note_placement(result.placement)
        if result.process is not None:
            if self._processes.get(worker, result.process) != result.process:
                self._usage.restarts += 1
            self._processes[worker] = result.process

    def busy(self) -> int:
        return min(self._in_flight, self.workers)

    def usage(self) -> Usage:
        return self._usage

    def _close_planner(self) -> None:
        for checkpoint in self._planner.values():
            checkpoint.close()
        self._planner.clear()


def worker_threads(spec: HarnessSpec, workers: int) -> int:
    """Each worker's share of the run's CPU threads (at least one)."""
    import torch

    return max(1, (spec.threads or torch.get_num_threads()) // workers)
