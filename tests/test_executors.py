"""Executors (evaluation/executors/) on the micro zoo, with real worker processes and real
local Ray clusters: serial, a pool of 2 and Ray with 2 log the same run; failed candidates
are logged and too many in a row stop the run; a killed Ray actor comes back and its
candidate is scored again; a killed driver resumes; no worker process is left behind;
`--executor` is checked before the run folder exists."""
from __future__ import annotations

import json
import multiprocessing
import os
import re
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


# Ray's tests need a network namespace holding only loopback, or leave to use this machine's network

def loopback_only() -> bool:
    """True inside a network namespace that holds only loopback."""
    lines = Path("/proc/net/dev").read_text().splitlines()[2:]
    return {line.split(":")[0].strip() for line in lines} == {"lo"}


RAY_SKIP = ("Ray tests run on loopback only: run them through bash scripts/test.sh (scripts/loopback.sh), or set "
            "EVOMERGE_RAY_ANY_NETWORK=1 to let Ray use this machine's network")
needs_ray = pytest.mark.skipif(not (loopback_only() or os.environ.get("EVOMERGE_RAY_ANY_NETWORK")), reason=RAY_SKIP)


def write_config(folder: Path, zoo: Path, *, fitness: str = "math", extra: str = "", evals: int = 8) -> Path:
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
  optimizer: {{max_evals: {evals}, popsize: 4}}
device: cpu
threads: 2
{extra}""")
    return path


def logged(run_dir: Path) -> list[tuple]:
    """The candidate log in ask order (its lines are in finish order), without timings and
    candidate keys (a key names its sources' folders, which differ between run folders)."""
    rows = [json.loads(line) for line in (run_dir / "candidates.jsonl").read_text().splitlines()]
    return sorted((r["stage"], r["round"], r["kind"], r["index"], r["genome"], r["fitness"], r["scores"],
                   r.get("error")) for r in rows)


@pytest.fixture(scope="module")
def serial_run(micro_zoo, tmp_path_factory) -> tuple[Path, dict]:
    """The run every executor must log: its candidates' fitness differs (the merges of lang
    and math answer some math questions), so equal logs mean equal scores."""
    folder = tmp_path_factory.mktemp("serial")
    results = evolve(write_config(folder, micro_zoo[0]), folder / "run", progress=False)
    assert len({row[5] for row in logged(folder / "run")}) > 1
    return folder / "run", results


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
@pytest.mark.parametrize("method, children_per_ask", [("ps+dfs", None), ("m2n2", None), ("m2n2", 2)])
def test_every_method_logs_the_same_run_with_a_pool(method, children_per_ask, micro_zoo, tmp_path):
    """DFS recipes (layer stacks over the PS merge) and M2N2's coefficient recipes travel to
    the workers and score there as in this process; M2N2 with two children per round gives
    both workers one."""
    from test_evolve import write_config as write_method_config

    runs = {}
    for executor, workers in (("serial", None), ("pool", 2)):
        (tmp_path / executor).mkdir()
        config = write_method_config(tmp_path / executor, micro_zoo[0], method=method, evals=6)
        if children_per_ask:
            config.write_text(config.read_text().replace("population_size: 5}",
                                                         f"population_size: 5, children_per_ask: {children_per_ask}}}"))
        evolve(config, tmp_path / executor / "run", progress=False, executor=executor, workers=workers)
        runs[executor] = logged(tmp_path / executor / "run")
    assert runs["pool"] == runs["serial"]
    if children_per_ask:
        rounds = [json.loads(line)["round"] for line in (tmp_path / "pool" / "run" / "candidates.jsonl").open()]
        assert sorted(rounds) == [0, 0, 1, 1, 2, 2, 3, 3]  # the seeds, then 6 children two by two


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


def test_a_worker_in_the_middle_of_a_candidate_exits_with_its_driver(tmp_path):
    """A worker learns of a dead driver between candidates, and one candidate of a real
    model takes minutes: its watchdog ends it within a second, mid-candidate (here a sleep)."""
    import psutil

    script = tmp_path / "driver.py"
    script.write_text("""\
import multiprocessing, time
from evaluation.executors.pool import exit_with_parent

def scoring_a_long_candidate():
    exit_with_parent(0.2)
    time.sleep(120)

if __name__ == "__main__":
    worker = multiprocessing.get_context("spawn").Process(target=scoring_a_long_candidate)
    worker.start()
    print(worker.pid, flush=True)
    time.sleep(120)
""")
    driver = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    worker = psutil.Process(int(driver.stdout.readline()))
    time.sleep(1.0)  # the worker is inside its candidate
    assert worker.is_running()
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    gone, alive = psutil.wait_procs([worker], timeout=10)
    assert not alive, "the worker outlived its driver"


@pytest.mark.parametrize("executor", ["pool", pytest.param("ray", marks=needs_ray)])
def test_candidates_that_fail_in_workers_are_logged_and_too_many_in_a_row_stop_the_run(executor, micro_zoo,
                                                                                       tmp_path):
    """Every candidate's scoring raises inside its worker (the fitness data has no answers):
    each is logged with its error and fitness null, the workers go on, and the third failure
    in a row (max_failures: 2) stops the run with the error; no worker process is left."""
    data = tmp_path / "broken.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} + 1 ="}) + "\n" for i in range(4)))
    config = write_config(tmp_path, micro_zoo[0], fitness=str(data),
                          extra=f"executor: {executor}\nworkers: 2\nmax_failures: 2\n")
    with pytest.raises(EvomergeError, match=r"3 candidates of the ps stage failed in a row \(max_failures: 2\); "
                                            r"the last: KeyError: 'answer'"):
        evolve(config, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "candidates.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["fitness"] is None and r["error"] == "KeyError: 'answer'" for r in rows)
    assert not multiprocessing.active_children()


def test_executor_ray_without_ray_names_the_install_command(micro_zoo, tmp_path):
    """Checked before the run folder exists, as an unknown worker count is."""
    config = write_config(tmp_path, micro_zoo[0])
    hide_ray = "import sys; sys.modules['ray'] = None; from evomerge.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", hide_ray, "evolve", str(config), "--run-dir", str(tmp_path / "run"),
                           "--executor", "ray"], capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "executor ray needs Ray, which is not installed: pip install 'evomerge[ray]'" in done.stderr
    assert main(["evolve", str(config), "--run-dir", str(tmp_path / "run"), "--executor", "serial",
                 "--workers", "2"]) == 2
    assert not (tmp_path / "run").exists()


# Ray: real local clusters, on loopback only (scripts/loopback.sh, which the test command uses;
# needs_ray above)

def run_in_background(config: Path, run_dir: Path, *options: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "evomerge", "evolve", str(config), "--run-dir", str(run_dir), "--no-progress",
               *options]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})


def wait_for_lines(run_dir: Path, count: int, process: subprocess.Popen) -> None:
    log, deadline = run_dir / "candidates.jsonl", time.time() + 300
    while len(log.read_text().splitlines() if log.exists() else []) < count:
        assert process.poll() is None, f"the run ended early: {process.stderr.read()}"
        assert time.time() < deadline, "no candidate logged in 5 minutes"
        time.sleep(0.02)


@needs_ray
def test_ray_with_two_workers_logs_what_serial_logs(serial_run, micro_zoo, tmp_path):
    """A local Ray cluster started for the run, two actors: the serial run's log, every
    actor used, and the cluster gone afterwards."""
    import ray

    config = write_config(tmp_path, micro_zoo[0], extra="executor: ray\nworkers: 2\n")
    results = evolve(config, tmp_path / "run", progress=False)
    assert logged(tmp_path / "run") == logged(serial_run[0])
    usage = results["executor"]["ps"]
    assert usage["executor"] == "ray" and usage["scored"] == len(logged(serial_run[0])) and usage["restarts"] == 0
    assert all(busy > 0 for busy in usage["busy_seconds"]), "an actor was given nothing"
    assert len(usage["placement"]) == 1
    assert re.fullmatch(r"sources \([\d.]+ MiB\) memory-mapped in host memory, streamed per candidate",
                        usage["placement"][0])
    assert not ray.is_initialized()


@needs_ray
def test_a_ray_worker_killed_mid_candidate_is_replaced_and_the_run_logs_what_serial_logs(serial_run, micro_zoo,
                                                                                          tmp_path):
    """SIGKILL an actor while it scores a candidate: Ray restarts it, the candidate is
    scored again, and the run completes with the uninterrupted run's log."""
    import psutil

    config = write_config(tmp_path, micro_zoo[0], extra="executor: ray\nworkers: 2\n")
    run_dir = tmp_path / "run"
    driver = run_in_background(config, run_dir)
    wait_for_lines(run_dir, 1, driver)
    victim = None
    while victim is None and driver.poll() is None:
        victim = next((p for p in psutil.process_iter(["cmdline"])
                       if (p.info["cmdline"] or [""])[0].startswith("ray::Worker.score")), None)
    assert victim is not None, "no actor was seen scoring before the run ended"
    victim.kill()
    assert driver.wait(timeout=600) == 0, driver.stderr.read()
    assert logged(run_dir) == logged(serial_run[0])
    usage = json.loads((run_dir / "results.json").read_text())["executor"]["ps"]
    assert usage["restarts"] == 1 and usage["failed"] == 0


@pytest.mark.slow
@needs_ray
def test_a_killed_ray_driver_resumes_with_nothing_lost_and_nothing_scored_twice(serial_run, micro_zoo, tmp_path):
    """SIGKILL the driver once 4 candidates are logged: the same command resumes to the
    uninterrupted log, and the resumed session scores only the candidates the score cache
    did not hold. The killed driver's local Ray cluster stops by itself (its agents notice
    their raylet is gone within about a minute)."""
    import psutil

    config = write_config(tmp_path, micro_zoo[0], extra="executor: ray\nworkers: 2\n")
    run_dir = tmp_path / "run"
    driver = run_in_background(config, run_dir)
    wait_for_lines(run_dir, 4, driver)
    cluster = psutil.Process(driver.pid).children(recursive=True)
    driver.kill()
    driver.wait()
    cached = {json.loads(line)["candidate"] for line in (run_dir / "scores.jsonl").read_text().splitlines()}

    assert main(["evolve", str(config), "--run-dir", str(run_dir), "--no-progress"]) == 0
    assert logged(run_dir) == logged(serial_run[0])
    lines = [json.loads(line) for line in (run_dir / "scores.jsonl").read_text().splitlines()]
    assert len(lines) == len({(c["candidate"], c["task_key"]) for c in lines})
    usage = json.loads((run_dir / "results.json").read_text())["executor"]["ps"]
    assert usage["scored"] == len(logged(run_dir)) - len(cached)
    gone, alive = psutil.wait_procs(cluster, timeout=120)
    assert not alive, f"the killed driver's Ray cluster outlived it: {[p.name() for p in alive]}"


@needs_ray
def test_on_ray_a_candidate_with_non_finite_logits_fails_alone(micro_zoo, tmp_path):
    """Three candidates on two actors; the middle one's weights overflow to Inf (a linear
    merge with weight 1e39): it comes back with its error, the actor goes on, and the others'
    per-example scores are the serial executor's."""
    from evaluation.executors import HarnessSpec, Job, make_executor
    from evaluation.tasks import resolve_task
    from merging.recipe import parse_recipe

    models = micro_zoo[0] / "models"
    recipe = lambda a, b, normalize="true": parse_recipe(  # noqa: E731
        f"merge_method: linear\nparameters: {{normalize: {normalize}}}\nmodels:\n"
        f"  - {{model: {models / 'lang'}, parameters: {{weight: {a}}}}}\n"
        f"  - {{model: {models / 'math'}, parameters: {{weight: {b}}}}}\n")
    recipes = [recipe(0.3, 0.7), recipe("1.0e+39", "1.0e+39", "false"), recipe(0.6, 0.4)]
    tasks = [resolve_task("math", zoo_dir=micro_zoo[0], split="train")]
    checkpoints = {str(models / name): str(models / name) for name in ("lang", "math")}
    jobs = [Job(r, checkpoints, tasks, 16, 0) for r in recipes]
    spec = HarnessSpec(str(models / "base"), device="cpu", threads=2)
    scores = {}
    for name, workers in (("serial", None), ("ray", 2)):
        with make_executor(name, spec, workers) as executor:
            scores[name] = dict(executor.score(jobs))
    assert "logits are not finite" in scores["ray"][1].error and scores["ray"][1].scores == {}
    assert [scores["ray"][i].scores for i in (0, 2)] == [scores["serial"][i].scores for i in (0, 2)]
    assert all(scores["ray"][i].error is None for i in (0, 2))


def test_a_pool_scores_a_candidate_a_population_holds_twice_once(micro_zoo, tmp_path):
    """Two equal recipes in one population: the driver sends one to the workers and answers
    the other with its scores; sources kept in memory (`sources: device`) score as the
    memory-mapped ones of the serial executor."""
    from dataclasses import replace

    from evaluation.executors import HarnessSpec, Job, make_executor
    from evaluation.tasks import resolve_task
    from merging.recipe import parse_recipe

    models = micro_zoo[0] / "models"
    recipe = lambda a: parse_recipe(  # noqa: E731
        f"merge_method: linear\nmodels:\n  - {{model: {models / 'lang'}, parameters: {{weight: {a}}}}}\n"
        f"  - {{model: {models / 'math'}, parameters: {{weight: {1 - a}}}}}\n")
    tasks = [resolve_task("math", zoo_dir=micro_zoo[0], split="train")]
    checkpoints = {str(models / name): str(models / name) for name in ("lang", "math")}
    jobs = [Job(recipe(a), checkpoints, tasks, 16, 0) for a in (0.3, 0.3, 0.6)]
    spec = HarnessSpec(str(models / "base"), device="cpu", threads=2, cache=str(tmp_path / "scores.jsonl"))
    with make_executor("pool", replace(spec, sources="device"), 2) as executor:
        pooled = dict(executor.score(jobs))
        usage = executor.usage()
    assert usage.scored == 2 and usage.cached == 1
    assert pooled[0].scores == pooled[1].scores and pooled[0].key == pooled[1].key
    assert len(usage.placement) == 1 and re.fullmatch(r"sources \([\d.]+ MiB\) kept on cpu", usage.placement[0])
    with make_executor("serial", replace(spec, cache=None)) as executor:
        serial = dict(executor.score(jobs))
    assert [pooled[i].scores for i in range(3)] == [serial[i].scores for i in range(3)]


@pytest.mark.slow
@needs_ray
def test_ray_joins_a_running_cluster_and_leaves_it_running(serial_run, micro_zoo, tmp_path):
    """`--ray-address HOST:PORT`: the actors run on a cluster started outside the run (`ray
    start --head`), the run logs the serial run's log, and the cluster is still there after."""
    import socket

    import ray

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray_cli = [sys.executable, "-m", "ray.scripts.scripts"]
    subprocess.run([*ray_cli, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                    "--disable-usage-stats"], check=True, capture_output=True)
    try:
        config = write_config(tmp_path, micro_zoo[0], extra="executor: ray\nworkers: 2\n")
        address = f"127.0.0.1:{port}"
        assert main(["evolve", str(config), "--run-dir", str(tmp_path / "run"), "--no-progress",
                     "--ray-address", address]) == 0
        assert logged(tmp_path / "run") == logged(serial_run[0])
        assert ray.is_initialized()  # the run did not stop a cluster it did not start
        ray.shutdown()
        ray.init(address=address, logging_level="ERROR")
        assert ray.cluster_resources().get("CPU") == 2
    finally:
        ray.shutdown()
        subprocess.run([*ray_cli, "stop", "--force"], capture_output=True)
