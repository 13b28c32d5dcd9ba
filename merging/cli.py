"""The parser and runner of `evomerge merge` (the dispatcher is evomerge/cli.py).

Building the parser imports no torch, so that `evomerge --help` and the other commands'
help answer at once. `evomerge merge --help` lists the merge methods from the operator
registry (which imports torch), read only when that help is asked for.
"""
from __future__ import annotations

import argparse
from pathlib import Path

ZOO_HELP = ("the zoo whose models a recipe names as zoo:NAME: micro, small or real (the zoos "
            "`evomerge zoo build --size SIZE` builds) or a zoo folder")
EXIT_STATUS = ("exit status: 0 done, 2 bad input (nothing written), 130 interrupted (nothing written), "
               "141 stdout closed early (e.g. piped into head)")


def _methods_epilog() -> str:
    """The merge methods and the parameters each takes, from the registry (never stale)."""
    from merging.operators import METHODS, REQUIRED

    def listing(params: dict) -> str:
        return ", ".join(f"{name}={'required' if value is REQUIRED else value}" for name, value in params.items()) or "-"

    rows = [f"  {name:<17} per model: {listing(m.model_params)}; global: {listing(m.global_params)}"
            f"{'; needs base_model' if m.needs_base else '; base_model optional' if m.optional_base else ''}" for name, m in METHODS.items()]
    return "merge methods (parameter=default):\n" + "\n".join(rows)


class _HelpWithMethods(argparse.Action):
    """-h/--help that lists the merge methods: the registry imports torch, which plain
    parsing must not pay for."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.epilog = (f"{_methods_epilog()}\n\n{EXIT_STATUS}\n"
                         "example: evomerge merge recipes/demo-ties.yaml demo/merged --overwrite")
        parser.print_help()
        parser.exit()


def add_merge_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "merge",
        add_help=False,
        help="merge models as a YAML recipe says and write a Hugging Face checkpoint",
        description=(
            "Merge Hugging Face checkpoints as RECIPE (mergekit's YAML: merge_method, base_model, "
            "models, slices or modules (each module of a VLM merged on its own), parameters, dtype) says, and write OUT_DIR: sharded safetensors with an "
            "index, config.json, generation_config.json, the tokenizer files of the tokenizer source (and "
            "chat_template.jinja when the recipe sets `chat_template`: auto, alpaca, chatml, exaone, llama3, "
            "mistral or a Jinja template), "
            "recipe.yaml and a README.md model card with the recipe. Tensors stream one at a time, so memory "
            "stays at a few tensors. Models are local folders (relative paths: current directory first, then "
            "the recipe's folder), zoo:NAME (with --zoo) or Hub ids (org/name[@revision]) when a network "
            "exists. The output is written to a temporary folder and moved into place only when complete."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-h", "--help", action=_HelpWithMethods, help="show this help message and exit")
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
                        help="seed of the random methods (dare_*, della*); the same seed gives the same tensors")
    parser.add_argument("--out-shard-size", default="5GB",
                        help="largest safetensors shard, in bytes or with a unit (default 5GB)")
    parser.add_argument("--zoo", default=None, help=ZOO_HELP)
    parser.add_argument("--threads", type=int, default=None,
                        help="tensors merged at once on the CPU (default: 2 on a machine with 2 or more "
                             "cores, else 1); more uses more cores and memory, the tensors are the same")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(run=run_merge)


def load_recipe_with_notes(path: Path):
    """The recipe; what mergekit accepts but a user may not mean (a key given twice, a
    key mergekit ignores) is printed as `evomerge: note: ...` on stderr."""
    import sys
    import warnings

    from merging.errors import RecipeNote
    from merging.recipe import load_recipe

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RecipeNote)
        recipe = load_recipe(path)
    for warning in caught:
        if issubclass(warning.category, RecipeNote):
            print(f"evomerge: note: {warning.message}", file=sys.stderr)
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    return recipe


def merge_threads(requested: int | None, device) -> int:
    """How many tensors merge at once: as asked, else 2 on a CPU with 2 or more cores (the
    trim's selection and sort use one core each) and 1 on a GPU (its kernels fill it).
    `device` None: a dry run, which plans for the CPU."""
    import os

    from merging.errors import EvomergeError

    if requested is not None:
        if requested < 1:
            raise EvomergeError(f"--threads must be 1 or more, got {requested}")
        return requested
    return 1 if device is not None and device.type == "cuda" else min(2, os.cpu_count() or 1)


def run_merge(args: argparse.Namespace) -> None:
    """`args.zoo` is a zoo folder (the dispatcher resolved a size name) or None."""
    from merging.checkpoint import check_output_dir, parse_size
    from merging.engine import describe_plan, merge_to_disk, open_models, plan_merge, resolve_device

    device = None if args.dry_run else resolve_device(args.device)  # a dry run computes nothing
    shard_bytes = parse_size(args.out_shard_size)
    recipe = load_recipe_with_notes(args.recipe)
    if not args.dry_run:
        check_output_dir(args.out_dir, args.overwrite)
    plan = plan_merge(recipe, open_models(recipe, allow_pickle=args.allow_pickle,
                                          recipe_dir=args.recipe.parent, zoo_dir=args.zoo))
    try:
        if args.dry_run:
            print(describe_plan(plan, merge_threads(args.threads, None)))
            return
        merge_to_disk(plan, args.out_dir, device=device, seed=args.seed, overwrite=args.overwrite,
                      max_shard_bytes=shard_bytes, progress=not args.no_progress,
                      threads=merge_threads(args.threads, device))
    finally:
        plan.close()
    print(f"wrote {args.out_dir} ({len(plan.tasks)} tensors, {plan.num_layers} layers)")
