"""Model Stock (Jang et al., 2024): move from the base towards the models' average by a
ratio read off the angle between their task vectors.

Fine-tunes of one base whose task vectors ``delta_i = x_i - base`` are nearly
orthogonal carry mostly noise, so their average should stay near the base; aligned ones
agree, so the average can be trusted. With ``cos`` the mean pairwise cosine of the task
vectors and N models, the paper's ratio is

    t = N cos / (1 + (N - 1) cos),    out = t * mean(x_i) + (1 - t) * base.

mergekit's conventions, followed here: the cosine is taken over the whole flattened
tensor, or per row of the last dimension with ``filter_wise`` (a 1-D tensor is one row);
each pairwise cosine divides by ``max(|d_i| |d_j|, 1e-6)`` and is clamped to [-1, 1];
where ``|1 + (N - 1) cos| < 1e-6`` (the ratio has no finite value) t is 0, so the base
is kept.
"""
from __future__ import annotations

from typing import Sequence

import torch

from merging.operators.base import MergeMethod, compute_dtype

NORM_FLOOR = 1e-6
SINGULAR = 1e-6


def model_stock(*, base: torch.Tensor, tensors: Sequence[torch.Tensor],
                filter_wise: bool = False) -> torch.Tensor:
    """Interpolate between the base and the models' mean by the Model Stock ratio."""
    dtype = compute_dtype(base, *tensors)
    shape = base.shape
    anchor = base.to(dtype)
    models = [x.to(dtype) for x in tensors]
    if not filter_wise:
        anchor, models = anchor.reshape(-1), [x.reshape(-1) for x in models]
    elif anchor.dim() == 1:
        anchor, models = anchor.unsqueeze(0), [x.unsqueeze(0) for x in models]
    deltas = [x - anchor for x in models]
    cosines = []
    for i, a in enumerate(deltas):
        for b in deltas[i + 1:]:
            norms = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=NORM_FLOOR)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(models)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < SINGULAR
    ratio = torch.where(singular, torch.zeros_like(cos),
                        n * cos / torch.where(singular, torch.ones_like(denominator), denominator))
    mean = sum(models) / n  # summed in model order, as mergekit does
    return (ratio * mean + (1 - ratio) * anchor).reshape(shape)


MODEL_STOCK = MergeMethod(
    name="model_stock",
    function=model_stock,
    needs_base=True,
    global_params={"filter_wise": False},
    min_models=2,
)
