"""Models as per-tensor linear combinations of source models, for M2N2 on LLMs.

An M2N2 archive of P language models cannot hold P full models in RAM when P models do
not fit. But every model M2N2 makes from source models by SLERP crossovers with split
points at tensor boundaries is, tensor by tensor, a linear combination of the sources:
SLERP(A, B; t) = a A + b B with scalars a, b, and the split only makes (a, b) differ
before and after a boundary. So a member is stored as a coefficient matrix C (tensors x
sources): tensor k of the member is sum_s C[k, s] * source_s[k]. The archive costs
P x tensors x sources numbers (a 7B Mistral has 291 tensors: 291 x 3 x 20 floats for P = 20).

SLERP's angle needs inner products of whole members, which follow exactly from the
sources' per-tensor Gram matrices G_k[s, r] = <source_s[k], source_r[k]>:
<A, B> = sum_k C_A[k] . G_k C_B[k]. They are computed once, in one streaming pass over
the sources (float64). A member becomes a candidate as a `linear` recipe (normalize off)
with one filter entry per tensor, which the harness merges into its resident model.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from merging.architecture import detect_architecture
from merging.checkpoint import Checkpoint, write_atomic
from merging.errors import CheckpointError
from merging.recipe import Recipe
from niches.m2n2 import member_slerp_scales


@dataclass
class SourceGram:
    """The tensors of the sources in model order, their sizes, and their Gram matrices."""

    sources: list[str]
    tensors: list[str]
    sizes: np.ndarray
    """Number of parameters of each tensor (int64)."""
    grams: np.ndarray
    """(tensors, sources, sources) float64 inner products."""
    groups: list[str]
    """The layer of each tensor: "embed" (before the layers), "L0", ..., "head" (after)."""

    @classmethod
    def compute(cls, checkpoints: Sequence[Checkpoint]) -> "SourceGram":
        """One streaming pass: each tensor of every source is read once."""
        first = checkpoints[0]
        arch = detect_architecture(first.config)
        for checkpoint in checkpoints[1:]:
            missing = set(first.tensors) ^ set(checkpoint.tensors)
            if missing:
                raise CheckpointError(f"models {first.reference!r} and {checkpoint.reference!r} have different "
                                      f"tensors, e.g. {sorted(missing)[:3]}; coefficient members need identical ones")
        rank = {"pre": 0, "layer": 1, "post": 2}
        names = sorted(first.tensors, key=lambda n: (rank[arch.position(n)], arch.layer_of(n) or 0, n))
        grams = np.zeros((len(names), len(checkpoints), len(checkpoints)))
        sizes = np.zeros(len(names), dtype=np.int64)
        for k, name in enumerate(names):
            flat = torch.stack([c.read(name).to(torch.float64).flatten() for c in checkpoints])
            grams[k] = (flat @ flat.T).numpy()
            sizes[k] = flat.shape[1]
        groups = [{"pre": "embed", "post": "head"}.get(arch.position(n)) or f"L{arch.layer_of(n)}" for n in names]
        return cls([c.reference for c in checkpoints], names, sizes, grams, groups)

    @classmethod
    def load_or_compute(cls, path: Path, checkpoints: Sequence[Checkpoint]) -> "SourceGram":
        """The Gram of these sources saved at `path` (safetensors + JSON metadata, no
        pickle), or computed and saved there: a resumed run skips the pass over the weights."""
        from safetensors.numpy import load_file, save_file

        references = [c.reference for c in checkpoints]
        if path.is_file():
            from safetensors import safe_open

            with safe_open(str(path), framework="np") as handle:
                meta = json.loads(handle.metadata()["meta"])
            if meta["sources"] == references:
                arrays = load_file(str(path))
                return cls(references, meta["tensors"], arrays["sizes"], arrays["grams"], meta["groups"])
        gram = cls.compute(checkpoints)
        meta = json.dumps({"sources": references, "tensors": gram.tensors, "groups": gram.groups})
        write_atomic(path, lambda temporary: save_file({"sizes": gram.sizes, "grams": gram.grams}, str(temporary),
                                                       metadata={"meta": meta}))
        return gram

    def dot(self, a: np.ndarray, b: np.ndarray) -> float:
        """<A, B> of two members given as coefficient matrices."""
        return float(np.einsum("ks,ksr,kr->", a, self.grams, b))

    def one_hot(self, source: int) -> np.ndarray:
        """The member that is source `source` itself."""
        member = np.zeros((len(self.tensors), len(self.sources)))
        member[:, source] = 1.0
        return member

    def boundaries(self, granularity: str = "tensor") -> np.ndarray:
        """Allowed split points, as flat-parameter offsets: every tensor boundary, or only
        the boundaries between layers (embeddings and head count as layers of their own)."""
        ends = np.cumsum(self.sizes)
        if granularity == "tensor":
            return np.concatenate([[0], ends])
        if granularity != "layer":
            raise ValueError(f"split granularity must be tensor or layer, got {granularity!r}")
        keep = [0] + [int(ends[k]) for k in range(len(self.tensors))
                      if k + 1 == len(self.tensors) or self.groups[k] != self.groups[k + 1]]
        return np.array(keep)


def slerp_split_members(a: np.ndarray, b: np.ndarray, w: float, split: int, gram: SourceGram) -> np.ndarray:
    """M2N2's crossover on coefficient members: SLERP(A, B; w) on the tensors before flat
    offset `split` (a tensor boundary) and SLERP(A, B; 1 - w) after it, with the angle of
    the whole parameter vectors."""
    norms = math.sqrt(gram.dot(a, a) * gram.dot(b, b))
    cosine = gram.dot(a, b) / norms if norms > 0 else 1.0
    before = np.cumsum(gram.sizes) <= split
    if not np.isin(split, np.concatenate([[0], np.cumsum(gram.sizes)])):
        raise ValueError(f"split {split} is not a tensor boundary")
    child = np.empty_like(a)
    for mask, t in ((before, w), (~before, 1.0 - w)):
        ca, cb = member_slerp_scales(cosine, t)
        child[mask] = ca * a[mask] + cb * b[mask]
    return child


def member_recipe(member: np.ndarray, gram: SourceGram, dtype: str | None = None) -> Recipe:
    """The candidate a member stands for: a `linear` merge of the sources with one weight
    per tensor (exact names as filters, so each entry matches its own tensor only)."""
    models = []
    for s, source in enumerate(gram.sources):
        entries = [{"filter": name, "value": float(member[k, s])} for k, name in enumerate(gram.tensors)]
        models.append({"model": source, "parameters": {"weight": entries}})
    data: dict = {"merge_method": "linear", "models": models, "parameters": {"normalize": False}}
    if dtype:
        data["dtype"] = dtype
    return Recipe.model_validate(data)


class CoefficientGenome:
    """Members as flat vectors for the run loop (its log stores genomes flat): a member is
    `flat.reshape(tensors, sources)` and decodes to its `linear` recipe."""

    def __init__(self, gram: SourceGram, dtype: str | None = None):
        self.gram = gram
        self.dtype = dtype
        self.shape = (len(gram.tensors), len(gram.sources))

    @property
    def dimension(self) -> int:
        return self.shape[0] * self.shape[1]

    def decode(self, genome: Sequence[float]) -> Recipe:
        return member_recipe(np.asarray(genome, dtype=np.float64).reshape(self.shape), self.gram, self.dtype)
