"""Linear merge ("model soup"): a weighted average of all the models' weights.

Unlike the task-vector methods there is no base: every model of the merge is in
``tensors`` (in mergekit a base model takes part only when it is listed in ``models``).
"""
from __future__ import annotations

from typing import Sequence

import torch

from merging.operators.base import REAL, REQUIRED, MergeMethod, compute_dtype


def linear(*, base: torch.Tensor | None = None, tensors: Sequence[torch.Tensor],
           weight: Sequence[float], normalize: bool = True) -> torch.Tensor:
    """``sum_i w_i x_i``, divided by ``sum_i w_i`` when ``normalize``.

    Weights are rounded to the compute dtype before use and accumulated in model order, as
    mergekit does, so results agree bit for bit. As in mergekit a zero weight sum with
    ``normalize`` is not guarded: it gives inf/nan, which a search should treat as a failed
    candidate rather than have silently repaired here. ``base`` is ignored.
    """
    dtype = compute_dtype(*tensors)
    weights = torch.tensor(list(weight), dtype=dtype, device=tensors[0].device)
    out = torch.zeros_like(tensors[0], dtype=dtype)
    for x, w in zip(tensors, weights):
        out.addcmul_(x.to(dtype), w)
    if normalize:
        out /= weights.sum()
    return out


LINEAR = MergeMethod(
    name="linear",
    function=linear,
    needs_base=False,
    model_params={"weight": REQUIRED},
    global_params={"normalize": True},
    domains={"weight": REAL},
    min_models=1,
    rowwise=True,
)
