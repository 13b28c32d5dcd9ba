#!/usr/bin/env python3
"""Time the fitness harness: recipe -> scored candidate, split into its parts.

A search spends its life here, so this measures what one candidate costs: resolving the
recipe into a per-tensor plan, merging it into the model resident on the device (no
disk round trip), and evaluating it on the zoo's tasks (batched greedy generation),
with the tokens generated per second. The target is that building the candidate (plan
+ merge) costs under 5% of evaluating it.

It uses the small zoo (built first if missing; build times: docs/zoo.md) and scores a few
distinct candidates (dare_ties, ties and task_arithmetic merges of math and lang over
the base); the first candidate also pays for warm-up, so the table shows each one.
Results go to docs/benchmarks.md, one section per device kind.

    python3 scripts/bench_harness.py [--zoo DIR] [--device auto] [--limit N] [--no-docs]
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchdocs import update_section  # noqa: E402
from evaluation.harness import Harness  # noqa: E402
from evaluation.zoo import ZOO_HOME as DEFAULT_ZOO, build_zoo, zoo_tasks  # noqa: E402
from merging.engine import open_models  # noqa: E402
from merging.recipe import parse_recipe  # noqa: E402

TASKS = ["math_lang", "math", "lang"]
CANDIDATES = {
    "dare_ties w 0.6/0.6 d 0.7": """
merge_method: dare_ties
base_model: {base}
models:
  - {{model: {math}, parameters: {{weight: 0.6, density: 0.7}}}}
  - {{model: {lang}, parameters: {{weight: 0.6, density: 0.7}}}}
""",
    "ties w 1/1 d 0.5": """
merge_method: ties
base_model: {base}
models:
  - {{model: {math}, parameters: {{weight: 1.0, density: 0.5}}}}
  - {{model: {lang}, parameters: {{weight: 1.0, density: 0.5}}}}
parameters: {{normalize: false}}
""",
    "task_arithmetic 1/1": """
merge_method: task_arithmetic
base_model: {base}
models:
  - {{model: {math}, parameters: {{weight: 1.0}}}}
  - {{model: {lang}, parameters: {{weight: 1.0}}}}
""",
}


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, default=DEFAULT_ZOO / "small",
                        help=f"a built zoo (default: {DEFAULT_ZOO}/small, built if missing)")
    parser.add_argument("--size", default="small", help="zoo size to build when --zoo is missing")
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--limit", type=int, default=None, help="examples per task (default: the whole test split)")
    parser.add_argument("--no-docs", action="store_true", help="print the table only")
    args = parser.parse_args(argv)

    if not (args.zoo / "zoo.json").is_file():
        print(f"building the {args.size} zoo in {args.zoo} ...", file=sys.stderr)
        build_zoo(args.zoo, size=args.size)
    tasks = [zoo_tasks(args.zoo)[name] for name in TASKS]
    models = {name: args.zoo / "models" / name for name in ("base", "math", "lang")}
    harness = Harness(models["base"], device=args.device, batch_size=args.batch_size)
    params = sum(p.numel() for p in harness.model.parameters())

    header = ("| candidate | plan ms | merge ms | evaluate s | build / evaluate | tokens generated | tokens/s | "
              + " | ".join(TASKS) + " |")
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    shares = []
    for label, template in CANDIDATES.items():
        recipe = parse_recipe(template.format(**models))
        results = harness.score_recipe(recipe, open_models(recipe), tasks, limit=args.limit)
        t = harness.last_timings
        evaluate_s = sum(t.evaluate.values())
        tokens = sum(t.new_tokens.values())
        share = (t.plan + t.merge) / evaluate_s
        shares.append(share)
        scores = " | ".join(f"{results[n].mean:.3f}" for n in TASKS)
        lines.append(f"| {label} | {t.plan * 1e3:.1f} | {t.merge * 1e3:.1f} | {evaluate_s:.2f} | "
                     f"{share:.2%} | {tokens} | {tokens / evaluate_s:.0f} | {scores} |")
    table = "\n".join(lines)
    print(table)
    device = harness.device
    n = {name: len(task.load(args.limit)) for name, task in zip(TASKS, tasks)}
    notes = (f"Device: {describe_device(device)}; {platform.python_implementation()} "
             f"{platform.python_version()}, torch {torch.__version__}, "
             f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM. Zoo `{args.zoo.name}` "
             f"(Llama, {params / 1e6:.2f}M parameters, character tokenizer), test split "
             f"({', '.join(f'{k} {v}' for k, v in n.items())} examples), batch size {args.batch_size}, "
             "greedy generation stopping at a newline. *plan*: the recipe resolved into per-tensor "
             "work (headers only); *merge*: merged tensors computed and copied into the resident model "
             "(on CUDA the clock is read after torch.cuda.synchronize, so queued copies are counted); "
             "*evaluate*: all three tasks; *tokens/s*: generated tokens (padding excluded) over the "
             f"evaluation time. Largest build / evaluate share: {max(shares):.2%} (target < 5%).")
    command = "python3 " + " ".join(shlex.quote(a) for a in ["scripts/bench_harness.py", *(argv or sys.argv[1:])])
    if not args.no_docs:
        update_section(f"bench_harness:{device.type}", f"Harness: candidate build vs evaluation ({device.type})",
                       f"{table}\n\n{notes}\n\nProduced by:\n\n```\n{command}\n```")
    return 0


if __name__ == "__main__":
    sys.exit(main())
