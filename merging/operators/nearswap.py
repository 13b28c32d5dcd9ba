"""NearSwap: take the other model's value only where it is already close to the base's.

Per entry, with d = |base - other|, the other model gets the weight w = clamp(t / d, 0, 1)
and the result is ``w * other + (1 - w) * base``. Entries that differ by at most ``t``
are swapped for the other model's value entirely; far apart entries keep mostly the
base's, in proportion t / d. So a small ``t`` borrows from the other model only where
the two already agree, which is the method's purpose (a "near swap").

mergekit 0.1.5's conventions, kept so that results agree bit for bit: d is clamped to
at least ``MIN_DIFFERENCE`` before dividing (equal entries get weight 1 for any t > 0,
not nan), and the quotient is formed the way its ``t / d`` on a tensor evaluates in
torch, as the reciprocal of d times t (not a true division: the two round differently).
The method takes exactly one model besides the base, and ``t`` has no default.
"""
from __future__ import annotations

from typing import Sequence

import torch

from merging.operators.base import NON_NEGATIVE, REQUIRED, MergeMethod, compute_dtype

MIN_DIFFERENCE = 1e-6


def nearswap(*, base: torch.Tensor, tensors: Sequence[torch.Tensor], t: float) -> torch.Tensor:
    """Swap in the one other model's entries where they lie within about ``t`` of the base's."""
    if len(tensors) != 1:
        raise ValueError(f"nearswap takes a base and exactly one other model, got {len(tensors)} others")
    dtype = compute_dtype(base, *tensors)
    a, b = base.to(dtype), tensors[0].to(dtype)
    difference = (a - b).abs().clamp(min=MIN_DIFFERENCE)
    weight = (difference.reciprocal() * t).clamp(min=0, max=1)
    return weight * b + (1 - weight) * a


NEARSWAP = MergeMethod(
    name="nearswap",
    function=nearswap,
    needs_base=True,
    global_params={"t": REQUIRED},
    domains={"t": NON_NEGATIVE},  # a distance to the base
    min_models=1,
    rowwise=True,
    max_models=1,
)
