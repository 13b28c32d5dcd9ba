"""The miniature of Table 1 of "Evolutionary Optimization of Model Merging Recipes" on the
small zoo: PS, DFS and PS+DFS merges of `lang` and `math`, against both sources and the
base, on `math_lang` (test split), with standard errors; the paper's MGSM-JA numbers beside;
and M2N2 on the same models, fitness data and budget as PS.

    evomerge zoo build --size small
    python3 scripts/reproduce_evollm_small.py --runs runs        # resumable
    python3 scripts/reproduce_evollm_small.py --runs runs --write-docs

Runs `evomerge evolve` on recipes/zoo-small-{ps,dfs,ps-dfs,m2n2,random,della,sce}.yaml (each resumes if its
run folder exists) and prints the table. With --write-docs it also replaces the section of
docs/results.md (the wall times measured there are the reference for how long this takes).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from benchdocs import update_section  # noqa: E402
from evaluation.cache import read_jsonl  # noqa: E402
from niches.run import evolve  # noqa: E402

METHODS = {"ps": "PS (dare_ties, per-layer density and weight)", "dfs": "DFS (layer path + scales)",
           "ps-dfs": "PS+DFS", "m2n2": "M2N2 (archive of 20, SLERP with split points)",
           "random": "random search (PS template and budget)",
           "della": "PS with della (per-layer density and weight)",
           "sce": "PS with sce (per-layer select_topk)"}
PAPER = [("Shisa Gamma 7B v1 (Japanese)", "9.6"), ("WizardMath 7B v1.1", "18.4"), ("Abel 7B 002", "30.0"),
         ("EvoLLM-JP-v1-7B (PS)", "52.0"), ("EvoLLM-JP-v1-10B (PS+DFS)", "55.6")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs", help="folder of the run folders")
    parser.add_argument("--write-docs", action="store_true",
                        help="also write the table into docs/results.md (for the project's own results)")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "results.md")
    args = parser.parse_args()
    results = {name: evolve(ROOT / "recipes" / f"zoo-small-{name}.yaml", args.runs / f"zoo-small-{name}",
                            progress=True) for name in METHODS}
    # measured while the runs worked (results.json), not by a later invocation that only replays them
    loads = [load for result in results.values() for load in (result.get("load_average") or [])]
    machine = (f"{os.cpu_count()} cores, one torch thread, no GPU; load average "
               + (f"{min(loads):.1f} to {max(loads):.1f} at the runs' starts and ends" if loads else "not recorded"))
    peak = max(result.get("peak_rss_gib", 0.0) for result in results.values())
    twins = {name: sum(row.get("twin") is not None for row in read_jsonl(args.runs / f"zoo-small-{name}" / "candidates.jsonl"))
             for name in METHODS}
    body = table(results, {name: result["wall_seconds"] for name, result in results.items()}, peak, machine, twins)
    print(body)
    if args.write_docs:
        update_section("evollm_small", "Evolutionary merging on the small zoo (miniature of Akiba et al., Table 1)",
                       body, docs=args.docs)
        print(f"wrote {args.docs}")


def table(results: dict, seconds: dict, peak_gib: float, machine: str, twins: dict[str, int]) -> str:
    tasks = ["math_lang", "math", "lang"]
    first = results["ps"]["report"]["scores"]
    sources = [m for m in first if m != "evolved"]

    def cells(scores: dict) -> str:
        return " | ".join(f"{scores[t]['mean']:.3f} ± {scores[t]['stderr']:.3f}" for t in tasks)

    rows = [f"| {Path(m).name} | {cells(first[m])} | | | |" for m in sources]
    for name, label in METHODS.items():
        result = results[name]
        stages = result["stages"]
        evals = " + ".join(str(s["evaluations"]) for s in stages.values())
        if name == "m2n2":
            evals += " (+ 2 sources)"
        fitness = " → ".join(f"{s['best_fitness']:.3f}" for s in stages.values())
        rows.append(f"| **{label}** | {cells(result['report']['scores']['evolved'])} | {evals} | {twins[name]} | {fitness} |")
    n = first[sources[0]]["math_lang"]["n"]
    paper = "\n".join(f"| {model} | {score} |" for model, score in PAPER)
    return f"""Test split (n = {n} per task; mean ± standard error of the per-example accuracy). Fitness:
math_lang, train split, first 200 examples; budget per stage as listed, seed 0. The
random-search row draws the PS template's genomes uniformly at the PS budget: what CMA-ES
gains over chance. Functional twins: candidates whose scores were reused from a
functionally identical candidate (evaluations saved, docs/benchmarks.md). The sources'
rows are the same models scored by the same harness.

| model | math_lang | math | lang | evaluations | functional twins | best fitness (train) |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Wall time ({machine}), {datetime.date.today().isoformat()}: PS {seconds['ps']:.0f} s, DFS {
    seconds['dfs']:.0f} s, PS+DFS {seconds['ps-dfs']:.0f} s, M2N2 {seconds['m2n2']:.0f} s, random search {
    seconds['random']:.0f} s, each including the
report; peak RSS {peak_gib:.2f} GiB. Each run folder (candidates, plots, best/ checkpoint) is
`RUNS/zoo-small-METHOD`.

The paper's numbers (MGSM-JA accuracy, %, from the reference repository's README), for the
setting this miniature stands in for (Japanese = lang, math models = math, MGSM-JA = math_lang):

| model | MGSM-JA |
|---|---|
{paper}

Produced by:

```
evomerge zoo build --size small
python3 scripts/reproduce_evollm_small.py --runs runs --write-docs
```"""


if __name__ == "__main__":
    main()
