"""DELLA's MAGPRUNE: random dropping of task-vector entries, less likely for large ones.

DARE drops every entry of a delta with the same probability; DELLA (arXiv 2406.11617)
keeps large-magnitude entries more often, on the reasoning that they carry more of the
fine-tune. As in mergekit 0.1.5 (``della_magprune``):

* entries are ranked by magnitude within each row (along dim 1; a 1-d tensor is one
  row), smallest first, and the keep probability rises linearly with the rank from
  ``density - epsilon`` (smallest) to ``density + epsilon`` (largest), so a row keeps
  ``density`` of its entries on average;
* each entry is kept by an independent Bernoulli draw with its probability;
* with ``rescale`` the kept entries are scaled to the delta's L1 norm, the same rule as
  DARE (mergekit's ``rescale_norm=l1``), not the paper's per-entry ``1 / p``;
* ``density >= 1`` returns the delta untouched and ``density <= 0`` zeros; otherwise
  ``density - epsilon`` and ``density + epsilon`` must lie strictly inside (0, 1).

Equal magnitudes are ranked by the same (unstable) ``torch.argsort`` call as mergekit's,
so on the same device and torch version the tied entries get the same probabilities
(checked bit for bit on CPU, quantised deltas included). One choice where mergekit
fails: a row of one entry gets probability ``density`` (mergekit divides 0 by 0).
"""
from __future__ import annotations

import torch

from merging.operators.sparsify import Trim, l1_scale


def epsilon_problem(density: float, epsilon: float) -> str | None:
    """Why (density, epsilon) cannot be used, or None; mergekit refuses the same pairs."""
    if density >= 1 or density <= 0:
        return None  # untouched or all dropped: epsilon plays no part
    if density + epsilon >= 1 or density - epsilon <= 0:
        return (f"della needs density - epsilon > 0 and density + epsilon < 1, got density "
                f"{density:g} and epsilon {epsilon:g}; lower epsilon (default 0.15)")
    return None


def check_model_params(params: dict) -> str | None:
    """One model's resolved DELLA parameters, checked while planning (before any merging)."""
    return epsilon_problem(params["density"], params["epsilon"])


def keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Per-entry keep probability: linear in the magnitude rank within each row."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
    order = torch.argsort(rows.abs(), dim=1)  # mergekit's call: equal magnitudes ordered alike
    ranks = torch.argsort(order, dim=1).to(delta.dtype)  # 0 = smallest magnitude
    span = rows.shape[1] - 1
    rank_fraction = ranks / span if span > 0 else torch.full_like(ranks, 0.5)
    # mergekit's expression order, so float32 probabilities are bit-identical to its.
    probs = (density - epsilon) + rank_fraction * 2 * epsilon
    return probs.reshape(delta.shape)


def magprune(magnitudes: torch.Tensor, density: float, *, epsilon: float, rescale: bool = False,
             generator: torch.Generator | None = None) -> Trim:
    """Keep each entry with its rank-based probability, drawn from ``generator``
    (``magnitudes``: ``|delta|``, which ranks exactly as the delta's ``abs()`` does)."""
    if density >= 1:
        return Trim()
    if density <= 0:
        return Trim(zero=True)
    problem = epsilon_problem(density, epsilon)
    if problem:
        raise ValueError(problem)
    mask = torch.bernoulli(keep_probabilities(magnitudes, density, epsilon), generator=generator)
    return Trim(mask.bool(), l1_scale(magnitudes, mask) if rescale else None)
