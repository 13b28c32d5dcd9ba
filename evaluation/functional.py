"""Functional hashing: a candidate that computes what a scored one computes is not scored again.

After "Unified Functional Hashing in Automatic Machine Learning" (Gillard et al., 2023):
different genomes often make the same model (a gene clipped at a bound, a weight on a
model identical to another, bfloat16 outputs that round two nearby merges to the same
tensors), so before scoring a new candidate the harness runs it once on a fixed probe
batch and hashes the output. When an already scored candidate has the same hash AND the
same probe output (compared value by value, so a hash collision can never pass), the
new one reuses its scores.

The probe: PROBE_ROWS x PROBE_LENGTH token ids, a seeded permutation of the vocabulary
repeated as needed (so a vocabulary up to that size has every embedding row read). The
output: the logits at every position, rounded to KEPT_BITS significant bits (so that
float noise in the last bits does not hide a twin, while any real difference in the
weights shows); above MAX_COLUMNS vocabulary entries only MAX_COLUMNS evenly spaced
columns plus each position's log-sum-exp over the whole vocabulary are kept, which bounds
what is stored per candidate (~130 KB) while every row of the head still counts.

Outputs are kept in a JSONL file beside the score cache (base64 float32), so that a
resumed run still finds twins; rows from another probe (vocabulary, dtype, device)
are ignored.
"""
from __future__ import annotations

import base64
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch

from evaluation.cache import read_jsonl

PROBE_ROWS = 2
PROBE_LENGTH = 64
MAX_COLUMNS = 256
KEPT_BITS = 16
"""Significant bits kept of each float32 logit (of 24): a relative resolution of ~1.5e-5."""


def probe_ids(vocab_size: int) -> torch.Tensor:
    """The probe batch, (PROBE_ROWS, PROBE_LENGTH) token ids, the same on every machine."""
    order = torch.randperm(vocab_size, generator=torch.Generator().manual_seed(0))
    count = PROBE_ROWS * PROBE_LENGTH
    return order.repeat(math.ceil(count / vocab_size))[:count].view(PROBE_ROWS, PROBE_LENGTH)


def round_significant(values: torch.Tensor, bits: int = KEPT_BITS) -> torch.Tensor:
    """float32 values rounded (half away from zero) to `bits` significant bits."""
    drop = 24 - bits
    raw = values.float().contiguous().view(torch.int32)
    return ((raw + (1 << (drop - 1))) & ~((1 << drop) - 1)).view(torch.float32)


@torch.no_grad()
def probe_output(model) -> torch.Tensor | None:
    """The candidate's rounded probe output on the CPU, or None when it is not finite
    (such a candidate is scored, never matched)."""
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    logits = model(input_ids=probe_ids(vocab).to(device)).logits.float()
    logits = logits.reshape(-1, logits.shape[-1])
    if logits.shape[-1] > MAX_COLUMNS:
        columns = torch.linspace(0, logits.shape[-1] - 1, MAX_COLUMNS, device=device).round().long()
        logits = torch.cat([logits[:, columns], logits.logsumexp(-1, keepdim=True)], dim=1)
    if not bool(torch.isfinite(logits).all()):
        return None
    output = round_significant(logits.cpu())
    return output if bool(torch.isfinite(output).all()) else None


def probe_setting(model) -> str:
    """What a probe output depends on besides the weights; outputs of other settings are
    never compared."""
    vocab = model.get_input_embeddings().num_embeddings
    return json.dumps([PROBE_ROWS, PROBE_LENGTH, MAX_COLUMNS, KEPT_BITS, vocab, str(model.dtype),
                       next(model.parameters()).device.type])


def functional_hash(output: torch.Tensor) -> str:
    return hashlib.sha256(output.numpy().tobytes()).hexdigest()[:20]


class ProbeStore:
    """Probe outputs of the candidates scored so far, by (probe setting, hash); append-only
    JSONL at `path` when given."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self._entries: dict[tuple[str, str], list[dict]] = {}
        self._candidates: set[str] = set()
        for row in read_jsonl(self.path) if self.path else []:
            self._remember(row)

    def _remember(self, row: dict) -> None:
        self._entries.setdefault((row["probe"], row["hash"]), []).append(row)
        self._candidates.add(row["candidate"])

    def find(self, setting: str, output: torch.Tensor, *, exclude: str) -> str | None:
        """The first stored candidate (other than `exclude`) whose output equals `output`."""
        for row in self._entries.get((setting, functional_hash(output)), []):
            stored = np.frombuffer(base64.b64decode(row["output"]), dtype=np.float32).reshape(row["shape"])
            if row["candidate"] != exclude and np.array_equal(stored, output.numpy()):
                return row["candidate"]
        return None

    def add(self, candidate: str, setting: str, output: torch.Tensor) -> None:
        if candidate in self._candidates:
            return
        row = {"candidate": candidate, "probe": setting, "hash": functional_hash(output),
               "shape": list(output.shape), "output": base64.b64encode(output.numpy().tobytes()).decode()}
        self._remember(row)
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as handle:
                handle.write(json.dumps(row) + "\n")

    def __len__(self) -> int:
        return len(self._candidates)


def probe_file(cache: str | Path) -> Path:
    """Where the probe outputs of a score cache live: `scores.jsonl` -> `scores.probes.jsonl`."""
    cache = Path(cache)
    return cache.with_name(cache.stem + ".probes.jsonl")
