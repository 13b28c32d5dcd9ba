"""Large tensors merged a few rows at a time, straight from the files.

An embedding or output head of a 32k-256k vocabulary is 0.1-2 GB in float32. Merged
whole, its inputs, their deltas, the masks and the selection's sort buffers are all
resident at once: about eight copies of it, which is what a merge's peak memory was made
of. A method whose output rows depend only on the same input rows (`MergeMethod.rowwise`:
linear, passthrough, nearswap, the task-vector family) is instead merged here in row
ranges of about `ROW_RANGE_BYTES`, each read by a positioned read of just those rows and
written into the output tensor, or, when the merge goes to disk, straight to its place in
the file: the working set is a few row ranges (plus the output, when it is assembled).

The sparsifying task-vector methods (TIES, DARE, Breadcrumbs, DELLA) keep a share of each
model's delta chosen over the whole tensor (the k largest magnitudes, a random draw, ranks
within rows), so they take two passes: first, model by model, `|delta|` is built row range
by row range into one float32 buffer and the method's trim (a boolean mask, or for TIES
without a tie at the threshold just the threshold, and the L1 rescale factor) is computed
from it, the selection sorting that buffer in place when it must sort; then the row ranges
are merged with the trims' rows. Every value goes through
the same kernels as in the whole-tensor merge, and the random draws are the same draws in
the same order, so the result is bit-identical (tests/test_rowwise.py checks every rowwise
method on float32 and bfloat16 sources, ties at the selection threshold included).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from merging.operators.base import MergeMethod

ROWWISE_MIN_BYTES = 64 * 2**20
"""Tensors whose float32 size reaches this are merged by row ranges (smaller ones whole:
their copies are small, and one read per input is cheaper than several)."""

ROW_RANGE_BYTES = 2 * 2**20
"""The float32 size of one input's row range."""


def merges_by_rows(method: MergeMethod, shape: tuple[int, ...], input_dtypes: list[torch.dtype],
                   rebuilds_vocabulary: bool) -> bool:
    """Whether a tensor is merged here: a rowwise method, a large floating-point tensor,
    and rows that are the files' rows (not rebuilt to another tokenizer's vocabulary)."""
    return (method.rowwise and not rebuilds_vocabulary and len(shape) >= 1 and shape[0] > 1
            and all(dtype.is_floating_point for dtype in input_dtypes)
            and 4 * math.prod(shape) >= ROWWISE_MIN_BYTES)


def row_ranges(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """[start, stop) ranges over dim 0, each about `ROW_RANGE_BYTES` in float32."""
    row_bytes = 4 * math.prod(shape[1:])
    step = max(1, ROW_RANGE_BYTES // max(row_bytes, 1))
    return [(start, min(start + step, shape[0])) for start in range(0, shape[0], step)]


def rowwise_peak_bytes(method: MergeMethod, shape: tuple[int, ...], models: int, out_dtype: torch.dtype,
                       assembled: bool) -> int:
    """What merging one tensor by rows holds at most: the models' masks (one byte an
    entry each), the output when it is `assembled` (not written range by range), and
    either the trim pass (the `|delta|` buffer and, when a tie makes it sort, the sort's
    int64 indices and scratch: 4 + 16 bytes an entry, measured) or the row ranges being
    merged."""
    entries = math.prod(shape)
    trims = models * entries if method.trim is not None else 0
    trim_pass = 20 * entries if method.trim is not None else 0
    out = entries * out_dtype.itemsize if assembled else 0
    return out + trims + max(trim_pass, ROW_RANGE_BYTES * (models + 3))


def merge_by_rows(method: MergeMethod, read: Callable[[Any, int, int], torch.Tensor], base: Any,
                  inputs: list[Any], shape: tuple[int, ...], params: dict[str, Any], out_dtype: torch.dtype,
                  compute_dtype: torch.dtype, device: torch.device, generator: torch.Generator | None,
                  write_rows: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor | None:
    """Merge one tensor by row ranges. `read(source, start, stop)` returns rows
    [start, stop) of a source (`base`, None without one, or one of `inputs`) on `device`;
    `compute_dtype` is the operators' (float64 when an input is, else float32). The
    merged tensor is returned, or, with `write_rows(start, rows)`, each row range is handed
    to it as soon as it is merged and the whole is never held (None is returned)."""
    ranges = row_ranges(shape)
    trims = None
    if method.trim is not None:
        trims = []
        for index, source in enumerate(inputs):
            magnitudes = torch.empty(shape, dtype=compute_dtype, device=device)
            for start, stop in ranges:
                delta = magnitudes[start:stop]
                torch.sub(read(source, start, stop).to(compute_dtype), read(base, start, stop).to(compute_dtype),
                          out=delta)
                delta.abs_()
            trims.append(method.model_trim(magnitudes, index, params, generator, overwrite=True))
            del magnitudes
    out = torch.empty(shape, dtype=out_dtype, device=device) if write_rows is None else None
    for start, stop in ranges:
        extra = {"trims": [t.rows(start, stop) for t in trims]} if trims is not None else {}
        merged = method.merge(base=read(base, start, stop) if base is not None else None,
                              tensors=[read(source, start, stop) for source in inputs],
                              generator=generator, **params, **extra)
        if out is None:
            write_rows(start, merged.to(out_dtype))
        else:
            out[start:stop].copy_(merged)
    return out
