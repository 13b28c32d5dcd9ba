"""Executors: score a population of candidates (recipes) on the fitness tasks, on one
device or on several, and give back each candidate's per-example scores as it finishes.

    with make_executor("pool", spec, workers=2) as executor:
        keys = executor.task_keys(tasks, limit)
        for index, result in executor.score(jobs):   # in the order they finish
            ...

- `serial`: in this process, one resident Harness (today's behaviour: its score cache
  and its functional twins, evaluation/functional.py).
- `pool`: N worker processes (spawn), each with its own resident Harness built once on its
  device (`cuda:i` for worker i when the device is CUDA, else the CPU with its share of the
  threads). The workers take jobs from one shared queue, so none is idle while a candidate
  waits.

A Ray executor plugs in the same way: a subclass of `Executor` whose workers are actors
running `score_job` (the unit of work shared by every executor).

The score cache has one writer. In a pool the driver owns it: it plans each candidate
(headers only) to know its key, answers cached candidates itself, sends only the others to
the workers, and appends their scores as they arrive; the workers' harnesses have no cache
file and no functional twins, since twins found in a worker would depend on which
candidates that worker happened to score before. A candidate's scores depend only on its
recipe, the tasks and the seed, never on the worker: every worker loads the same template in
the same dtype and merges with the same seed.
"""
from __future__ import annotations

import multiprocessing
import queue
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

from evaluation.cache import ScoreCache
from evaluation.identity import plan_key
from evaluation.tasks import Task, TaskResult
from merging.checkpoint import Checkpoint
from merging.errors import EvomergeError
from merging.recipe import Recipe

EXECUTORS = ("serial", "pool")
"""The executors built so far (`ray` is planned: issue 13)."""


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
    """The score cache file (written by the driver only)."""
    threads: Optional[int] = None
    """torch CPU threads of the whole run (a pool gives each worker its share)."""


@dataclass
class Job:
    """One candidate to score (picklable)."""

    recipe: Recipe
    checkpoints: dict[str, str]
    """The recipe's model references -> their local folders."""
    tasks: list[Task]
    limit: Optional[int]
    seed: int


@dataclass
class JobResult:
    """A candidate's per-example scores per task, and where and how they were made."""

    scores: dict[str, list[float]]
    key: str
    """The candidate's key in the score cache (evaluation/identity.py)."""
    twin: Optional[str]
    """The functional twin whose scores were reused (None: scored, or cached)."""
    task_keys: dict[str, str]
    seconds: float
    worker: Optional[int]
    """The worker that scored it (None: answered from the driver's score cache)."""


@dataclass
class Usage:
    """How busy the workers were while the driver waited for scores."""

    busy: list[float]
    wall: float = 0.0
    startup: float = 0.0
    scored: int = 0
    cached: int = 0

    def summary(self) -> dict:
        return {"workers": len(self.busy), "busy_seconds": [round(b, 3) for b in self.busy],
                "wall_seconds": round(self.wall, 3), "startup_seconds": round(self.startup, 3),
                "utilisation": [round(b / self.wall, 3) if self.wall else 0.0 for b in self.busy],
                "scored": self.scored, "cached": self.cached}


class Sources:
    """The checkpoints of the jobs a worker has seen, opened once and kept (headers and
    memory maps: the merge reads their tensors as it needs them)."""

    def __init__(self):
        self._open: dict[tuple[str, str], Checkpoint] = {}

    def of(self, job: Job) -> dict[str, Checkpoint]:
        out = {}
        for reference, path in job.checkpoints.items():
            if (reference, path) not in self._open:
                self._open[reference, path] = Checkpoint(reference, Path(path))
            out[reference] = self._open[reference, path]
        return out

    def close(self) -> None:
        for checkpoint in self._open.values():
            checkpoint.close()
        self._open.clear()


def build_harness(spec: HarnessSpec, *, device: str, shared_cache: bool):
    """The resident Harness of a worker; with `shared_cache` False it has no cache file and
    no functional twins (the pool's rule, module docstring)."""
    from evaluation.harness import Harness
    from merging.recipe import DTYPES

    dtype = DTYPES[spec.dtype] if spec.dtype else None
    return Harness(spec.template, device=device, cache=spec.cache if shared_cache else None,
                   batch_size=spec.batch_size, dtype=dtype, functional=shared_cache)


def score_job(harness, sources: Sources, job: Job, worker: Optional[int]) -> JobResult:
    """Build `job`'s candidate in the resident model and score it: the unit of work of
    every executor."""
    start = time.perf_counter()
    results = harness.score_recipe(job.recipe, sources.of(job), job.tasks, limit=job.limit, seed=job.seed)
    return JobResult({t.name: list(results[t.name].scores) for t in job.tasks}, harness.last_candidate,
                     harness.last_twin, {t.name: harness.task_key(t, job.limit) for t in job.tasks},
                     time.perf_counter() - start, worker)


class Executor(ABC):
    """Scores jobs; `score` yields (index in `jobs`, result) as each finishes."""

    name: str

    @abstractmethod
    def task_keys(self, tasks: Sequence[Task], limit: Optional[int]) -> dict[str, str]:
        """Each task's key in the score cache, as the workers measure it."""

    @abstractmethod
    def score(self, jobs: Sequence[Job]) -> Iterator[tuple[int, JobResult]]:
        """Score every job; raises EvomergeError naming the candidate when one fails."""

    @abstractmethod
    def usage(self) -> Usage: ...

    @abstractmethod
    def close(self) -> None:
        """Free the workers (idempotent)."""

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *_) -> None:
        self.close()


class SerialExecutor(Executor):
    """One resident Harness in this process (created at the first call)."""

    name = "serial"

    def __init__(self, spec: HarnessSpec):
        self.spec = spec
        self._harness = None
        self._sources = Sources()
        self._usage = Usage([0.0])

    def _get(self):
        if self._harness is None:
            start = time.perf_counter()
            self._harness = build_harness(self.spec, device=self.spec.device, shared_cache=True)
            self._usage.startup = time.perf_counter() - start
        return self._harness

    def task_keys(self, tasks: Sequence[Task], limit: Optional[int]) -> dict[str, str]:
        return {task.name: self._get().task_key(task, limit) for task in tasks}

    def score(self, jobs: Sequence[Job]) -> Iterator[tuple[int, JobResult]]:
        harness = self._get()
        start = time.perf_counter()
        try:
            for index, job in enumerate(jobs):
                result = score_job(harness, self._sources, job, 0)
                self._usage.busy[0] += result.seconds
                if len(harness.last_timings.cached) == len(job.tasks):
                    self._usage.cached += 1
                else:
                    self._usage.scored += 1
                yield index, result
        finally:
            self._usage.wall += time.perf_counter() - start

    def usage(self) -> Usage:
        return self._usage

    def close(self) -> None:
        self._sources.close()
        self._harness = None


def worker_devices(device: str, workers: int) -> list[str]:
    """Worker i's device: `cuda:i` (round robin over the GPUs) when the run is on CUDA
    (`cuda`, or `auto` with a GPU), else the run's device for every worker."""
    import torch

    if device in ("cuda", "auto") and torch.cuda.is_available():
        return [f"cuda:{i % torch.cuda.device_count()}" for i in range(workers)]
    return [device] * workers


class PoolExecutor(Executor):
    """N worker processes on this machine, started at the first call, fed from one queue;
    the driver (this process) owns the score cache (module docstring)."""

    name = "pool"

    def __init__(self, spec: HarnessSpec, workers: int):
        self.spec, self.workers = spec, workers
        self._cache = ScoreCache(spec.cache)
        self._sources = Sources()
        self._usage = Usage([0.0] * workers)
        self._processes: list = []
        self._inbox = self._outbox = None

    def _start(self) -> None:
        if self._processes:
            return
        import torch

        start = time.perf_counter()
        context = multiprocessing.get_context("spawn")
        self._inbox, self._outbox = context.Queue(), context.Queue()
        threads = max(1, (self.spec.threads or torch.get_num_threads()) // self.workers)
        for worker, device in enumerate(worker_devices(self.spec.device, self.workers)):
            process = context.Process(target=_worker_main, name=f"evomerge-worker-{worker}", daemon=True,
                                      args=(worker, self.spec, device, threads, self._inbox, self._outbox))
            process.start()
            self._processes.append(process)
        for _ in range(self.workers):
            self._receive("ready")
        self._usage.startup = time.perf_counter() - start

    def _receive(self, expected: str) -> tuple:
        """The next message of the workers; an error when a worker failed or died."""
        while True:
            try:
                kind, worker, index, payload = self._outbox.get(timeout=1.0)
            except queue.Empty:
                dead = [(i, p.exitcode) for i, p in enumerate(self._processes) if not p.is_alive()]
                if dead:
                    self.close()
                    raise EvomergeError(f"pool worker {dead[0][0]} died (exit code {dead[0][1]}); the run stopped. "
                                        "Rerun the same command to resume") from None
                continue
            if kind == "error":
                self.close()
                what = f"candidate {index}" if index is not None else "setting up"
                raise EvomergeError(f"pool worker {worker}, {what}: {payload}")
            if kind != expected:
                raise AssertionError(f"pool protocol: expected {expected}, got {kind}")
            return worker, index, payload

    def task_keys(self, tasks: Sequence[Task], limit: Optional[int]) -> dict[str, str]:
        self._start()
        self._inbox.put(("keys", list(tasks), limit))
        return self._receive("keys")[2]

    def score(self, jobs: Sequence[Job]) -> Iterator[tuple[int, JobResult]]:
        from merging.engine import plan_merge

        self._start()
        start = time.perf_counter()
        try:
            keys = self.task_keys(jobs[0].tasks, jobs[0].limit) if jobs else {}
            sent = 0
            for index, job in enumerate(jobs):
                cached = self._cached(plan_key(plan_merge(job.recipe, self._sources.of(job)), job.seed), job, keys)
                if cached is not None:
                    self._usage.cached += 1
                    yield index, cached
                else:
                    self._inbox.put(("job", index, job))
                    sent += 1
            for _ in range(sent):
                worker, index, result = self._receive("done")
                for task in jobs[index].tasks:
                    self._cache.put(result.key, keys[task.name], TaskResult(task.name, result.scores[task.name]))
                self._usage.busy[worker] += result.seconds
                self._usage.scored += 1
                yield index, result
        finally:
            self._usage.wall += time.perf_counter() - start

    def _cached(self, key: str, job: Job, keys: dict[str, str]) -> Optional[JobResult]:
        hits = {task.name: self._cache.get(key, keys[task.name]) for task in job.tasks}
        if any(hit is None for hit in hits.values()):
            return None
        twins = [hit.twin for hit in hits.values() if hit.twin]
        return JobResult({name: list(hit.result.scores) for name, hit in hits.items()}, key,
                         twins[0] if twins else None, keys, 0.0, None)

    def usage(self) -> Usage:
        return self._usage

    def close(self) -> None:
        """Stop the workers: ask them to finish, then terminate any that did not."""
        for _ in self._processes:
            try:
                self._inbox.put(None)
            except (ValueError, OSError):
                break
        deadline = time.monotonic() + 5.0
        for process in self._processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
        for process in self._processes:
            if process.is_alive():
                process.terminate()
                process.join(timeout=5.0)
            if process.is_alive():
                process.kill()
                process.join()
        for channel in (self._inbox, self._outbox):
            if channel is not None:
                channel.cancel_join_thread()
                channel.close()
        self._processes, self._inbox, self._outbox = [], None, None
        self._sources.close()


def _worker_main(worker: int, spec: HarnessSpec, device: str, threads: int, inbox, outbox) -> None:
    """A pool worker: build the harness once, then score jobs until told to stop, or until
    the driver is gone (killed: a worker must not outlive it). Ctrl-C is the driver's to
    handle: it stops the workers."""
    import signal

    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    try:
        harness = build_harness(spec, device=device, shared_cache=False)
    except Exception as exc:  # noqa: BLE001 - the driver reports it, naming the worker
        outbox.put(("error", worker, None, f"{type(exc).__name__}: {exc}"))
        return
    outbox.put(("ready", worker, None, None))
    sources = Sources()
    try:
        while (message := _next_message(inbox)) is not None:
            if message[0] == "keys":
                _, tasks, limit = message
                outbox.put(("keys", worker, None, {t.name: harness.task_key(t, limit) for t in tasks}))
                continue
            _, index, job = message
            try:
                outbox.put(("done", worker, index, score_job(harness, sources, job, worker)))
            except Exception as exc:  # noqa: BLE001 - the driver stops the run, naming the candidate
                outbox.put(("error", worker, index, f"{type(exc).__name__}: {exc}"))
    finally:
        sources.close()


def _next_message(inbox) -> Optional[tuple]:
    """The driver's next message; None when it says stop or has died."""
    while True:
        try:
            return inbox.get(timeout=1.0)
        except queue.Empty:
            if not multiprocessing.parent_process().is_alive():
                return None


def check_executor(name: str, workers: Optional[int]) -> None:
    """Refuse an executor that is not built, or a worker count it cannot use, before a run
    touches its folder."""
    if name == "ray":
        raise EvomergeError("executor ray is not built yet (planned: issue 13); use executor serial or pool")
    if name not in EXECUTORS:
        raise EvomergeError(f"unknown executor {name!r}; known: {', '.join(EXECUTORS)}")
    if workers is not None and workers < 1:
        raise EvomergeError(f"workers: {workers}; an executor needs at least one worker")
    if name == "serial" and workers not in (None, 1):
        raise EvomergeError(f"executor serial runs one worker in this process (got workers: {workers}); "
                            "use executor pool for more")


def make_executor(name: str, spec: HarnessSpec, workers: Optional[int] = None) -> Executor:
    """The executor `name` (see EXECUTORS); `workers` None: one per GPU on CUDA, else 2."""
    check_executor(name, workers)
    if name == "serial":
        return SerialExecutor(spec)
    return PoolExecutor(spec, workers or _default_workers(spec.device))


def _default_workers(device: str) -> int:
    import torch

    if device in ("cuda", "auto") and torch.cuda.is_available():
        return torch.cuda.device_count()
    return 2
