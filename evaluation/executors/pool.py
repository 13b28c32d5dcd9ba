"""The pool executor: N worker processes on this machine (spawned), one per GPU or with a
share of the CPU threads, fed from one queue. A worker that dies stops the run (Ray's
actors are the ones that come back: ray_actors.py)."""
from __future__ import annotations

import multiprocessing
import os
import queue
import threading
import time
from typing import Optional, Sequence

from evaluation.executors.base import DriverExecutor, worker_threads
from evaluation.executors.worker import HarnessSpec, Job, JobResult, Worker
from evaluation.tasks import Task
from merging.errors import EvomergeError


def worker_devices(device: str, workers: int, workers_per_gpu: int = 1) -> list[str]:
    """Worker i's device: on CUDA (`cuda`, or `auto` with a GPU) `cuda:g` with
    `workers_per_gpu` workers on each GPU g (round robin past the last GPU), else the run's
    device for every worker."""
    import torch

    if device in ("cuda", "auto") and torch.cuda.is_available():
        return [f"cuda:{(i // workers_per_gpu) % torch.cuda.device_count()}" for i in range(workers)]
    return [device] * workers


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

    def _worker_task_keys(self, tasks: Sequence[Task], limit: Optional[int]) -> dict[str, str]:
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
    exit_with_parent()
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


def exit_with_parent(interval: float = 1.0) -> None:
    """End this process within `interval` seconds of its parent's death, even in the middle
    of a candidate: a killed driver's worker would otherwise go on scoring (a minute or more
    on a real model) beside the driver that replaces it. A daemon thread, because the main
    thread is inside torch; it polls, because Linux's parent-death signal follows the parent
    thread that started the process, not the process."""
    parent = multiprocessing.parent_process()

    def watch() -> None:
        while parent.is_alive():
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _next_message(inbox) -> Optional[tuple]:
    """The driver's next message; None when it says stop or has died."""
    while True:
        try:
            return inbox.get(timeout=1.0)
        except queue.Empty:
            if not multiprocessing.parent_process().is_alive():
                return None
