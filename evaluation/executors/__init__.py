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
with its error and ranks it last). A worker that cannot start, or a pool worker that dies, stops the
run: Ray's actors are the ones that come back.

The score cache has one writer. In a pool or on Ray the driver owns it: it plans each
candidate (headers only) to know its key, answers cached candidates itself, sends one copy
of each distinct candidate to the workers (a population may ask for the same candidate
twice), and appends scores as they arrive. The workers' harnesses have no cache file and
no functional twins, since twins found in a worker would depend on which candidates that
worker happened to score before. A candidate's scores depend only on its recipe, the tasks
and the seed, never on the worker: every worker loads the same template in the same dtype
and merges with the same seed.

Files: worker.py (the Worker, and what travels to it and back), base.py (the Executor
interface, Usage, the driver side shared by pool and Ray), serial.py, pool.py,
ray_actors.py; this file picks one (`make_executor`).
"""
from __future__ import annotations

from typing import Optional

from evaluation.executors.base import DriverExecutor, Executor, Usage, worker_threads
from evaluation.executors.pool import PoolExecutor, worker_devices
from evaluation.executors.ray_actors import RAY_INSTALL, RayExecutor, import_ray
from evaluation.executors.serial import SerialExecutor
from evaluation.executors.worker import HarnessSpec, Job, JobResult, Worker, build_harness
from merging.errors import EvomergeError

__all__ = ["EXECUTORS", "DriverExecutor", "Executor", "HarnessSpec", "Job", "JobResult", "PoolExecutor",
           "RAY_INSTALL", "RayExecutor", "SerialExecutor", "Usage", "Worker", "build_harness", "check_executor",
           "import_ray", "make_executor", "worker_devices", "worker_threads"]

EXECUTORS = ("serial", "pool", "ray")


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
