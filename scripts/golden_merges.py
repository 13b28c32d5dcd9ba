#!/usr/bin/env python3
"""Fingerprint evomerge's merge outputs, to show an engine change leaves tensors unchanged.

Merges every recipe of scripts/mergekit_recipes/ (the mergekit comparison's set) on the
tiny synthetic models of a few families and source dtypes, and records the SHA-256 of each
output tensor's bytes (and its dtype and shape). `--write FILE` before a change and
`--check FILE` after it list every tensor whose bytes differ; exit 1 when any does.
Speed work on the engine (I/O, threads, chunking) must leave this list empty.

    python3 scripts/golden_merges.py --write /tmp/golden.json    # on the old code
    python3 scripts/golden_merges.py --check /tmp/golden.json    # on the new code
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from compare_mergekit import RECIPES, build_models, load_tensors, render  # noqa: E402

SETUPS = [("llama", "float32", False), ("llama", "bfloat16", True), ("qwen2", "bfloat16", False)]
"""(family, source dtype, tied embeddings): float32 and 16-bit sources, tied and untied heads."""


def fingerprints(work: Path, device: str, threads: int) -> dict[str, dict[str, str]]:
    """setup/recipe -> tensor name -> "dtype shape sha256" (or the error a recipe raised)."""
    from merging.engine import run_recipe
    from merging.errors import EvomergeError

    found: dict[str, dict[str, str]] = {}
    for family, dtype, tied in SETUPS:
        setup = f"{family}-{dtype}{'-tied' if tied else ''}"
        paths = build_models(work / setup, seed=0, family=family, dtype=dtype, tied=tied)
        for recipe in sorted(RECIPES.glob("*.yaml")):
            rendered = work / setup / recipe.name
            render(recipe, paths, rendered)
            out = work / setup / f"out-{recipe.stem}"
            key = f"{setup}/{recipe.stem}"
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    run_recipe(rendered, out, device=device, overwrite=True, threads=threads)
            except EvomergeError as exc:
                found[key] = {"error": str(exc).replace(str(work), "WORK")}
                continue
            found[key] = {name: f"{t.dtype} {list(t.shape)} "
                          f"{hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()}"
                          for name, t in sorted(load_tensors(out).items())}
            print(f"{key}: {len(found[key])} tensors", file=sys.stderr, flush=True)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", type=Path, help="record the fingerprints in this JSON file")
    action.add_argument("--check", type=Path, help="compare against the fingerprints in this JSON file")
    parser.add_argument("--device", default="cpu", help="where the merges run")
    parser.add_argument("--threads", type=int, default=2, help="tensors merged at once")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        found = fingerprints(Path(tmp), args.device, args.threads)
    if args.write:
        args.write.write_text(json.dumps(found, indent=1, sort_keys=True))
        print(f"wrote {len(found)} merges to {args.write}")
        return 0
    expected = json.loads(args.check.read_text())
    differing = [f"{key}: {name}" for key in sorted(set(expected) & set(found))
                 for name in sorted(set(expected[key]) | set(found[key]))
                 if expected[key].get(name) != found[key].get(name)]
    only = sorted(set(expected) ^ set(found))
    print(f"{len(set(expected) & set(found))} merges compared; {len(differing)} tensors differ"
          + (f"; {len(only)} in one file only (recipes added or removed since), e.g. {', '.join(only[:3])}"
             if only else ""))
    for line in differing[:50]:
        print("  " + line)
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
