"""The parser and runner of `evomerge evolve` (the dispatcher is evomerge/cli.py).
Building the parser imports no torch."""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path


def add_evolve_parser(subparsers) -> None:
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
            "gives recipe, lineage and scores). Rerun the same command after a kill or Ctrl-C to resume: no scored "
            "candidate is lost. See docs/evolve.md."
        ),
        epilog="example: evomerge evolve recipes/demo-evolve.yaml --run-dir runs/demo",
    )
    parser.add_argument("config", type=Path, help="run config YAML (see recipes/zoo-small-ps.yaml)")
    parser.add_argument("--run-dir", type=Path, required=True, help="run folder (created, or resumed)")
    parser.add_argument("--max-evals", type=int, default=None,
                        help="evaluation budget of each search stage (overrides the config's max_evals)")
    parser.add_argument("--executor", choices=["serial", "pool", "ray"], default=None,
                        help="what scores the candidates: serial (in this process, the default), pool (worker "
                             "processes on this machine) or ray (Ray actors: pip install 'evomerge[ray]'); "
                             "overrides the config's executor")
    parser.add_argument("--workers", type=int, default=None,
                        help="workers of a pool or on Ray, each with a resident model (default: one per GPU, "
                             "else 2; overrides the config's)")
    parser.add_argument("--ray-address", default=None,
                        help="the Ray cluster to join: auto, or HOST:PORT of its head (default: a local cluster "
                             "started for the run; overrides the config's ray_address)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--dry-run", action="store_true",
                        help="check everything that can be checked before the first candidate (config, template, "
                             "models, executor, each task's examples, the run folder) and print the plan: stages, "
                             "genes, budgets; nothing is merged or scored and the run folder is not touched")
    parser.set_defaults(run=run_evolve, interrupted=interrupted_evolve)


def run_evolve(args: argparse.Namespace) -> None:
    from niches.report import report_table
    from niches.run import evolve, plan

    if args.dry_run:
        print(plan(args.config, args.run_dir, max_evals=args.max_evals, executor=args.executor,
                   workers=args.workers, ray_address=args.ray_address))
        return
    results = evolve(args.config, args.run_dir, max_evals=args.max_evals, progress=not args.no_progress,
                     executor=args.executor, workers=args.workers, ray_address=args.ray_address)
    print(f"\nreport ({results['report']['split']} split): mean ± standard error")
    print(report_table(results))
    print(f"wrote {args.run_dir / 'best'}")


def interrupted_evolve(args: argparse.Namespace) -> str:
    """What an interrupted run kept, and the command that resumes it (the same one)."""
    log = args.run_dir / "candidates.jsonl"
    logged = sum(1 for line in log.read_text().splitlines() if line.strip()) if log.is_file() else 0
    if not logged:
        return "no candidate was scored yet; nothing to resume"
    command = ["evomerge", "evolve", str(args.config), "--run-dir", str(args.run_dir)]
    if args.max_evals is not None:
        command += ["--max-evals", str(args.max_evals)]
    if args.executor is not None:
        command += ["--executor", args.executor]
    if args.workers is not None:
        command += ["--workers", str(args.workers)]
    if args.ray_address is not None:
        command += ["--ray-address", args.ray_address]
    if args.no_progress:
        command.append("--no-progress")
    return (f"{logged} scored candidate(s) are kept in {log}; resume with the same command:\n"
            f"  {shlex.join(command)}")
