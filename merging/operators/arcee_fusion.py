"""Arcee Fusion: keep only the other model's most important changes to the base.

Each entry's importance is how far the other model moved it, |other - base|, times how
much the row it sits in changed as a distribution: the KL divergence between the
softmax of the other model's row and the base's row (rows = the last dimension; a 1-d
tensor is one row). An entry takes the other model's value when its importance is an
outlier, at least ``median + 1.5 * IQR`` of all importances of the tensor (Tukey's
fence), and keeps the base's otherwise. There are no parameters.

mergekit 0.1.5's conventions, kept so that results agree bit for bit:

* softmax probabilities get ``EPS`` added before the KL divergence;
* the quartiles are order statistics, not interpolated: the sorted importances at index
  floor(q * (n - 1)) for q = 1/4, 1/2, 3/4;
* a tensor of more than ``QUANTILE_SAMPLE`` entries takes its quartiles from that many
  entries drawn uniformly with replacement. That draw is random, so the method is seeded
  (mergekit draws from its global torch seed, evomerge from the per-tensor generator,
  so on such tensors the two tools agree in distribution, not entry for entry; smaller
  tensors are deterministic);
* the change is applied as ``base + (other - base) * mask``.
"""
from __future__ import annotations

from typing import Sequence

import torch

from merging.operators.base import MergeMethod, compute_dtype

EPS = 1e-8
QUANTILE_SAMPLE = 1_000_000
FENCE = 1.5


def importance(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|other - base| times the KL divergence KL(softmax(other row) || softmax(base row))."""
    p = torch.softmax(other, dim=-1) + EPS
    q = torch.softmax(base, dim=-1) + EPS
    row_divergence = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    return (other - base).abs() * row_divergence


def outlier_threshold(scores: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``median + FENCE * (Q3 - Q1)`` of ``scores``, from a sample when there are many."""
    flat = scores.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:
        picks = torch.randint(flat.numel(), (QUANTILE_SAMPLE,), generator=generator, device=flat.device)
        flat = flat[picks]
    ordered = torch.sort(flat).values
    last = ordered.numel() - 1
    q1, median, q3 = (ordered[last * quarters // 4] for quarters in (1, 2, 3))
    return median + FENCE * (q3 - q1)


def arcee_fusion(*, base: torch.Tensor, tensors: Sequence[torch.Tensor],
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """The base, with the one other model's values where their importance is an outlier."""
    if len(tensors) != 1:
        raise ValueError(f"arcee_fusion takes a base and exactly one other model, got {len(tensors)} others")
    dtype = compute_dtype(base, *tensors)
    a, b = base.to(dtype), tensors[0].to(dtype)
    scores = importance(b, a)
    mask = (scores >= outlier_threshold(scores, generator)).to(dtype)
    return a + (b - a) * mask


ARCEE_FUSION = MergeMethod(
    name="arcee_fusion",
    function=arcee_fusion,
    needs_base=True,
    random=True,
    min_models=1,
    max_models=1,
)
