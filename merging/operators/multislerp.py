"""Multi-SLERP: a weighted "spherical average" of any number of models (mergekit's
``multislerp``).

Each tensor (or task vector, when a base model is given) is split into a direction and
a norm. The directions are averaged on the unit sphere in one step: project them onto
the tangent plane at their normalised weighted mean, take the weighted sum of the
projections there, and map it back with the exponential map ``cos|v| m + sin|v| v/|v|``.
The result gets the weighted mean of the norms. This is mergekit's one-step
approximation, not the iterated mean (that is ``karcher``). In fact the step is zero up
to rounding: with ``M = sum_i w_i u_i`` and ``m = M / |M|`` the weighted sum of the
projections is ``M - (M . m) m = 0``, so the result is the normalised weighted mean of
the directions times the weighted mean of the norms. The steps are kept, in mergekit's
order, because only then do the roundings, and so the tensors, agree bit for bit.

mergekit's conventions, followed here: weights are divided by their sum when
``normalize_weights`` (default true); a norm is divided as ``x / (|x| + eps)`` and the
tangent norm is ``|v| + eps`` (``eps`` default 1e-8); one model is returned unchanged;
when the weighted mean of the directions is shorter than ``eps`` (e.g. two opposite
tensors with equal weights) two models fall back to their weighted sum, more are refused.
"""
from __future__ import annotations

from typing import Sequence

import torch

from merging.errors import EvomergeError
from merging.operators.base import POSITIVE, REAL, REQUIRED, MergeMethod, compute_dtype


def multislerp(*, base: torch.Tensor | None, tensors: Sequence[torch.Tensor],
               weight: Sequence[float], normalize_weights: bool = True,
               eps: float = 1e-8) -> torch.Tensor:
    """The weighted spherical average of ``tensors`` (of their task vectors plus ``base``)."""
    dtype = compute_dtype(base, *tensors)
    if len(tensors) == 1:
        return tensors[0].to(dtype)
    shape = tensors[0].shape
    points = torch.stack([x.to(dtype) for x in tensors])
    origin = base.to(dtype) if base is not None else None
    if origin is not None:
        points -= origin
    flat = points.view(len(tensors), -1)
    weights = torch.tensor(list(weight), dtype=dtype, device=flat.device)
    if normalize_weights:
        weights = weights / weights.sum()
    column = weights.view(-1, 1)
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    directions = flat / (norms + eps)
    mean = (directions * column).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if len(tensors) != 2:
            raise EvomergeError(
                "multislerp: the weighted mean of the models' directions is zero (opposite tensors "
                "whose weights cancel); change the weights")
        result = (points[0] * weights[0] + points[1] * weights[1]).view(shape)
    else:
        mean = mean / mean_norm
        tangents = directions - (directions * mean).sum(-1, keepdim=True) * mean
        step = (tangents * column).sum(0)
        length = torch.linalg.vector_norm(step) + eps
        on_sphere = mean * torch.cos(length) + step * (torch.sin(length) / length)
        result = (on_sphere * (norms.squeeze(-1) * weights).sum()).view(shape)
    return result + origin if origin is not None else result


MULTISLERP = MergeMethod(
    name="multislerp",
    function=multislerp,
    needs_base=False,
    optional_base=True,
    model_params={"weight": REQUIRED},
    global_params={"normalize_weights": True, "eps": 1e-8},
    domains={"weight": REAL, "eps": POSITIVE},
    min_models=1,
)
