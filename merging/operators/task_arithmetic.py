"""Generalized task arithmetic: task_arithmetic, TIES, DARE and Breadcrumbs in one function.

All of these methods edit the base with task vectors ``delta_i = model_i - base`` and
differ only in two choices, so (as in mergekit) one function covers them:

1. sparsification of each delta (none, TIES magnitude, DARE random, Breadcrumbs,
   DELLA's magnitude-ranked random drop);
2. sign consensus (TIES): per entry, elect the sign of ``sum_i w_i * delta_i`` (zero
   counts as +) and let only deltas of that sign contribute.

Then ``out = base + lambda * sum_i w_i delta_i [/ divisor]``. mergekit's conventions,
which a recipe written for it relies on:

* weights are applied BEFORE the sign vote, so ``weight`` can change the elected sign;
* with ``normalize`` the divisor is the sum of the weights of the deltas that
  contributed to each entry (0 replaced by 1), or without consensus the plain sum of
  weights (replaced by 1 when its magnitude is below 1e-8);
* ``int8_mask`` only chose mergekit's mask storage type; the mask is boolean either way,
  so it is accepted and has no numerical effect;
* ``density`` is accepted by every method (task_arithmetic ignores it), ``gamma`` by
  the Breadcrumbs ones and ``epsilon`` (default 0.15) by the DELLA ones;
* mergekit 0.1.5 builds these methods from a consensus method (``sum``, or ``count``:
  the majority of signs, unweighted) and a sparsification method, but a recipe cannot
  choose them: ``consensus_method`` / ``sparsification_method`` are not recipe
  parameters there, so only the named methods below exist (and ``sum`` is the only
  consensus any of them uses).
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch

from merging.operators.base import REAL, REQUIRED, UNIT, Domain, MergeMethod, compute_dtype
from merging.operators.della import check_model_params as della_check
from merging.operators.sparsify import Trim, trim


def sign_consensus(deltas: torch.Tensor) -> torch.Tensor:
    """TIES sign election on stacked weighted deltas ``[n, ...]``: a boolean mask of the
    entries whose sign agrees with the sign of their sum (ties go to +; zeros never agree).
    Built from comparisons (``d > 0`` where the sum is >= 0, else ``d < 0``, written as
    ``(d > 0) == positive`` and ``d != 0``: four times ``torch.where``'s speed), which is
    ``sign(d) == majority`` without a float copy of every delta's sign. (A NaN delta would
    count as agreeing; the inputs are checked finite, so one arises only from an infinite
    difference given weight 0.)"""
    positive = deltas.sum(dim=0) >= 0
    return ((deltas > 0) == positive) & (deltas != 0)


def generalized_task_arithmetic(
    *,
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weight: Sequence[float],
    density: Sequence[float] | None = None,
    gamma: Sequence[float] | None = None,
    epsilon: Sequence[float] | None = None,
    normalize: bool,
    rescale: bool,
    lambda_: float = 1.0,
    int8_mask: bool = False,
    generator: torch.Generator | None = None,
    sparsification: str | None,
    consensus: bool,
    trims: Sequence[Trim] | None = None,
) -> torch.Tensor:
    """Merge ``tensors`` into ``base`` by (sparsified, sign-agreeing) weighted task vectors.

    ``trims``: each model's sparsification, already computed from the whole tensor (see
    ``trim_model``) when these are some rows of it; otherwise it is computed here."""
    dtype = compute_dtype(base, *tensors)
    base = base.to(dtype)
    if not tensors:
        return base
    density = density if density is not None else [1.0] * len(tensors)
    gamma = gamma if gamma is not None else [0.01] * len(tensors)
    epsilon = epsilon if epsilon is not None else [0.15] * len(tensors)
    # one [n, ...] buffer, filled delta by delta and then edited in place: the working set
    # of a large tensor (an embedding) is a few copies of it, not one per operation
    deltas = torch.empty((len(tensors), *base.shape), dtype=dtype, device=base.device)
    for i, x in enumerate(tensors):
        torch.sub(x.to(dtype), base, out=deltas[i])
        if trims is None and sparsification:
            trim(deltas[i].abs(), sparsification, density[i], rescale=rescale, gamma=gamma[i], epsilon=epsilon[i],
                 generator=generator, overwrite=True).apply_(deltas[i])
        elif trims is not None:
            trims[i].apply_(deltas[i])
    weights = torch.tensor(list(weight), dtype=dtype, device=base.device)
    weights = weights.reshape(-1, *([1] * base.dim()))
    deltas.mul_(weights)

    if consensus:
        mask = sign_consensus(deltas)
        mixed = deltas.mul_(mask).sum(dim=0)
    else:
        mixed = deltas.sum(dim=0)
    if normalize:  # the divisor only where it is used; in place on `mixed`, a fresh tensor
        if consensus:
            divisor = (weights * mask).sum(dim=0)
            divisor.add_((divisor == 0).to(dtype))  # 0 -> 1, others + 0.0: masked_fill_'s values, 3x faster
        else:
            divisor = weights.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1  # one entry per model axis: small
        mixed.div_(divisor)
    if lambda_ != 1:
        mixed.mul_(lambda_)
    return mixed.add_(base)


def trim_model(magnitudes: torch.Tensor, *, sparsification: str, rescale: bool, density: float = 1.0,
               gamma: float = 0.01, epsilon: float = 0.15, generator: torch.Generator | None = None,
               overwrite: bool = False, **_merge_only) -> Trim:
    """One model's sparsification of one tensor from its whole ``|delta|``, for the engine's
    merge by rows (weights, normalize, lambda and int8_mask play no part in it)."""
    return trim(magnitudes, sparsification, density, rescale=rescale, gamma=gamma, epsilon=epsilon,
                generator=generator, overwrite=overwrite)


def _method(name: str, sparsification: str | None, consensus: bool, normalize: bool,
            rescale: bool) -> MergeMethod:
    """One registry entry with mergekit's parameters and defaults for ``name``."""
    model_params = {"weight": REQUIRED, "density": 1.0}
    domains = {"weight": REAL, "density": UNIT, "lambda": REAL}
    if sparsification == "magnitude_outliers":
        model_params["gamma"] = 0.01
        domains["gamma"] = UNIT
    if sparsification == "della_magprune":
        model_params["epsilon"] = 0.15
        domains["epsilon"] = Domain(0.0, 0.5, high_open=True)  # density +- epsilon inside (0, 1)
    return MergeMethod(
        name=name,
        function=partial(generalized_task_arithmetic, sparsification=sparsification,
                         consensus=consensus),
        needs_base=True,
        model_params=model_params,
        global_params={"int8_mask": False, "normalize": normalize, "rescale": rescale,
                       "lambda": 1.0},
        random=sparsification in ("random", "della_magprune"),
        check_model_params=della_check if sparsification == "della_magprune" else None,
        domains=domains,
        rowwise=True,
        trim=partial(trim_model, sparsification=sparsification) if sparsification else None,
        min_models=1,
    )


# name: (sparsification, sign consensus, default normalize, default rescale), as mergekit.
TASK_ARITHMETIC_METHODS: dict[str, MergeMethod] = {
    name: _method(name, *spec)
    for name, spec in {
        "task_arithmetic": (None, False, False, False),
        "ties": ("magnitude", True, True, False),
        "dare_ties": ("random", True, False, True),
        "dare_linear": ("random", False, False, True),
        "breadcrumbs": ("magnitude_outliers", False, False, False),
        "breadcrumbs_ties": ("magnitude_outliers", True, False, False),
        "della": ("della_magprune", True, True, True),
        "della_linear": ("della_magprune", False, False, True),
    }.items()
}
