"""Passthrough: copy one model's tensor, optionally scaled.

Used for layer stacking ("frankenmerges"): each output slice comes from exactly one
source, and ``scale`` lets a recipe damp a copied layer (e.g. ``o_proj`` at 0.5).
"""
from __future__ import annotations

from typing import Sequence

import torch

from merging.operators.base import REAL, MergeMethod, compute_dtype


def passthrough(*, base: torch.Tensor | None = None, tensors: Sequence[torch.Tensor],
                scale: Sequence[float | None] | None = None) -> torch.Tensor:
    """The single input, times its ``scale`` when one is given.

    Without a scale the result may be the input tensor itself (no copy) when it is already
    in the compute dtype. ``base`` is ignored, as in mergekit.
    """
    if len(tensors) != 1:
        raise ValueError(f"passthrough takes exactly one model, got {len(tensors)}")
    (x,) = tensors
    x = x.to(compute_dtype(x))
    s = scale[0] if scale else None
    return x if s is None else x * s


PASSTHROUGH = MergeMethod(
    name="passthrough",
    function=passthrough,
    needs_base=False,
    model_params={"scale": None},
    domains={"scale": REAL},
    min_models=1,
    rowwise=True,
    max_models=1,
)
