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

Each rule looks only at the magnitudes ``|delta|`` of the whole tensor and returns a
``Trim`` (a mask and a scale) that is then applied to the delta: the engine computes the
trims of a large tensor first and applies them to a few rows at a time (merging/rowwise.py).

One deliberate difference, for float64 inputs only (test references): mergekit on CPU
ranks float32-rounded magnitudes and draws DARE masks in float32; here both use the
compute dtype. In float32 compute, which merges use, the results are bit-identical.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

RESCALE_EPS = 1e-7
"""Below this L1 norm (before or after masking) rescaling is skipped, as in mergekit."""


@dataclass(frozen=True)
class Trim:
    """What sparsification keeps of one delta: ``delta * mask``, times ``scale`` (the L1
    rescale) when there is one. No mask keeps every entry; ``zero`` keeps none. The mask is
    boolean (multiplying by it is multiplying by 1.0 or 0.0, bit for bit what mergekit's
    float masks do) and has the delta's shape, so ``rows`` gives the trim of a row range.
    A ``threshold`` stands for the mask ``|delta| >= threshold`` (a TIES trim where no tie
    crosses the k-th place, the usual case): nothing is stored per entry, so a large
    tensor merged by rows holds no mask for it."""

    mask: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    zero: bool = False
    threshold: torch.Tensor | None = None

    def apply_(self, delta: torch.Tensor) -> torch.Tensor:
        """Trim ``delta`` in place (the mask first, then the scale: mergekit's order)."""
        if self.zero:
            return delta.zero_()
        if self.threshold is not None:
            delta.mul_(delta.abs() >= self.threshold)
        elif self.mask is not None:
            delta.mul_(self.mask)
        if self.scale is not None:
            delta.mul_(self.scale)
        return delta

    def rows(self, start: int, stop: int) -> "Trim":
        return Trim(None if self.mask is None else self.mask[start:stop], self.scale, self.zero, self.threshold)


def l1_scale(magnitudes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
    """The factor that gives the kept entries the L1 norm of all of them, or None where
    either norm is below ``RESCALE_EPS`` (nothing, or nothing left, to rescale: no 0/0).
    ``|delta * mask|`` is ``|delta| * mask`` exactly, so the sums are mergekit's."""
    before, after = magnitudes.sum(), (magnitudes * mask).sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return None
    return before / after


SELECTION_CHUNK = 1 << 22
"""Entries per step of `kth_largest`'s histogram passes: its scratch is a few of these."""


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of a flat tensor of magnitudes (k in 1..numel), exactly.

    For float32 a radix selection: the bit pattern of a non-negative float, read as an
    integer, orders as the float does, so a histogram of the top 16 bits (``bincount``)
    finds the bucket holding the k-th largest, and a selection among that bucket's few
    entries finds it. Seven times ``torch.kthvalue``'s speed on a 1024 x 2816 tensor (6 ms
    against 45 ms on one core), which was 40% of a TIES merge, and its scratch is a few
    chunks, not the copy of the tensor ``kthvalue`` makes. The value is ``kthvalue``'s:
    the k-th largest is unique as a value. Other dtypes use ``kthvalue``.
    """
    if values.dtype != torch.float32:
        return torch.kthvalue(values, values.numel() - k + 1).values
    chunks = values.view(torch.int32).split(SELECTION_CHUNK)
    counts = sum(torch.bincount(chunk >> 16, minlength=1 << 15) for chunk in chunks)
    at_or_above = counts.flip(0).cumsum(0)  # entries in the top i+1 buckets
    top = int(torch.searchsorted(at_or_above, k))  # the first i that reaches k
    bucket = (1 << 15) - 1 - top
    rank = k - (int(at_or_above[top - 1]) if top else 0)  # its rank among the bucket's entries
    members = torch.cat([chunk[(chunk >> 16) == bucket] for chunk in chunks])
    return torch.kthvalue(members, members.numel() - rank + 1).values.view(torch.float32)


def top_k_mask(values: torch.Tensor, k: int, *, overwrite: bool = False,
               threshold: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask of the k largest entries of a flat tensor, the entries mergekit keeps.

    mergekit keeps the first k of ``torch.argsort(values, descending=True)``, an unstable
    sort: where entries tie at the threshold (common when the sources are bfloat16) the
    tied entries it keeps are whichever the sort puts first, neither the lowest nor the
    highest indices (on CPU, torch 2.13, about half the tied entries differ from a stable
    sort's choice). So when the tie matters this makes the same call on the same values
    and keeps the same entries, on the same device and torch version. Otherwise the kept
    set is unique and a selection (``kth_largest``) finds it in a small part of the
    time. The tie matters for almost every large tensor of bfloat16 sources and, measured
    on random float32 ones, for about half of those above 4M entries; then the trim costs
    both, and the sort is most of a TIES merge's time (docs/benchmarks.md).
    ``overwrite``: the caller no longer needs ``values``, so the sort may run in place
    (the same sort, without its copy of the values: 4 bytes an entry less at the peak).
    ``threshold``: the k-th largest value, when the caller knows it already.
    """
    mask = values >= (kth_largest(values, k) if threshold is None else threshold)
    if int(torch.count_nonzero(mask)) == k:  # no tie at the threshold crosses the k-th place
        return mask
    if overwrite:
        order = torch.empty(values.shape, dtype=torch.long, device=values.device)
        torch.sort(values, descending=True, out=(values, order))
    else:
        order = torch.argsort(values, descending=True)
    mask.zero_()
    mask[order[:k]] = True
    return mask


def magnitude(magnitudes: torch.Tensor, density: float, *, rescale: bool = False,
              overwrite: bool = False) -> Trim:
    """Keep the k = max(1, int(density * numel)) largest-magnitude entries (TIES trim).

    A positive density always keeps at least one entry. ``overwrite``: see ``top_k_mask``
    (not with ``rescale``, which needs the magnitudes afterwards).
    """
    if density >= 1:
        return Trim()
    if density <= 0 or magnitudes.numel() == 0:
        return Trim(zero=True)
    k = max(1, int(density * magnitudes.numel()))
    flat = magnitudes.reshape(-1)
    threshold = kth_largest(flat, k)
    kept = flat >= threshold
    if int(torch.count_nonzero(kept)) == k:  # the k largest are exactly those at or above it
        scale = l1_scale(magnitudes, kept.reshape(magnitudes.shape)) if rescale else None
        return Trim(threshold=threshold, scale=scale)
    del kept
    mask = top_k_mask(flat, k, overwrite=overwrite and not rescale, threshold=threshold).reshape(magnitudes.shape)
    return Trim(mask, l1_scale(magnitudes, mask) if rescale else None)


def random(magnitudes: torch.Tensor, density: float, *, rescale: bool = False,
           generator: torch.Generator | None = None) -> Trim:
    """Keep each entry independently with probability ``density`` (DARE drop).

    The draw uses ``generator``, so a seeded generator gives the same mask every time.
    """
    if density >= 1:
        return Trim()
    mask = torch.bernoulli(torch.full_like(magnitudes, density), generator=generator)
    return Trim(mask.bool(), l1_scale(magnitudes, mask) if rescale else None)


def magnitude_outliers(magnitudes: torch.Tensor, density: float, *, gamma: float = 0.01,
                       rescale: bool = False) -> Trim:
    """Keep ``int(density * numel)`` entries just below the ``int(gamma * numel)`` largest.

    Entries are ranked by magnitude; the top ``gamma`` fraction goes (Breadcrumbs' outlier
    removal), then the smallest go until ``density`` remains. When ``density + gamma >
    1`` fewer outliers are dropped so that ``density`` is still kept. Unlike
    ``magnitude`` there is no keep-at-least-one rule (mergekit has none either).
    """
    if density >= 1:
        return Trim()
    n = magnitudes.numel()
    keep_n, top_n = int(density * n), int(gamma * n)
    bottom_n = max(0, n - keep_n - top_n)
    order = torch.sort(magnitudes.reshape(-1), descending=False).indices
    mask = torch.zeros(n, dtype=torch.bool, device=magnitudes.device)
    mask[order[bottom_n:bottom_n + keep_n]] = True
    mask = mask.reshape(magnitudes.shape)
    return Trim(mask, l1_scale(magnitudes, mask) if rescale else None)


def trim(magnitudes: torch.Tensor, method: str, density: float, *, rescale: bool = False,
         gamma: float = 0.01, epsilon: float = 0.15, generator: torch.Generator | None = None,
         overwrite: bool = False) -> Trim:
    """Dispatch on mergekit's sparsification method name (``della_magprune``: see ``della``).
    ``magnitudes`` is ``|delta|`` over the whole tensor; with ``overwrite`` the rule may
    use it as scratch space."""
    if method == "magnitude":
        return magnitude(magnitudes, density, rescale=rescale, overwrite=overwrite)
    if method == "random":
        return random(magnitudes, density, rescale=rescale, generator=generator)
    if method == "magnitude_outliers":
        return magnitude_outliers(magnitudes, density, gamma=gamma, rescale=rescale)
    if method == "della_magprune":
        from merging.operators.della import magprune  # here: della imports Trim from this module
        return magprune(magnitudes, density, epsilon=epsilon, rescale=rescale, generator=generator)
    raise ValueError(f"unknown sparsification method {method!r}")
