#!/usr/bin/env python3
"""How many evaluations functional hashing saves, and what its probe costs.

Runs each evolve config in a temporary run folder and prints, per config: the candidates
logged, those with the same plan (candidate key) as an earlier one (served from the
score cache: no probe, no evaluation), those probed (the rest; the report's scoring of
the best merge is one more), the functional twins among them (scores reused:
evaluations saved), and the probe's seconds per probed candidate against the seconds
one candidate's evaluation on the fitness tasks takes.

    python3 scripts/bench_functional_hash.py [CONFIG ...] [--max-evals N] [--zoo SIZE_OR_FOLDER]

Default configs: the small zoo's PS, DFS and M2N2 runs (build the zoo first:
`evomerge zoo build --size small`). Twins are read from the run folder's score cache
(lines that name a `twin`); times come from wrapping the harness's probe and evaluation.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import evaluation.harness as harness  # noqa: E402
from evaluation.cache import read_jsonl  # noqa: E402

DEFAULT_CONFIGS = [ROOT / "recipes" / name for name in ("zoo-small-ps.yaml", "zoo-small-dfs.yaml",
                                                        "zoo-small-m2n2.yaml")]


class Clock:
    """Seconds and calls of one wrapped function, per `key(*args)`."""

    def __init__(self, function, key=lambda *args: None):
        self.function, self.key = function, key
        self.seconds: dict = {}
        self.calls: dict = {}

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.function(*args, **kwargs)
        finally:
            key = self.key(*args)
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start
            self.calls[key] = self.calls.get(key, 0) + 1


def with_zoo(config: Path, zoo: str, folder: Path) -> Path:
    """A copy of `config` (and the YAML files beside it, which it may name) using `zoo`."""
    import yaml

    for path in config.parent.glob("*.yaml"):
        shutil.copy2(path, folder / path.name)
    settings = yaml.safe_load(config.read_text())
    settings["zoo"] = zoo
    (folder / config.name).write_text(yaml.safe_dump(settings, sort_keys=False))
    return folder / config.name


def bench(config: Path, max_evals: int | None) -> dict:
    """One run of `config` in a temporary folder, timed."""
    import yaml

    from niches.run import evolve

    fitness = yaml.safe_load(config.read_text())["fitness"]
    probe = Clock(harness.probe_output)
    evaluate = Clock(harness.evaluate, key=lambda model, tokenizer, task, *rest: task.split == fitness["split"])
    harness.probe_output, harness.evaluate = probe, evaluate
    try:
        with tempfile.TemporaryDirectory() as folder:
            run_dir = Path(folder) / "run"
            start = time.perf_counter()
            evolve(config, run_dir, max_evals=max_evals, progress=False)
            wall = time.perf_counter() - start
            rows = read_jsonl(run_dir / "candidates.jsonl")
            keys = [row.get("candidate") or row.get("recipe_hash") for row in rows]  # the key the loop logs
            twins = {row["candidate"] for row in read_jsonl(run_dir / "scores.jsonl") if row.get("twin")}
    finally:
        harness.probe_output, harness.evaluate = probe.function, evaluate.function
    probes = probe.calls.get(None, 0)
    evaluated = evaluate.calls.get(True, 0) / len(fitness["tasks"])  # candidates scored on the fitness tasks
    return {"config": config.name, "logged": len(rows), "same_plan": len(keys) - len(set(keys)), "probed": probes,
            "twins": len(twins),
            "probe_s": probe.seconds.get(None, 0.0) / max(probes, 1),
            "evaluation_s": evaluate.seconds.get(True, 0.0) / max(evaluated, 1), "wall_s": wall}


def table(rows: list[dict]) -> str:
    lines = ["| config | candidates logged | same plan as an earlier one | probed | functional twins "
             "| probe s / candidate | evaluation s / candidate | probe / evaluation | wall s |", "|---" * 9 + "|"]
    for r in rows:
        share = r["probe_s"] / r["evaluation_s"] if r["evaluation_s"] else float("nan")
        lines.append(f"| {r['config']} | {r['logged']} | {r['same_plan']} | {r['probed']} | {r['twins']} "
                     f"| {r['probe_s']:.3f} "
                     f"| {r['evaluation_s']:.3f} | {share:.1%} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="*", type=Path, default=DEFAULT_CONFIGS)
    parser.add_argument("--max-evals", type=int, default=None, help="budget per stage (default: the config's)")
    parser.add_argument("--zoo", default=None, help="run the configs on this zoo (a size or folder) instead")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as copies:
        for config in args.configs:
            if args.zoo:
                folder = Path(copies) / config.stem
                folder.mkdir()
                config = with_zoo(config, args.zoo, folder)
            rows.append(bench(config, args.max_evals))
            print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
