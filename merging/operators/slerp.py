"""Spherical linear interpolation between two models' tensors.

Averaging two directions linearly shrinks the result's norm when they diverge; slerp
moves along the arc between them instead (treating each tensor as one flat vector).
Conventions from mergekit: the angle comes from the normalised vectors but the
unnormalised tensors are interpolated; a norm of at most ``EPS`` is taken as 1 (so zero
tensors do not divide by zero); and nearly parallel or antiparallel tensors
(``|cos| > DOT_THRESHOLD``), where sin(theta) is ill-conditioned, fall back to lerp.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from merging.operators.base import REQUIRED, UNIT, MergeMethod, compute_dtype

DOT_THRESHOLD = 0.9995
EPS = 1e-8
CHUNK = 1 << 20
"""Norms and the dot product are reduced per chunk of this many elements, then over the
chunks: mergekit's order of summation, so results agree bit for bit on large tensors."""


def _norm(x: torch.Tensor) -> torch.Tensor:
    parts = [torch.linalg.vector_norm(c) for c in x.split(CHUNK)]
    norm = torch.linalg.vector_norm(torch.stack(parts))
    return torch.where(norm > EPS, norm, 1)


def _cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    nx, ny = _norm(x), _norm(y)
    parts = [(a / nx * (b / ny)).sum() for a, b in zip(x.split(CHUNK), y.split(CHUNK))]
    return torch.stack(parts).sum().clamp(-1, 1)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Interpolate from ``a`` (t=0) to ``b`` (t=1) along the arc, in the compute dtype.

    ``t`` is rounded to the compute dtype first (mergekit passes it as a float32 tensor).
    t=0 and t=1 give ``a`` and ``b`` exactly (for finite inputs).
    """
    dtype = compute_dtype(a, b)
    x, y = a.to(dtype).reshape(-1), b.to(dtype).reshape(-1)
    t = torch.tensor(t, dtype=dtype, device=x.device)
    if x.numel() == 0:
        return ((1 - t) * x + t * y).reshape(a.shape)
    dot = _cosine(x, y)
    linear = dot.abs() > DOT_THRESHOLD
    theta = torch.acos(torch.where(linear, 0, dot))  # acos(0) keeps the unused branch finite
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef_b = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
    return (coef_a * x + coef_b * y).reshape(a.shape)


def slerp_scales(cosine: float, t: float, *, dot_threshold: float = DOT_THRESHOLD) -> tuple[float, float]:
    """(p, q) with SLERP(a, b; t) = p a + q b for two vectors whose cosine is `cosine`: the
    scalar form of `slerp`, in float64, for callers that interpolate whole models through
    coefficients (M2N2's members, niches/coefficients.py). The degenerate case is the
    operator's: linear interpolation (1 - t, t) where |cos| > `dot_threshold`, that is
    where sin(theta) is too small to divide by, for parallel and antiparallel vectors alike."""
    cosine = min(1.0, max(-1.0, float(cosine)))
    if abs(cosine) > dot_threshold:
        return 1.0 - t, t
    theta = math.acos(cosine)
    return math.sin((1.0 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def slerp_merge(*, base: torch.Tensor, tensors: Sequence[torch.Tensor], t: float) -> torch.Tensor:
    """Slerp from the base (t=0) to the one other model (t=1)."""
    if len(tensors) != 1:
        raise ValueError(f"slerp takes a base and exactly one other model, got {len(tensors)} others")
    return slerp(base, tensors[0], t)


SLERP = MergeMethod(
    name="slerp",
    function=slerp_merge,
    needs_base=True,
    global_params={"t": REQUIRED},
    domains={"t": UNIT},
    min_models=1,
    max_models=1,
)
