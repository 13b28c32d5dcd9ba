"""Why CMA-ES stalled on the digits MLP: one seed of pycma under three covariance models
and a choice of step-size adaptation.

    python3 scripts/probe_cma_digits.py separable --generations 2500                     # pycma's choice: TPA here
    python3 scripts/probe_cma_digits.py separable --generations 2500 --sigma-adaptation csa
    python3 scripts/probe_cma_digits.py isotropic --generations 300 --log-every 25
    python3 scripts/probe_cma_digits.py full --generations 200 --log-every 25   # hours: 8 s and 8.8 GB a generation

The reproduction (scripts/reproduce_m2n2_digits.py) runs separable CMA-ES, where the
reference ran pycma's full covariance on 19,210 weights. This probe runs pycma directly
as the reference does (x0 ~ N(0, 0.01^2), sigma0 0.01, population 20, fitness = training
accuracy) with `separable` (CMA_diagonal), `isotropic` (no covariance learning at all:
CMA_on = 0) or `full` (pycma's default), and prints the best training and test accuracy
and the step size sigma along the way, so the three can be compared generation by
generation. At this dimension pycma's full-covariance learning rates are c1 = 5.4e-9 and
cmu = 2.4e-8 per generation: over the whole budget the covariance moves by about 1e-4,
so full CMA-ES behaves as the isotropic variant does, and its cost is the O(n^2) work.
`--sigma-adaptation` picks the step-size rule: `pycma` (its default `AdaptSigma=True`,
which is TPA from 300 dimensions on), `csa` or `tpa`; niches/cmaes.py always uses CSA.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import resource
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reproduce_m2n2_digits import INIT_STD, POPULATION, Problem  # noqa: E402
from evaluation.zoo.mlp import random_params  # noqa: E402

OPTIONS = {"separable": {"CMA_diagonal": True}, "isotropic": {"CMA_diagonal": True, "CMA_on": 0}, "full": {}}
SIGMA_ADAPTATION = {"pycma": lambda cma: True, "csa": lambda cma: cma.sigma_adaptation.CMAAdaptSigmaCSA,
                    "tpa": lambda cma: cma.sigma_adaptation.CMAAdaptSigmaTPA}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant", choices=sorted(OPTIONS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--generations", type=int, default=2500, help="2,500 x 20 = the study's 50,000 passes")
    parser.add_argument("--log-every", type=int, default=250)
    parser.add_argument("--sigma-adaptation", choices=sorted(SIGMA_ADAPTATION), default="pycma")
    args = parser.parse_args(argv)
    import cma

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    problem = Problem("digits")
    x0 = random_params(problem.shape, torch.Generator().manual_seed(args.seed), INIT_STD).astype(float)
    started = time.perf_counter()
    es = cma.CMAEvolutionStrategy(x0, INIT_STD, {"popsize": POPULATION, "seed": args.seed + 1, "verbose": -9,
                                                 "AdaptSigma": SIGMA_ADAPTATION[args.sigma_adaptation](cma),
                                                 **OPTIONS[args.variant]})
    print(f"pycma {cma.__version__}, {args.variant}: sigma adaptation {type(es.adapt_sigma).__name__}, "
          f"set-up {time.perf_counter() - started:.0f} s", flush=True)
    best_fitness, best = -1.0, x0
    for generation in range(args.generations):
        genomes = es.ask()
        fitness = problem.train.accuracy(np.stack(genomes).astype(np.float32)).astype(float)
        if fitness.max() > best_fitness:
            best_fitness, best = float(fitness.max()), genomes[int(fitness.argmax())]
        es.tell(genomes, list(-fitness))  # pycma minimises
        if generation % args.log_every == 0 or generation == args.generations - 1:
            test = problem.test.accuracy(np.asarray(best, dtype=np.float32))[0]
            print(f"generation {generation}: best train {best_fitness:.4f}, its test {test:.4f}, sigma {es.sigma:.2e}, "
                  f"{time.perf_counter() - started:.0f} s, peak RSS "
                  f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GB", flush=True)


if __name__ == "__main__":
    main()
