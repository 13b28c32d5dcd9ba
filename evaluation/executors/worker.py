"""The worker every executor runs: a resident Harness on one device and the source models,
and what travels to it (HarnessSpec, Job) and back (JobResult). Picklable, so a pool
process or a Ray actor builds the same worker from the same spec."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Sequence

from evaluation.tasks import Task
from merging.checkpoint import Checkpoint
from merging.recipe import Recipe


SOURCES_DEVICE_SHARE = 0.5
"""Sources are kept on a GPU when they take at most this share of its memory left free
once the resident model is built; the rest is for activations and the merge's temporaries."""

Placement = Literal["auto", "device", "host"]


@dataclass(frozen=True)
class HarnessSpec:
    """How every worker builds its resident Harness (picklable: it travels to the workers)."""

    template: str
    """The model the resident model starts as (same architecture as the candidates)."""
    device: str = "auto"
    batch_size: int = 32
    dtype: Optional[str] = None
    """A name of merging.recipe.DTYPES, or None for the checkpoint's dtype."""
    cache: Optional[str] = None
    """The score cache file, written by one process: the serial worker, or else the driver."""
    threads: Optional[int] = None
    """torch CPU threads of the whole run (each worker of a pool or Ray gets its share)."""
    sources: Placement = "auto"
    """Where a worker keeps the source models: `device` (read once onto the worker's device),
    `host` (memory-mapped, streamed to the device per candidate), `auto` (`Worker.place_sources`)."""


@dataclass
class Job:
    """One candidate to score (picklable)."""

    recipe: Recipe
    checkpoints: dict[str, str]
    """The recipe's model references -> their local folders (the same paths on every node)."""
    tasks: list[Task]
    limit: Optional[int]
    seed: int


@dataclass
class JobResult:
    """A candidate's per-example scores per task, or why it has none, and where and how
    they were made."""

    scores: dict[str, list[float]]
    key: Optional[str]
    """The candidate's key in the score cache (evaluation/identity.py); None when the
    candidate failed before it was planned."""
    twin: Optional[str]
    """The functional twin whose scores were reused (None: scored, or cached)."""
    seconds: float
    worker: Optional[int]
    """The worker that scored it (None: answered by the driver's score cache)."""
    error: Optional[str] = None
    """Why the candidate has no scores (it raised while built or scored); None when scored."""
    process: Optional[int] = None
    """The worker's process id (a Ray actor that was restarted has a new one)."""
    placement: str = ""
    """Where the worker keeps the sources (`Worker.place_sources`), in words."""


def build_harness(spec: HarnessSpec, *, device: str, shared_cache: bool):
    """The resident Harness of a worker; with `shared_cache` False it has no cache file and
    no functional twins (the driver's rule, module docstring)."""
    from evaluation.harness import Harness
    from merging.recipe import DTYPES

    dtype = DTYPES[spec.dtype] if spec.dtype else None
    return Harness(spec.template, device=device, cache=spec.cache if shared_cache else None,
                   batch_size=spec.batch_size, dtype=dtype, functional=shared_cache)


class Worker:
    """What scores candidates in every executor: a resident Harness on one device and the
    source checkpoints, opened once and kept (a Ray actor is this class)."""

    def __init__(self, spec: HarnessSpec, device: str, index: int, *, shared_cache: bool = False,
                 threads: Optional[int] = None):
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.spec, self.device, self.index, self.shared_cache = spec, device, index, shared_cache
        self.harness = build_harness(spec, device=device, shared_cache=shared_cache)
        self._open: dict[tuple[str, str], Checkpoint] = {}
        self.placement = ""
        """Where the sources are kept, in words (after the first job)."""

    def ready(self) -> tuple[int, str]:
        """(process id, the harness's device): the worker is up."""
        return os.getpid(), str(self.harness.device)

    def task_keys(self, tasks: Sequence[Task], limit: Optional[int]) -> dict[str, str]:
        return {task.name: self.harness.task_key(task, limit) for task in tasks}

    def sources(self, job: Job) -> dict[str, Checkpoint]:
        """The job's checkpoints, opened on first use and placed (`place_sources`)."""
        new = [(ref, path) for ref, path in job.checkpoints.items() if (ref, path) not in self._open]
        for reference, path in new:
            self._open[reference, path] = Checkpoint(reference, Path(path))
        if new:
            self.place_sources([self._open[key] for key in new])
        return {reference: self._open[reference, path] for reference, path in job.checkpoints.items()}

    def place_sources(self, checkpoints: list[Checkpoint]) -> None:
        """Keep `checkpoints` on the worker's device when the spec says `device`, or, with
        `auto`, when the device is a GPU and they take at most SOURCES_DEVICE_SHARE of its
        free memory; else leave them memory-mapped in host memory (on a CPU the page cache
        already is the device's memory, shared by every worker)."""
        import torch

        device, size = self.harness.device, sum(c.nbytes for c in checkpoints)
        keep = self.spec.sources == "device"
        if self.spec.sources == "auto" and device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            keep = size <= SOURCES_DEVICE_SHARE * free
        if keep:
            for checkpoint in checkpoints:
                checkpoint.keep_on(device)
        where = f"kept on {device}" if keep else "memory-mapped in host memory, streamed per candidate"
        amount = f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"
        self.placement = f"sources ({amount}) {where}"

    def score(self, job: Job) -> JobResult:
        """Build `job`'s candidate in the resident model and score it; a candidate that
        raises gives a result with its error (the worker goes on)."""
        start = time.perf_counter()
        self.harness.last_candidate = None
        try:
            results = self.harness.score_recipe(job.recipe, self.sources(job), job.tasks, limit=job.limit,
                                                seed=job.seed)
        except Exception as exc:  # noqa: BLE001 - the candidate's failure, logged by the caller
            key = self.harness.last_candidate
            self._recover()
            return JobResult({}, key, None, time.perf_counter() - start, self.index,
                             error=f"{type(exc).__name__}: {exc}", process=os.getpid(), placement=self.placement)
        return JobResult({t.name: list(results[t.name].scores) for t in job.tasks}, self.harness.last_candidate,
                         self.harness.last_twin, time.perf_counter() - start, self.index, process=os.getpid(),
                         placement=self.placement)

    def _recover(self) -> None:
        """After a failed candidate: free what the failure left on the GPU, and build the
        harness again if the failure struck while its resident model was being replaced."""
        import torch

        if self.harness.device.type == "cuda":
            torch.cuda.empty_cache()
        if self.harness.model is None:
            self.harness = build_harness(self.spec, device=self.device, shared_cache=self.shared_cache)

    def close(self) -> None:
        for checkpoint in self._open.values():
            checkpoint.close()
        self._open.clear()
