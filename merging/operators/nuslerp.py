"""NuSLERP: mergekit's second slerp, driven by per-model weights instead of one ``t``.

Two models with weights w1, w2 are interpolated at ``t = w2 / (w1 + w2)`` (0.5 when
``|w1 + w2| < 1e-6``). Unlike ``slerp`` it can work on pieces of a tensor: by default
(``nuslerp_flatten: true``) the whole tensor is one vector; with ``nuslerp_flatten:
false`` every row of the last dimension is interpolated on its own arc, or every column
(slice along dimension 0) with ``nuslerp_row_wise: true`` (mergekit's naming). Given a
base model it interpolates the task vectors instead and adds the result to the base.

Its degenerate rule is not ``slerp``'s, which is why `merging.operators.slerp` is not
reused: vectors fall back to linear interpolation only when ``1 - cos^2 <= 1e-16`` (sin
theta below 1e-8), not at ``|cos| > 0.9995``, and each vector is normalised by
``max(norm, 1e-7)``.
"""
from __future__ import annotations

from typing import Sequence

import torch

from merging.operators.base import REAL, REQUIRED, MergeMethod, compute_dtype

NORM_FLOOR = 1e-7
SIN_EPS = 1e-8


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp(min=NORM_FLOOR)


def nuslerp(a: torch.Tensor, b: torch.Tensor, t: float, *, row_wise: bool = False,
            flatten: bool = True) -> torch.Tensor:
    """Slerp from ``a`` (t=0) to ``b`` (t=1), per vector as described in the module."""
    shape = a.shape
    if flatten:
        a, b = a.reshape(-1), b.reshape(-1)
    elif row_wise:
        a, b = a.transpose(0, -1), b.transpose(0, -1)
    cos = (_unit(a) * _unit(b)).sum(dim=-1, keepdim=True).clamp(-1, 1)
    parallel = 1 - cos.square() <= SIN_EPS ** 2
    theta = torch.acos(torch.where(parallel, 0, cos))  # keeps the unused branch finite
    arc = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    out = torch.where(parallel, (1 - t) * a + t * b, arc)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def nuslerp_merge(*, base: torch.Tensor | None, tensors: Sequence[torch.Tensor],
                  weight: Sequence[float], nuslerp_row_wise: bool = False,
                  nuslerp_flatten: bool = True) -> torch.Tensor:
    """NuSLERP of the two models, or of their task vectors added to ``base`` when given."""
    if len(tensors) != 2:
        raise ValueError(f"nuslerp takes exactly two models besides the base, got {len(tensors)}")
    total = sum(weight)
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    dtype = compute_dtype(base, *tensors)
    a, b = (x.to(dtype) for x in tensors)
    options = dict(row_wise=nuslerp_row_wise, flatten=nuslerp_flatten)
    if base is None:
        return nuslerp(a, b, t, **options)
    origin = base.to(dtype)
    return origin + nuslerp(a - origin, b - origin, t, **options)


NUSLERP = MergeMethod(
    name="nuslerp",
    function=nuslerp_merge,
    needs_base=False,
    optional_base=True,
    model_params={"weight": REQUIRED},
    global_params={"nuslerp_row_wise": False, "nuslerp_flatten": True},
    domains={"weight": REAL},
    min_models=2,
    max_models=2,
)
