"""The `evomerge` command. Each subcommand only parses arguments and calls the library."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from merging.errors import EvomergeError


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
        epilog="example: evomerge merge recipes/demo-ties.yaml demo/merged --overwrite",
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


def _resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EvomergeError(f"--device {name}: no CUDA device is available (torch {torch.__version__})")
    return name


def _run_merge(args: argparse.Namespace) -> None:
    from merging.checkpoint import check_output_dir, parse_size
    from merging.engine import describe_plan, merge_to_disk, open_models, plan_merge
    from merging.recipe import load_recipe

    device = _resolve_device(args.device)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evomerge",
        description="Evolutionary model merging: merge checkpoints with mergekit-compatible recipes.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_merge(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except EvomergeError as exc:
        print(f"evomerge: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("evomerge: interrupted; no output was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
