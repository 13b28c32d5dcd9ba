"""The serial executor: one Worker in the `evomerge` process, with the run's score cache
and functional twins (evaluation/functional.py)."""
from __future__ import annotations

import time
from typing import Iterator, Optional, Sequence

from evaluation.executors.base import Executor, Usage
from evaluation.executors.worker import HarnessSpec, Job, JobResult, Worker
from evaluation.tasks import Task


class SerialExecutor(Executor):
    """One Worker in this process (created at the first call), with the score cache."""

    name = "serial"
    workers = 1

    def __init__(self, spec: HarnessSpec):
        self.spec = spec
        self._worker: Optional[Worker] = None
        self._busy = False
        self._usage = Usage([0.0])

    def _get(self) -> Worker:
        if self._worker is None:
            start = time.perf_counter()
            self._worker = Worker(self.spec, self.spec.device, 0, shared_cache=True)
            self._usage.startup = time.perf_counter() - start
        return self._worker

    def task_keys(self, tasks: Sequence[Task], limit: Optional[int]) -> dict[str, str]:
        return self._get().task_keys(tasks, limit)

    def score(self, jobs: Sequence[Job]) -> Iterator[tuple[int, JobResult]]:
        worker = self._get()
        start = time.perf_counter()
        try:
            for index, job in enumerate(jobs):
                self._busy = True
                result = worker.score(job)
                self._busy = False
                self._usage.busy[0] += result.seconds
                if result.error:
                    self._usage.failed += 1
                elif len(worker.harness.last_timings.cached) == len(job.tasks):
                    self._usage.cached += 1
                else:
                    self._usage.scored += 1
                self._usage.note_placement(result.placement)
                yield index, result
        finally:
            self._busy = False
            self._usage.wall += time.perf_counter() - start

    def busy(self) -> int:
        return int(self._busy)

    def usage(self) -> Usage:
        return self._usage

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()
        self._worker = None
