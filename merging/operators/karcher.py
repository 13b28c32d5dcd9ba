"""Karcher mean: the Riemannian centre of mass of the models' directions, scaled by
their mean norm (mergekit's ``karcher``).

Every tensor is a point ``|x| u`` with ``u`` on the unit sphere. The Karcher mean of the
``u`` (equal weights) minimises the sum of squared arc lengths to them; it is found by
fixed-point iteration: average the log maps ``theta / sin(theta) (u_i - cos(theta) m)``
of the points at the current mean ``m`` and step along the exponential map, until the
step is shorter than ``tol`` or ``max_iter`` steps were taken. The result is that mean
times the average norm.

There is no base model: a ``base_model`` the recipe lists (or the ``models:`` form
appends) is one more point, as in mergekit. mergekit's conventions, followed here: a
tensor whose norm is at most ``tol`` is left out of the direction (its norm still counts
in the average norm); the iteration starts at the normalised arithmetic mean of the
directions (at the first direction if that mean is shorter than ``tol``); a point within
``tol`` radians of the mean adds nothing to the step; if every norm is at most ``tol``
the result is zero. ``max_iter`` is rounded to an integer: mergekit takes only whole
numbers, a search may propose fractions.
"""
from __future__ import annotations

from typing import Sequence

import torch

from merging.operators.base import COUNT, POSITIVE, MergeMethod, compute_dtype


def karcher(*, base: torch.Tensor | None = None, tensors: Sequence[torch.Tensor],
            max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """The norm-scaled Karcher mean of ``tensors`` (``base`` is unused: see the module)."""
    dtype = compute_dtype(*tensors)
    points = [x.to(dtype) for x in tensors]
    if len(points) == 1:
        return points[0]
    alpha = 1.0 / len(points)
    norms = [torch.linalg.vector_norm(x) for x in points]
    kept = [x / n for x, n in zip(points, norms) if n.item() > tol]
    if not kept:
        return torch.zeros_like(points[0])
    share = alpha / sum([alpha] * len(kept))  # mergekit renormalises the weights of those kept
    mean = torch.zeros_like(kept[0])
    for u in kept:
        mean += share * u
    mean_norm = torch.linalg.vector_norm(mean)
    mean = kept[0].clone() if mean_norm.item() < tol else mean / mean_norm
    for _ in range(round(max_iter)):
        step = torch.zeros_like(mean)
        for u in kept:
            cos = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(cos)
            if theta.item() >= tol:
                step += share * (theta / torch.sin(theta)) * (u - cos * mean)
        length = torch.linalg.vector_norm(step)
        if length.item() < tol:
            break
        mean = torch.cos(length) * mean + torch.sin(length) * (step / length)
        mean_norm = torch.linalg.vector_norm(mean)
        if mean_norm.item() > tol:
            mean = mean / mean_norm
    scale = sum(alpha * n for n in norms)
    return scale * mean


KARCHER = MergeMethod(
    name="karcher",
    function=karcher,
    needs_base=False,
    global_params={"max_iter": 10, "tol": 1e-5},
    domains={"max_iter": COUNT, "tol": POSITIVE},
    min_models=1,
)
