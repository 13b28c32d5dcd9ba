"""RAM (Reinforced Agent Merging) and its tensor-local RAM+ variant.

Task vectors ``delta_i = model_i - base`` are compared entry by entry: an entry is
*active* in model i when ``|delta_i| > epsilon``. Where exactly one model is active its
delta is kept whole (a plain average would dilute it by the number of models); where
several are active their deltas are averaged over the active ones only; where none is,
the base stays. So ``out = base + sum_i delta_i * active_i * (1 if unique else 1 / count)``.

``ramplus_tl`` also boosts each model's unique entries by
``lambda_i = 1 + r * clamp(rho_i, 0, alpha)``, where ``rho_i`` = (entries model i shares
with others) / (entries only model i has, at least ``epsilon``), counted over this
tensor alone ("tensor-local"): a model whose changes mostly overlap others' gets its
few unique changes amplified.

mergekit 0.1.5's conventions, kept so that results agree bit for bit in float32: the
epsilon test is strict (``>``), the shared average divides the masked delta by the
count, and the per-model terms are summed over the models in one reduction. One
difference: mergekit forms ``rho`` and ``lambda`` in float32 whatever the compute dtype
(its counts are integers and torch promotes them to the default dtype); here they are in
the compute dtype, which changes nothing in float32 and keeps float64 references exact.
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch

from merging.operators.base import NON_NEGATIVE, POSITIVE, MergeMethod, compute_dtype


def ram(*, base: torch.Tensor, tensors: Sequence[torch.Tensor], epsilon: float = 1e-5,
        r: float = 0.0, alpha: float = 0.0, boost_unique: bool) -> torch.Tensor:
    """``base`` plus the task vectors, unique entries kept whole and shared ones averaged
    over the models active there; with ``boost_unique``, RAM+'s per-model boost."""
    dtype = compute_dtype(base, *tensors)
    base = base.to(dtype)
    if not tensors:
        return base
    deltas = torch.stack([x.to(dtype) - base for x in tensors]).reshape(len(tensors), -1)
    active = deltas.abs() > epsilon
    counts = active.sum(dim=0, keepdim=True)
    shared, unique = counts > 1, counts == 1
    kept = deltas * active
    unique_part = kept * unique
    if boost_unique:
        shared_per_model = (active & shared).sum(dim=1).to(dtype)
        unique_per_model = (active & unique).sum(dim=1).to(dtype)
        rho = shared_per_model / unique_per_model.clamp(min=epsilon)
        unique_part = unique_part * (1 + r * rho.clamp(min=0, max=alpha)).unsqueeze(-1)
    merged = (unique_part + kept * shared / counts.clamp(min=1)).sum(dim=0)
    return base + merged.reshape(base.shape)


RAM_METHODS = {
    "ram": MergeMethod(
        name="ram",
        function=partial(ram, boost_unique=False),
        needs_base=True,
        global_params={"epsilon": 1e-5},
        domains={"epsilon": NON_NEGATIVE},
    ),
    "ramplus_tl": MergeMethod(
        name="ramplus_tl",
        function=partial(ram, boost_unique=True),
        needs_base=True,
        global_params={"r": 0.1, "alpha": 0.2, "epsilon": 1e-5},
        domains={"r": NON_NEGATIVE, "alpha": NON_NEGATIVE, "epsilon": POSITIVE},  # it divides by epsilon
    ),
}
