"""Executors: score a population of candidates (recipes) on the fitness tasks, on one
device or on many, and give back each candidate's per-example scores as it finishes.

    with make_executor("ray", spec, workers=8) as executor:
        keys = executor.task_keys(tasks, limit)
        for index, result in executor.score(jobs):   # in the order they finish
            ...

- `serial`: one worker in this process (today's behaviour, with the score cache and
  functional twins, evaluation/functional.py).
- `pool`: N worker processes on this machine (spawned), fed from one queue.
- `ray`: N Ray actors, on a local cluster started for the run or on an existing one
  (`ray_address`); Ray places them (one GPU each, or a share of one), restarts a killed
  actor and retries its candidate (`max_restarts`, `max_task_retries`).

Every worker is a `Worker`: one resident Harness built once on its device, the sources
opened once (kept on the device when they fit, see `Worker.place_sources`), each candidate
merged into the resident model in place and scored; no checkpoint goes through disk.

A candidate that fails (out of memory, NaN or Inf logits, a build error) does not stop the
executor: its result carries the error and the caller decides (niches/loop.py logs it
with the worst fitness). A worker that cannot start, or a pool worker that dies, stops the
run: Ray's actors are the ones that come back.

The score cache has one writer. In a pool or on Ray the driver owns it: it plans each
candidate (headers only) to know its key, answers cached candidates itself, sends one copy
of each distinct candidate to the workers (a population may ask for the same candidate
twice), and appends scores as they arrive. The workers' harnesses have no cache file and
no functional twins, since twins found in a worker would depend on which candidates that
worker happened to score before. A candidate's scores depend only on its recipe, the tasks
and the seed, never on the worker: every worker loads the same template in the same dtype
and merges with the same seed.
"""
from __future__ import annotations

import multiprocessing
import os
import queue
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Literal, Optional, Sequence

from evaluation.cache import ScoreCache
from evaluation.identity import plan_key
from evaluation.tasks import Task, TaskResult
from merging.checkpoint import Checkpoint
from merging.errors import EvomergeError
from merging.recipe import Recipe

EXECUTORS = ("serial", "pool", "ray")

RAY_INSTALL = "pip install 'evomerge[ray]'"

RAY_MAX_RESTARTS = 4
"""How often Ray brings back one actor that died (killed, out of host memory, a crash in
native code) before the run goes on without it."""

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
    """The score cache file (written by the driver only)."""
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
    task_keys: dict[str, str]
    seconds: float
    worker: Optional[int]
    """The worker that scored it (None: answered by the driver's score cache)."""
    error: Optional[str] = None
    """Why the candidate has no scores (it raised while built or scored); None when scored."""
    process: Optional[int] = None
    """The worker's process id (a Ray actor that was restarted has a new one)."""
    placement: str = ""
    """Where the worker keeps the sources (`Worker.place_sources`), in words."""


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
        self.placement = f"sources ({size / 2**30:.2f} GiB) {where}"

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
            return JobResult({}, key, None, {}, time.perf_counter() - start, self.index,
                             error=f"{type(exc).__name__}: {exc}", process=os.getpid(), placement=self.placement)
        return JobResult({t.name: list(results[t.name].scores) for t in job.tasks}, self.harness.last_candidate,
                         self.harness.last_twin, self.task_keys(job.tasks, job.limit), time.perf_counter() - start,
                         self.index, process=os.getpid(), placement=self.placement)

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
        self._processes: dict[int, int] = {}
        """Each worker's process id as last seen (a new one: Ray restarted it)."""

    @abstractmethod
    def _start(self) -> None:
        """Start the workers (once); raises EvomergeError naming a worker that cannot start."""

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
            repeats: dict[str, list[int]] = {}
            for index, job in enumerate(jobs):
                key = self._plan_key(job)
                cached = self._cached(key, job, keys)
                if cached is not None:
                    self._usage.cached += 1
                    yield index, cached
                elif key in repeats:
                    repeats[key].append(index)
                else:
                    repeats[key] = []
                    waiting.append((index, job))
            outstanding = len(waiting)
            self._feed(waiting)
            while outstanding:
                worker, index, result = self._collect()
                self._in_flight -= 1
                outstanding -= 1
                self._account(worker, result, jobs[index], keys)
                self._feed(waiting)  # before the result is handed on: no worker waits for the caller
                yield index, result
                for repeat in repeats.get(result.key, []) if result.error is None else []:
                    self._usage.cached += 1
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
                         twins[0] if twins else None, keys, 0.0, None)

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


def worker_devices(device: str, workers: int, workers_per_gpu: int = 1) -> list[str]:
    """Worker i's device: on CUDA (`cuda`, or `auto` with a GPU) `cuda:g` with
    `workers_per_gpu` workers on each GPU g (round robin past the last GPU), else the run's
    device for every worker."""
    import torch

    if device in ("cuda", "auto") and torch.cuda.is_available():
        return [f"cuda:{(i // workers_per_gpu) % torch.cuda.device_count()}" for i in range(workers)]
    return [device] * workers


def worker_threads(spec: HarnessSpec, workers: int) -> int:
    """Each worker's share of the run's CPU threads (at least one)."""
    import torch

    return max(1, (spec.threads or torch.get_num_threads()) // workers)


class PoolExecutor(DriverExecutor):
    """N worker processes on this machine, started at the first call, fed from one queue
    (none idles while a candidate waits); a worker that dies stops the run."""

    name = "pool"

    def __init__(self, spec: HarnessSpec, workers: int, workers_per_gpu: int = 1):
        super().__init__(spec, workers)
        self.workers_per_gpu = workers_per_gpu
        self._workers: list = []
        self._inbox = self._outbox = None

    def _start(self) -> None:
        if self._workers:
            return
        start = time.perf_counter()
        context = multiprocessing.get_context("spawn")
        self._inbox, self._outbox = context.Queue(), context.Queue()
        threads = worker_threads(self.spec, self.workers)
        for index, device in enumerate(worker_devices(self.spec.device, self.workers, self.workers_per_gpu)):
            process = context.Process(target=_pool_worker, name=f"evomerge-worker-{index}", daemon=True,
                                      args=(index, self.spec, device, threads, self._inbox, self._outbox))
            process.start()
            self._workers.append(process)
        for _ in range(self.workers):
            worker, _, (pid, device) = self._receive("ready")
            self._processes[worker] = pid
        self._usage.startup = time.perf_counter() - start

    def _receive(self, expected: str) -> tuple:
        """The next message of the workers; an error when a worker could not start or died."""
        while True:
            try:
                kind, worker, index, payload = self._outbox.get(timeout=1.0)
            except queue.Empty:
                dead = [(i, p.exitcode) for i, p in enumerate(self._workers) if not p.is_alive()]
                if dead:
                    self.close()
                    raise EvomergeError(f"pool worker {dead[0][0]} died (exit code {dead[0][1]}); the run stopped. "
                                        "Rerun the same command to resume (executor ray restarts dead workers)"
                                        ) from None
                continue
            if kind == "error":
                self.close()
                raise EvomergeError(f"pool worker {worker} could not start: {payload}")
            if kind != expected:
                raise AssertionError(f"pool protocol: expected {expected}, got {kind}")
            return worker, index, payload

    def task_keys(self, tasks: Sequence[Task], limit: Optional[int]) -> dict[str, str]:
        self._start()
        self._inbox.put(("keys", list(tasks), limit))
        return self._receive("keys")[2]

    def _idle(self) -> int:
        return 1  # one queue: every job waits there, the first free worker takes it

    def _submit(self, index: int, job: Job) -> None:
        self._inbox.put(("job", index, job))

    def _collect(self) -> tuple[int, int, JobResult]:
        return self._receive("done")

    def close(self) -> None:
        """Stop the workers: ask them to finish, then terminate any that did not."""
        for _ in self._workers:
            try:
                self._inbox.put(None)
            except (ValueError, OSError):
                break
        deadline = time.monotonic() + 5.0
        for process in self._workers:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
        for process in self._workers:
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
        self._workers, self._inbox, self._outbox = [], None, None
        self._close_planner()


def _pool_worker(index: int, spec: HarnessSpec, device: str, threads: int, inbox, outbox) -> None:
    """A pool worker: build the Worker once, then score jobs until told to stop, or until
    the driver is gone (killed: a worker must not outlive it). Ctrl-C is the driver's to
    handle: it stops the workers."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        worker = Worker(spec, device, index, threads=threads)
    except Exception as exc:  # noqa: BLE001 - the driver reports it, naming the worker
        outbox.put(("error", index, None, f"{type(exc).__name__}: {exc}"))
        return
    outbox.put(("ready", index, None, worker.ready()))
    try:
        while (message := _next_message(inbox)) is not None:
            if message[0] == "keys":
                outbox.put(("keys", index, None, worker.task_keys(*message[1:])))
            else:
                outbox.put(("done", index, message[1], worker.score(message[2])))
    finally:
        worker.close()


def _next_message(inbox) -> Optional[tuple]:
    """The driver's next message; None when it says stop or has died."""
    while True:
        try:
            return inbox.get(timeout=1.0)
        except queue.Empty:
            if not multiprocessing.parent_process().is_alive():
                return None


class RayExecutor(DriverExecutor):
    """N Ray actors (each a Worker), one job in flight per actor, results taken with
    `ray.wait` as they finish. Without `address`, a local Ray cluster is started for the run
    (and stopped at the end) unless this process is already connected to one; with it
    (`auto`, `HOST:PORT`), the actors join that cluster. On GPUs each actor asks Ray for
    1/`workers_per_gpu` of a GPU, so Ray places them; a killed actor is restarted by Ray
    (RAY_MAX_RESTARTS) and its candidate retried once; an actor gone for good leaves the
    run to the others."""

    name = "ray"

    def __init__(self, spec: HarnessSpec, workers: int, address: Optional[str] = None, workers_per_gpu: int = 1):
        super().__init__(spec, workers)
        self.address, self.workers_per_gpu = address, workers_per_gpu
        self._actors: list = []
        self._free: list[int] = []
        self._running: dict = {}
        self._own_cluster = False

    def _start(self) -> None:
        if self._actors:
            return
        ray = import_ray()
        start = time.perf_counter()
        threads = worker_threads(self.spec, self.workers)
        if not ray.is_initialized():
            import logging

            settings = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
            if self.address:
                ray.init(address=self.address, **settings)
            else:
                ray.init(num_cpus=threads * self.workers, **settings)
                self._own_cluster = True
        on_gpu = self.spec.device.startswith("cuda") or (
            self.spec.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
        resources = {"num_gpus": 1 / self.workers_per_gpu, "num_cpus": 1} if on_gpu else {"num_cpus": threads}
        actor = ray.remote(Worker).options(max_restarts=RAY_MAX_RESTARTS, max_task_retries=1, **resources)
        device = "cuda" if on_gpu else self.spec.device  # Ray sets CUDA_VISIBLE_DEVICES to the actor's GPU
        self._actors = [actor.remote(self.spec, device, index, threads=threads) for index in range(self.workers)]
        for index, handle in enumerate(self._actors):
            try:
                self._processes[index] = ray.get(handle.ready.remote())[0]
            except ray.exceptions.RayError as exc:
                self.close()
                raise EvomergeError(f"ray worker {index} could not start: {_ray_cause(exc)}") from None
        self._free = list(range(self.workers))
        self._usage.startup = time.perf_counter() - start

    def task_keys(self, tasks: Sequence[Task], limit: Optional[int]) -> dict[str, str]:
        import ray

        self._start()
        return ray.get(self._actors[self._free[0]].task_keys.remote(list(tasks), limit))

    def _idle(self) -> int:
        if not self._free and not self._running:
            raise EvomergeError(f"every ray worker died more than {RAY_MAX_RESTARTS} times; the run stopped. "
                                "Rerun the same command to resume")
        return len(self._free)

    def _submit(self, index: int, job: Job) -> None:
        worker = self._free.pop(0)
        self._running[self._actors[worker].score.remote(job)] = (worker, index)

    def _collect(self) -> tuple[int, int, JobResult]:
        import ray

        [done], _ = ray.wait(list(self._running), num_returns=1)
        worker, index = self._running.pop(done)
        try:
            result = ray.get(done)
        except ray.exceptions.RayError as exc:  # the actor died twice on this candidate, or for good
            result = JobResult({}, None, None, {}, 0.0, worker, error=f"ray worker {worker} died: {_ray_cause(exc)}")
            if not self._alive(worker):
                return worker, index, result
        self._free.append(worker)
        return worker, index, result

    def _alive(self, worker: int) -> bool:
        import ray

        try:
            ray.get(self._actors[worker].ready.remote(), timeout=120)
            return True
        except ray.exceptions.RayError:
            return False

    def close(self) -> None:
        if self._actors:
            import ray

            for handle in self._actors:
                ray.kill(handle, no_restart=True)
            if self._own_cluster:
                ray.shutdown()
        self._actors, self._free, self._running, self._own_cluster = [], [], {}, False
        self._close_planner()


def _ray_cause(exc: Exception) -> str:
    """The first line of what a Ray error says (its full text holds a remote traceback)."""
    text = str(getattr(exc, "cause", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def import_ray():
    """Ray, or an error naming the install command."""
    try:
        import ray
    except ImportError:
        raise EvomergeError(f"executor ray needs Ray, which is not installed: {RAY_INSTALL}") from None
    return ray


def check_executor(name: str, workers: Optional[int]) -> None:
    """Refuse an executor that does not exist or cannot run here, or a worker count it
    cannot use, before a run touches its folder."""
    if name not in EXECUTORS:
        raise EvomergeError(f"unknown executor {name!r}; known: {', '.join(EXECUTORS)}")
    if workers is not None and workers < 1:
        raise EvomergeError(f"workers: {workers}; an executor needs at least one worker")
    if name == "serial" and workers not in (None, 1):
        raise EvomergeError(f"executor serial runs one worker in this process (got workers: {workers}); "
                            "use executor pool or ray for more")
    if name == "ray":
        import_ray()


def make_executor(name: str, spec: HarnessSpec, workers: Optional[int] = None, *,
                  ray_address: Optional[str] = None, workers_per_gpu: int = 1) -> Executor:
    """The executor `name` (see EXECUTORS); `workers` None: `workers_per_gpu` per GPU on
    CUDA, else 2."""
    check_executor(name, workers)
    if name == "serial":
        return SerialExecutor(spec)
    workers = workers or _default_workers(spec.device, workers_per_gpu)
    if name == "pool":
        return PoolExecutor(spec, workers, workers_per_gpu)
    return RayExecutor(spec, workers, ray_address, workers_per_gpu)


def _default_workers(device: str, workers_per_gpu: int) -> int:
    import torch

    if device in ("cuda", "auto") and torch.cuda.is_available():
        return torch.cuda.device_count() * workers_per_gpu
    return 2
