"""The Ray executor: N Ray actors, each a Worker, on a local cluster started for the run or
on a running one. Ray places them (GPUs, CPUs), restarts a killed actor and retries its
candidate; the driver takes results with `ray.wait` as they finish."""
from __future__ import annotations

import time
from typing import Optional, Sequence

from evaluation.executors.base import DriverExecutor, worker_threads
from evaluation.executors.worker import HarnessSpec, Job, JobResult, Worker
from evaluation.tasks import Task
from merging.errors import EvomergeError


RAY_INSTALL = "pip install 'evomerge[ray]'"

RAY_MAX_RESTARTS = 4
"""How often Ray brings back one actor that died (killed, out of host memory, a crash in
native code) before the run goes on without it."""


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

    def _worker_task_keys(self, tasks: Sequence[Task], limit: Optional[int]) -> dict[str, str]:
        import ray

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
            result = JobResult({}, None, None, 0.0, worker, error=f"ray worker {worker} died: {_ray_cause(exc)}")
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
