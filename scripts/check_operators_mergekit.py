"""Single-tensor cross-check of della, della_linear and sce against mergekit's own operators.

Opt-in, like scripts/compare_mergekit.py: it needs mergekit in its own venv (see
docs/mergekit-compat.md) and runs it as a subprocess, so evomerge never imports it.
Each case (random or quantised tensors, 1-d and 2-d, several densities, epsilons,
weights and select_topk values) goes through mergekit's
``mergekit.merge_methods.api.merge_tensors`` after ``torch.manual_seed(seed)`` and
through evomerge's registered operator with ``torch.Generator().manual_seed(seed)``;
both draw DELLA's Bernoulli masks from the same CPU generator algorithm, so every
output must be ``torch.equal``. Exit status 0 when all are, 1 otherwise.

    python3 scripts/check_operators_mergekit.py [--python /opt/mergekit-venv/bin/python]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from merging.operators import METHODS, REQUIRED  # noqa: E402

MERGEKIT_SIDE = """
import sys, torch
from mergekit.merge_methods.api import merge_tensors
outputs = []
for case in torch.load(sys.argv[1]):
    torch.manual_seed(case["seed"])
    outputs.append(merge_tensors([case["base"], *case["models"]], case["method"],
                                 parameters=case["params"], base_index=0, dtype=torch.float32))
torch.save(outputs, sys.argv[2])
"""


def family(shape: tuple[int, ...], n: int, seed: int, quantise: bool = False):
    """A float32 base and n variants; quantised deltas give many equal magnitudes."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    deltas = [torch.randn(shape, generator=g) * 0.05 for _ in range(n)]
    if quantise:
        deltas = [(d * 40).round() / 40 for d in deltas]
    return base, [base + d for d in deltas]


def cases() -> list[dict]:
    out: list[dict] = []

    def add(method: str, shape, n: int, params: dict, quantise: bool = False) -> None:
        base, models = family(shape, n, seed=len(out), quantise=quantise)
        out.append(dict(method=method, base=base, models=models, params=params, seed=len(out)))

    for shape in [(64, 48), (300,), (33, 17), (128, 256)]:
        for method in ["della", "della_linear"]:
            for density, epsilon in [(0.5, 0.15), (0.3, 0.2), (0.8, 0.1)]:
                add(method, shape, 3, {"weight": [1.0, 0.6, -0.3], "density": [density, 0.6, 1.0],
                                       "epsilon": [epsilon, 0.1, 0.15], "lambda": 0.9})
            add(method, shape, 2, {"weight": [0.7, 0.5], "density": [0.4, 0.5], "rescale": False,
                                   "normalize": True})
            add(method, shape, 2, {"weight": [1.0, 0.5], "density": [0.5, 0.4]}, quantise=True)
        for select_topk in [1.0, 0.5, 0.13, 0.0]:
            for n in [1, 2, 3]:
                add("sce", shape, n, {"select_topk": select_topk})
        add("sce", shape, 3, {"select_topk": 0.3, "int8_mask": True}, quantise=True)
    return out


def evomerge_output(case: dict) -> torch.Tensor:
    """The registered operator, called as the engine calls it (defaults, per-model lists)."""
    method = METHODS[case["method"]]
    n = len(case["models"])
    params = {k: v for k, v in method.global_params.items() if v is not REQUIRED}
    params |= {k: [v] * n for k, v in method.model_params.items() if v is not REQUIRED}
    params |= case["params"]
    generator = torch.Generator().manual_seed(case["seed"]) if method.random else None
    return method.merge(base=case["base"], tensors=case["models"], generator=generator, **params)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default="/opt/mergekit-venv/bin/python",
                        help="the python of mergekit's venv")
    args = parser.parse_args(argv)
    all_cases = cases()
    with tempfile.TemporaryDirectory(prefix="evomerge-opcheck-") as tmp:
        given, answers = Path(tmp) / "cases.pt", Path(tmp) / "mergekit.pt"
        torch.save(all_cases, given)
        subprocess.run([args.python, "-c", MERGEKIT_SIDE, str(given), str(answers)], check=True)
        reference = torch.load(answers)
    equal = 0
    for case, ref in zip(all_cases, reference):
        ours = evomerge_output(case)
        if torch.equal(ours, ref):
            equal += 1
        else:
            print(f"DIFFERS: {case['method']} {tuple(case['base'].shape)} {case['params']}: "
                  f"max |diff| {(ours - ref).abs().max().item():.3e}")
    print(f"{equal}/{len(all_cases)} cases torch.equal to mergekit")
    return 0 if equal == len(all_cases) else 1


if __name__ == "__main__":
    sys.exit(main())
