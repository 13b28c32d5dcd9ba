#!/usr/bin/env python3
"""Time length-sorted batching against batches in data order, on the real zoo's tasks.

Batched scoring pads every row of a batch to its longest one; the padded positions cost
as much compute as real tokens. `evaluation.scoring` batches examples of similar lengths
together (and returns the results in data order). Its peer here is what it replaced,
consecutive examples per batch: the same functions called on one data-order chunk at a
time, so that sorting inside a chunk changes nothing. Both arms score the same model on
the same examples; the table gives the padded share of the tokens (exact, from the
tokenizer), the CPU time and the wall time (medians of the repeats, arms alternating), and
compares the two arms' scores example by example. It runs torch on one thread and compares
CPU seconds: on a machine shared with other work (this one runs long studies) wall time
follows the neighbours' load, while one thread's CPU time is the work done.

Uses the real zoo's `math` model, `math_de` dev (generation, as the EvoLLM-real study's
fitness) and `german` dev (perplexity). Results go to docs/benchmarks.md.

    python3 scripts/bench_batching.py [--zoo DIR] [--batch-size 50] [--repeats 3] [--no-docs]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchdocs import update_section  # noqa: E402
from evaluation.harness import Harness  # noqa: E402
from evaluation.scoring import evaluate, wants_bos  # noqa: E402
from evaluation.tasks import Task, zoo_tasks  # noqa: E402
from evaluation.zoo import ZOO_HOME  # noqa: E402

TASKS = ["math_de", "german"]


def padded_share(lengths: list[int], batch_size: int) -> float:
    """The share of padding in the batches of `lengths` taken in the given order."""
    real = padded = 0
    for start in range(0, len(lengths), batch_size):
        batch = lengths[start:start + batch_size]
        real += sum(batch)
        padded += max(batch) * len(batch) - sum(batch)
    return padded / (real + padded)


def token_lengths(harness: Harness, task: Task, examples: list[dict]) -> list[int]:
    bos = 1 if task.kind == "generate" and wants_bos(task, harness.tokenizer) else 0
    return [bos + len(harness.tokenizer(task.prompt(e), add_special_tokens=False)["input_ids"]) for e in examples]


def score_in_data_order(harness: Harness, task: Task, examples: list[dict], batch_size: int) -> list[float]:
    """The peer: each batch the next `batch_size` examples of the data."""
    scores: list[float] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        scores += evaluate(harness.model, harness.tokenizer, task, examples=chunk, batch_size=batch_size).scores
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, default=ZOO_HOME / "real",
                        help="the real zoo (evomerge zoo build --size real)")
    parser.add_argument("--batch-size", type=int, default=50, help="as the EvoLLM-real study's recipes")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per arm (the median is kept)")
    parser.add_argument("--no-docs", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    if not (args.zoo / "zoo.json").is_file():
        print(f"no zoo in {args.zoo}: build it with `evomerge zoo build --size real`", file=sys.stderr)
        return 2

    torch.set_num_threads(1)
    harness = Harness(args.zoo / "models" / "math", device="cpu")
    lines = [("| task (dev) | examples | padding, data order | padding, by length | CPU s, data order | "
              "CPU s, by length | speed-up | wall s, data / length | same scores |"), "|---" * 9 + "|"]
    for name in TASKS:
        task = dataclasses.replace(zoo_tasks(args.zoo)[name], split="dev")
        examples = task.load()
        lengths = token_lengths(harness, task, examples)
        cpu: dict[str, list[float]] = {"data": [], "length": []}
        wall: dict[str, list[float]] = {"data": [], "length": []}
        scores: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            for arm in ("data", "length"):
                start, start_cpu = time.perf_counter(), time.process_time()
                if arm == "data":
                    scores[arm] = score_in_data_order(harness, task, examples, args.batch_size)
                else:
                    scores[arm] = evaluate(harness.model, harness.tokenizer, task, examples=examples,
                                           batch_size=args.batch_size).scores
                cpu[arm].append(time.process_time() - start_cpu)
                wall[arm].append(time.perf_counter() - start)
        data_s, length_s = statistics.median(cpu["data"]), statistics.median(cpu["length"])
        wall_s = f"{statistics.median(wall['data']):.1f} / {statistics.median(wall['length']):.1f}"
        differences = [abs(a - b) for a, b in zip(scores["data"], scores["length"]) if a != b]
        same = (f"{len(differences)} differ, by up to {max(differences):.1e}" if differences else "all")
        lines.append(f"| {name} ({task.kind}) | {len(examples)} | {padded_share(lengths, args.batch_size):.1%} | "
                     f"{padded_share(sorted(lengths), args.batch_size):.1%} | {data_s:.1f} | {length_s:.1f} | "
                     f"{data_s / length_s:.2f}x | {wall_s} | {same} |")
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    notes = (f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread, load average "
             f"{os.getloadavg()[0]:.1f} at the end; "
             f"{platform.python_implementation()} {platform.python_version()}, torch {torch.__version__}. "
             f"Real zoo's `math` model (SmolLM2-135M fine-tune, float32), batch size {args.batch_size}, "
             f"median of {args.repeats} repeats per arm, arms alternating; *speed-up*: of CPU seconds. "
             "*padding*: padded share of the tokens in the batches (prompt tokens for generation, "
             "whole texts for perplexity). "
             "*same scores*: the examples both arms score alike; the others differ by the float "
             "rounding of a differently padded batch (a greedy answer could flip, a loss moves in "
             "its last digits).")
    command = "python3 " + " ".join(shlex.quote(a) for a in ["scripts/bench_batching.py", *(argv or sys.argv[1:])])
    if not args.no_docs:
        update_section("bench_batching:cpu", "Scoring: batches by length vs in data order (cpu)",
                       f"{table}\n\n{notes}\n\nProduced by:\n\n```\n{command}\n```")
    return 0


if __name__ == "__main__":
    sys.exit(main())
