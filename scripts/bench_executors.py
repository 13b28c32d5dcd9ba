#!/usr/bin/env python3
"""Evaluations per minute of the executors: serial, and a pool and Ray with 1 and 2 workers,
at the same total thread count, on the small zoo's PS config (recipes/zoo-small-ps.yaml).

Each executor runs the same short search in a fresh run folder (so nothing is cached) and
reports what its usage measured while the driver waited for scores: candidates scored per
minute of that wall time, each worker's utilisation (busy / wall), the start-up (spawning
the workers, or starting a local Ray cluster and its actors, and loading their resident
models: paid once per stage) and the
per-candidate overhead of the executor (wall x workers - busy, per candidate: dispatch,
result transfer, waiting at the end of a round) against a candidate's evaluation time.
Results go to docs/benchmarks.md.

    bash scripts/loopback.sh python3 scripts/bench_executors.py [--zoo DIR] [--max-evals 20] [--limit 100]
        [--threads 2] [--no-docs]

(loopback.sh keeps Ray's traffic on loopback: see scripts/loopback.sh.)
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from benchdocs import update_section  # noqa: E402
from evaluation.zoo import ZOO_HOME  # noqa: E402
from niches.run import evolve  # noqa: E402

SETTINGS = [("serial", None), ("pool", 1), ("pool", 2), ("ray", 1), ("ray", 2)]


def run_one(executor: str, workers: int | None, args, folder: Path) -> dict:
    template = (ROOT / "recipes" / "zoo-small-ps-template.yaml").read_text()
    (folder / "template.yaml").write_text(template)
    config = folder / "config.yaml"
    config.write_text(f"""\
method: ps
zoo: {args.zoo}
models: [zoo:lang, zoo:math]
fitness: {{tasks: [math_lang], split: train, limit: {args.limit}}}
report: {{tasks: [math_lang], split: test, limit: 10}}
ps:
  template: template.yaml
  optimizer: {{max_evals: {args.max_evals}, popsize: 10, sigma0: 0.2}}
seed: 0
device: cpu
threads: {args.threads}
""")
    results = evolve(config, folder / "run", progress=False, executor=executor, workers=workers)
    return results["executor"]["ps"]


def row(name: str, usage: dict) -> str:
    wall, busy, scored = usage["wall_seconds"], usage["busy_seconds"], usage["scored"]
    per_candidate = sum(busy) / scored
    overhead = (wall * len(busy) - sum(busy)) / scored
    utilisation = ", ".join(f"{u:.0%}" for u in usage["utilisation"])
    return (f"| {name} | {scored} | {60 * scored / wall:.1f} | {utilisation} | {usage['startup_seconds']:.1f} | "
            f"{per_candidate:.2f} | {overhead:.3f} ({overhead / per_candidate:.1%}) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=ZOO_HOME / "small")
    parser.add_argument("--max-evals", type=int, default=20)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each executor, in turns (serial, pool, ..., serial, pool, ...); the table "
                             "gives each executor's median run by evaluations per minute")
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()
    runs: dict[tuple, list[dict]] = {setting: [] for setting in SETTINGS}
    for turn in range(args.repeats):
        for executor, workers in SETTINGS:
            with tempfile.TemporaryDirectory() as folder:
                usage = run_one(executor, workers, args, Path(folder))
            runs[executor, workers].append(usage)
            print(f"turn {turn + 1}: {row(name_of(executor, workers), usage)}", flush=True)
    lines = ["| executor | candidates | evaluations / min | utilisation per worker | start-up s | "
             "evaluation s / candidate | executor overhead s / candidate |", "|---|---|---|---|---|---|---|"]
    for (executor, workers), usages in runs.items():
        lines.append(row(name_of(executor, workers), sorted(usages, key=throughput)[len(usages) // 2]))
    medians = {setting: throughput(sorted(usages, key=throughput)[args.repeats // 2])
               for setting, usages in runs.items()}
    speedups = ", ".join(f"{name_of(*setting)} {value / medians['serial', None]:.2f}x"
                         for setting, value in medians.items() if setting[0] != "serial")
    command = "bash scripts/loopback.sh python3 scripts/bench_executors.py " + shlex.join(sys.argv[1:])
    body = "\n".join([f"`{command.strip()}` on {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                      f"{args.threads} torch threads in all (each worker of a pool or Ray gets its share), "
                      f"{args.max_evals} candidates of the small zoo's PS search, fitness limit {args.limit}; "
                      f"the median of {args.repeats} run(s) of each executor, taken in turns.", "",
                      *lines, "", f"Throughput against serial: {speedups}."])
    print(body)
    if not args.no_docs:
        update_section("executors", "Executors: serial, pool and Ray (cpu)", body)


def name_of(executor: str, workers: int | None) -> str:
    return executor if workers is None else f"{executor}, {workers} worker{'s' * (workers > 1)}"


def throughput(usage: dict) -> float:
    """Candidates scored per second of the driver's wait."""
    return usage["scored"] / usage["wall_seconds"]


if __name__ == "__main__":
    main()
