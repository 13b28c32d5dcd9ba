"""Where the DFS merge's gain over math comes from (docs/results.md, "DFS alone finds a gain").

Three checks of the exported DFS merge (RUNS/dfs/best) against the math model, on the
problems no search saw (math_de test, and the held-out first 600 of math_de train):

1. paired: each model's greedy answers, generated as the runs score them (batch size 50,
   cut at the task's stop strings, scored by its own answer extraction; the solved problems are the ones
   the run's score cache holds), the problems each solves that the other does not, and an
   exact McNemar test on them;
2. by answer: the solved problems split by whether the right answer is 0, and the answers
   each model gives most;
3. calibration: the mean token loss on 200 German test texts at temperatures 1-3, and the
   predictive entropy: a merge that is only over- or under-confident recovers at some
   temperature.

    python3 experiments/evollm-real/analyse_dfs.py [--runs experiments/evollm-real] > experiments/evollm-real/analyse_dfs.txt

Needs the real zoo (docs/zoo.md) and the run's best/ checkpoint, which is not committed:
`python3 scripts/reproduce_evollm_real.py --runs experiments/evollm-real --only dfs` replays
the logged run (no candidate is scored again) and exports it. About 9 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import collections
import sys
from math import comb
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from evaluation.scoring import generate, wants_bos
from evaluation.tasks import resolve_task
from evaluation.zoo import find_zoo
from merging.checkpoint import resolve_model_path
from merging.errors import EvomergeError

SPLITS = {"test": None, "train": 600}  # the report's test split; the held-out check's problems


def mcnemar(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: the discordant pairs as a fair coin's flips."""
    n, k = only_a + only_b, min(only_a, only_b)
    return min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2 ** n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    torch.set_num_threads(2)
    merge = args.runs / "dfs" / "best"
    try:
        zoo = find_zoo("real")
        if not (merge / "config.json").is_file():
            raise EvomergeError(f"no exported DFS merge at {merge}: run `python3 scripts/reproduce_evollm_real.py "
                                f"--runs {args.runs} --only dfs` first (it replays the logged run and exports it)")
    except EvomergeError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    models = {"math": resolve_model_path("zoo:math", zoo_dir=zoo), "dfs": merge}
    loaded = {name: (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(),
                     AutoTokenizer.from_pretrained(path)) for name, path in models.items()}

    totals = collections.Counter()
    for split, limit in SPLITS.items():
        task = resolve_task("math_de", zoo_dir=zoo, split=split)
        examples = task.load(limit)
        answers = [str(example["answer"]) for example in examples]
        said, right = {}, {}
        for name, (model, tokenizer) in loaded.items():
            texts = generate(model, tokenizer, [task.prompt(e) for e in examples], max_new_tokens=task.max_new_tokens,
                             stop=task.stop, batch_size=50, bos=wants_bos(task, tokenizer))
            said[name] = [text.strip() for text in texts]  # generate() already cut them at the stop strings
            right[name] = [task.score_generation(e, text) == 1.0 for e, text in zip(examples, texts)]
        both = sum(d and m for d, m in zip(right["dfs"], right["math"]))
        only_dfs = sum(d and not m for d, m in zip(right["dfs"], right["math"]))
        only_math = sum(m and not d for d, m in zip(right["dfs"], right["math"]))
        totals.update(only_dfs=only_dfs, only_math=only_math)
        print(f"== math_de {split}{f'[:{limit}]' if limit else ''} ({len(examples)} problems)")
        print(f"solved: dfs {sum(right['dfs'])}, math {sum(right['math'])}; both {both}, only dfs {only_dfs}, "
              f"only math {only_math}; exact McNemar p = {mcnemar(only_dfs, only_math):.3f}")
        for label, keep in (("answer 0", [a == "0" for a in answers]), ("other answers", [a != "0" for a in answers])):
            counts = ", ".join(f"{name} {sum(r for r, k in zip(right[name], keep) if k)}" for name in right)
            print(f"  {label} ({sum(keep)} problems): {counts}")
        for name, answered in said.items():
            common = ", ".join(f'"{s}" {n}' for s, n in collections.Counter(answered).most_common(6))
            print(f"  {name} answers most: {common}")
    print(f"== pooled: only dfs {totals['only_dfs']}, only math {totals['only_math']}; "
          f"exact McNemar p = {mcnemar(totals['only_dfs'], totals['only_math']):.4f}")

    texts = [example["text"] for example in resolve_task("german", zoo_dir=zoo, split="test").load(200)]
    print("== german test (200 texts): mean token loss (nats) and predictive entropy at temperature T")
    with torch.no_grad():
        for name, (model, tokenizer) in loaded.items():
            cells = []
            for temperature in (1.0, 1.5, 2.0, 3.0):
                loss = entropy = 0.0
                for text in texts:
                    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
                    logprobs = (model(ids).logits[0, :-1].float() / temperature).log_softmax(-1)
                    loss += torch.nn.functional.nll_loss(logprobs, ids[0, 1:]).item()
                    entropy += (-(logprobs.exp() * logprobs).sum(-1)).mean().item()
                cells.append(f"T={temperature}: {loss / len(texts):.3f} / {entropy / len(texts):.3f}")
            print(f"  {name}: " + "; ".join(cells))


if __name__ == "__main__":
    main()
