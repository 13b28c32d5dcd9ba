"""Sparsification of task vectors (deltas from the base), with mergekit's exact rules.

Fine-tuning changes many weights a little and a few a lot. Merging dense deltas makes
those many small changes interfere, so the task-vector methods first keep only part of
each delta:

* ``magnitude`` (TIES): keep the ``density`` fraction with the largest magnitude.
* ``random`` (DARE): keep each entry with probability ``density``.
* ``magnitude_outliers`` (Model Breadcrumbs): drop the largest ``gamma`` fraction (the
  outliers) and the smallest entries, keeping ``density`` in between.

With ``rescale`` the kept entries are scaled so the tensor keeps its L1 norm (mergekit's
``rescale_norm=l1``; the DARE paper's 1/density is only this in expectation).
``density >= 1`` returns the delta untouched, without rescaling, as mergekit does.

One deliberate difference, for float64 inputs only (test references): mergekit on CPU
ranks float32-rounded magnitudes and draws DARE masks in float32; here both use the
compute dtype. In float32 compute, which merges use, the results are bit-identical.
"""
from __future__ import annotations

import torch

RESCALE_EPS = 1e-7
"""Below this L1 norm (before or after masking) rescaling is skipped, as in mergekit."""


def rescale_l1(delta: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    """``delta * mask``, scaled back to the L1 norm of ``delta`` when ``rescale``."""
    kept = delta * mask
    if not rescale:
        return kept
    before, after = delta.abs().sum(), kept.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return kept  # nothing (or nothing left) to rescale: avoid 0/0
    return kept * (before / after)


def top_k_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries of a flat tensor, the entries mergekit keeps.

    mergekit keeps the first k of ``torch.argsort(values, descending=True)``, an unstable
    sort: where entries tie at the threshold (common when the sources are bfloat16) the
    tied entries it keeps are whichever the sort puts first, neither the lowest nor the
    highest indices (on CPU, torch 2.13, about half the tied entries differ from a stable
    sort's choice). So when the tie matters this makes the same call on the same values
    and keeps the same entries, on the same device and torch version. Otherwise the kept
    set is unique and a selection (``kthvalue``) finds it in a third of the time
    (0.33 s against 0.95 s for a 2048 x 5632 tensor on this 2-core VM). The tie matters
    for almost every large tensor of bfloat16 sources and, measured on random float32
    ones, for about half of those above 4M entries; then the trim costs both.
    """
    threshold = torch.kthvalue(values, values.numel() - k + 1).values
    kept = values >= threshold
    if int(torch.count_nonzero(kept)) == k:  # no tie at the threshold crosses the k-th place
        return kept
    mask = torch.zeros_like(values, dtype=torch.bool)
    mask[torch.argsort(values, descending=True)[:k]] = True
    return mask


def magnitude(delta: torch.Tensor, density: float, *, rescale: bool = False) -> torch.Tensor:
    """Keep the k = max(1, int(density * numel)) largest-magnitude entries (TIES trim).

    A positive density always keeps at least one entry.
    """
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    mask = top_k_mask(delta.abs().reshape(-1), k)  # boolean: `delta * mask` multiplies by 1.0 or 0.0
    return rescale_l1(delta, mask.reshape_as(delta), rescale)


def random(delta: torch.Tensor, density: float, *, rescale: bool = False,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep each entry independently with probability ``density`` (DARE drop).

    The draw uses ``generator``, so a seeded generator gives the same mask every time.
    """
    if density >= 1:
        return delta
    keep = torch.full_like(delta, density)
    mask = torch.bernoulli(keep, generator=generator)
    return rescale_l1(delta, mask, rescale)


def magnitude_outliers(delta: torch.Tensor, density: float, *, gamma: float = 0.01,
                       rescale: bool = False) -> torch.Tensor:
    """Keep ``int(density * numel)`` entries just below the ``int(gamma * numel)`` largest.

    Entries are ranked by magnitude; the top ``gamma`` fraction goes (Breadcrumbs' outlier
    removal), then the smallest go until ``density`` remains. When ``density + gamma >
    1`` fewer outliers are dropped so that ``density`` is still kept. Unlike
    ``magnitude`` there is no keep-at-least-one rule (mergekit has none either).
    """
    if density >= 1:
        return delta
    n = delta.numel()
    keep_n, top_n = int(density * n), int(gamma * n)
    bottom_n = max(0, n - keep_n - top_n)
    order = torch.sort(delta.abs().reshape(-1), descending=False).indices
    mask = torch.zeros(n, dtype=delta.dtype, device=delta.device)
    mask[order[bottom_n:bottom_n + keep_n]] = 1
    return rescale_l1(delta, mask.reshape_as(delta), rescale)


def sparsify(delta: torch.Tensor, method: str, density: float, *, rescale: bool = False,
             gamma: float = 0.01, epsilon: float = 0.15,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Dispatch on mergekit's sparsification method name (``della_magprune``: see ``della``)."""
    if method == "magnitude":
        return magnitude(delta, density, rescale=rescale)
    if method == "random":
        return random(delta, density, rescale=rescale, generator=generator)
    if method == "magnitude_outliers":
        return magnitude_outliers(delta, density, gamma=gamma, rescale=rescale)
    if method == "della_magprune":
        from merging.operators.della import magprune  # here: della imports rescale_l1 from this module
        return magprune(delta, density, epsilon=epsilon, rescale=rescale, generator=generator)
    raise ValueError(f"unknown sparsification method {method!r}")
