"""SCE (arXiv 2408.07990): select, calculate, erase; a merge that needs no weights.

Where TIES and DARE need a hand-set weight and density per model, SCE derives both
from the task vectors ``delta_i = model_i - base`` themselves, as mergekit 0.1.5 does:

1. select: with ``select_topk < 1``, keep only the positions where the models disagree
   most, the top ``int(select_topk * count)`` entries by the variance of the deltas
   across models (population variance), ``count`` being the positions of nonzero
   variance; the same positions are kept in every delta (``select_topk <= 0`` keeps none);
2. calculate: each model's weight is the mean of its squared (selected) delta,
   normalised to sum 1 (equal weights when that sum is below 1e-6);
3. erase: the TIES sign election on the unweighted selected deltas; per entry only the
   deltas of the elected sign contribute, and the weighted sum is divided by the sum
   of their weights (at least 1e-6).

``int8_mask`` only chose mergekit's mask storage type and has no numerical effect.
"""
from __future__ import annotations

from typing import Sequence

import torch

from merging.operators.base import FRACTION, MergeMethod, compute_dtype
from merging.operators.task_arithmetic import sign_consensus


def high_variance_mask(deltas: torch.Tensor, select_topk: float) -> torch.Tensor:
    """Positions (shape of one delta) whose variance across models is among the top
    ``select_topk`` fraction of the nonzero variances."""
    variance = torch.var(deltas, dim=0, unbiased=False)
    if select_topk <= 0:
        return torch.zeros_like(variance, dtype=torch.bool)
    # A float32 tensor product, truncated, as mergekit counts k.
    k = int(torch.count_nonzero(variance) * select_topk)
    if k == 0:
        return torch.zeros_like(variance, dtype=torch.bool)
    # mergekit's call, so equal variances at the threshold are chosen alike.
    chosen = torch.topk(variance.reshape(-1), k=k, largest=True).indices
    mask = torch.zeros(variance.numel(), dtype=torch.bool, device=variance.device)
    mask[chosen] = True
    return mask.reshape(variance.shape)


def model_weights(deltas: torch.Tensor) -> torch.Tensor:
    """Each model's mean squared delta, normalised to sum 1 (uniform if all ~0)."""
    energy = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)
    total = torch.sum(energy).item()
    if abs(total) < 1e-6:
        return torch.ones_like(energy) / energy.shape[0]
    return energy / total


def sce(*, base: torch.Tensor, tensors: Sequence[torch.Tensor], select_topk: float = 1.0,
        int8_mask: bool = False) -> torch.Tensor:
    """Merge ``tensors`` into ``base`` by SCE."""
    dtype = compute_dtype(base, *tensors)
    base = base.to(dtype)
    if not tensors:
        return base
    deltas = torch.stack([x.to(dtype) - base for x in tensors])
    if select_topk < 1:
        deltas = deltas * high_variance_mask(deltas, select_topk).to(dtype)
    agree = sign_consensus(deltas)
    weights = model_weights(deltas).reshape(-1, *([1] * base.dim()))
    kept_weights = weights * agree
    mixed = (deltas * kept_weights).sum(dim=0)
    return base + mixed / kept_weights.sum(dim=0).clamp(min=1e-6)


SCE = MergeMethod(
    name="sce",
    function=sce,
    needs_base=True,
    global_params={"int8_mask": False, "select_topk": 1.0},
    domains={"select_topk": FRACTION},
)
