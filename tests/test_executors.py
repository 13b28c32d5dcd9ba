"""Executors (evaluation/executors.py) on the micro zoo: serial and a pool of 2 workers give
the same run; a candidate that fails in a worker stops the run with its error; the pool
leaves no process behind; `--executor` is checked before the run folder exists."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evomerge.cli import main
from merging.errors import EvomergeError
from niches.run import evolve
from tests.test_evolve import TEMPLATE


def write_config(folder: Path, zoo: Path, *, fitness: str = "math_lang", extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "template.yaml").write_text(TEMPLATE)
    path = folder / "config.yaml"
    path.write_text(f"""\
method: ps
zoo: {zoo}
models: [zoo:lang, zoo:math]
fitness: {{tasks: [{fitness}], split: train, limit: 16}}
report: {{tasks: [math_lang], split: test, limit: 8}}
ps:
  template: template.yaml
  optimizer: {{max_evals: 8, popsize: 4}}
device: cpu
threads: 2
{extra}""")
    return path


def logged(run_dir: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (run_dir / "candidates.jsonl").read_text().splitlines()]
    return [(r["kind"], r["index"], r["round"], r["genome"], r["fitness"], r["scores"]) for r in rows]


@pytest.fixture(scope="module")
def serial_run(micro_zoo, tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("serial")
    return folder / "run", evolve(write_config(folder, micro_zoo[0]), folder / "run", progress=False)


def test_a_pool_of_two_workers_logs_what_serial_logs(serial_run, micro_zoo, tmp_path):
    """Same config and seed: the same candidates (genomes, rounds) with the same fitness
    and per-task scores, whichever worker scored each; the config's executor keys."""
    config = write_config(tmp_path, micro_zoo[0], extra="executor: pool\nworkers: 2\n")
    results = evolve(config, tmp_path / "run", progress=False)
    serial_dir, serial_results = serial_run
    assert logged(tmp_path / "run") == logged(serial_dir)
    assert results["stages"]["ps"]["best_fitness"] == serial_results["stages"]["ps"]["best_fitness"]
    usage = results["executor"]["ps"]
    assert usage["executor"] == "pool" and usage["workers"] == 2
    assert usage["scored"] == len(logged(serial_dir)) and usage["cached"] == 0
    assert all(busy > 0 for busy in usage["busy_seconds"]), "a worker was given nothing"
    assert all(0 < u <= 1 for u in usage["utilisation"])
    assert serial_results["executor"]["ps"]["executor"] == "serial"
    assert not multiprocessing.active_children()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ps+dfs", "m2n2"])
def test_every_method_logs_the_same_run_with_a_pool(method, micro_zoo, tmp_path):
    """DFS recipes (layer stacks over the PS merge) and M2N2's coefficient recipes travel to
    the workers and score there as in this process."""
    from test_evolve import write_config as write_method_config

    runs = {}
    for executor, workers in (("serial", None), ("pool", 2)):
        (tmp_path / executor).mkdir()
        config = write_method_config(tmp_path / executor, micro_zoo[0], method=method, evals=6)
        evolve(config, tmp_path / executor / "run", progress=False, executor=executor, workers=workers)
        runs[executor] = logged(tmp_path / executor / "run")
    assert runs["pool"] == runs["serial"]


def test_a_pool_resumes_a_serial_run_from_the_score_cache(serial_run, micro_zoo, tmp_path):
    """The driver owns the score cache: a replay through the pool scores nothing again."""
    import shutil

    serial_dir, _ = serial_run
    shutil.copytree(serial_dir.parent, tmp_path / "copy")
    results = evolve(tmp_path / "copy" / "config.yaml", tmp_path / "copy" / "run", progress=False,
                     executor="pool", workers=2)
    usage = results["executor"]["ps"]
    assert usage["scored"] == 0 and usage["cached"] == len(logged(serial_dir))
    assert logged(tmp_path / "copy" / "run") == logged(serial_dir)


def test_a_killed_driver_takes_its_workers_along_and_its_run_resumes(serial_run, micro_zoo, tmp_path):
    """SIGKILL the driver of a pool once a round is logged: its workers exit by themselves,
    and the same command resumes the run to the uninterrupted serial log, scoring nothing
    twice (one cache line per candidate and task)."""
    import psutil

    config = write_config(tmp_path, micro_zoo[0], extra="executor: pool\nworkers: 2\n")
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "evomerge", "evolve", str(config), "--run-dir", str(run_dir), "--no-progress"]
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    log, deadline = run_dir / "candidates.jsonl", time.time() + 120
    while time.time() < deadline and len(log.read_text().splitlines() if log.exists() else []) < 4:
        time.sleep(0.02)
    workers = [p for p in psutil.Process(driver.pid).children(recursive=True) if "python" in p.name().lower()]
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert len(workers) >= 2 and not (run_dir / "best").exists()
    gone, alive = psutil.wait_procs(workers, timeout=15)
    assert not alive, f"workers outlived their driver: {alive}"

    assert main(["evolve", str(config), "--run-dir", str(run_dir), "--no-progress"]) == 0
    assert logged(run_dir) == logged(serial_run[0])
    cache = [json.loads(line) for line in (run_dir / "scores.jsonl").read_text().splitlines()]
    keys = [(c["candidate"], c["task_key"]) for c in cache]
    assert len(keys) == len(set(keys))


def test_a_candidate_that_fails_in_a_worker_stops_the_run_and_the_workers(micro_zoo, tmp_path):
    """Every candidate's scoring raises inside its worker (the fitness data has no answers):
    the run stops with an error naming the worker and the candidate, logs nothing, and no
    worker process is left."""
    data = tmp_path / "broken.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} + 1 ="}) + "\n" for i in range(4)))
    config = write_config(tmp_path, micro_zoo[0], fitness=str(data), extra="executor: pool\nworkers: 2\n")
    with pytest.raises(EvomergeError, match=r"pool worker \d, candidate \d"):
        evolve(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "candidates.jsonl").is_file() or not logged(tmp_path / "run")
    assert not multiprocessing.active_children()


def test_executor_ray_is_refused_before_the_run_folder_exists(micro_zoo, tmp_path, capsys):
    config = write_config(tmp_path, micro_zoo[0])
    assert main(["evolve", str(config), "--run-dir", str(tmp_path / "run"), "--executor", "ray"]) == 2
    assert "executor ray is not built yet" in capsys.readouterr().err
    assert main(["evolve", str(config), "--run-dir", str(tmp_path / "run"), "--executor", "serial",
                 "--workers", "2"]) == 2
    assert "executor serial runs one worker" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
