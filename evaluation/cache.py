"""The score cache: per-example scores by (candidate key, task key), in an append-only JSONL.

Append-only so that a killed run loses at most the line being written, and a resumed one
finds every score it had (see `read_jsonl`). Keys: evaluation/identity.py.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from evaluation.tasks import TaskResult


def read_jsonl(path: Path, *, repair: bool = True) -> list[dict]:
    """The rows of an append-only JSONL log, after cutting off a last line that a kill
    left unfinished (so the next append starts on a fresh line instead of gluing itself
    to the fragment and being lost with it). Only the log's writer repairs: a reader
    beside a live run (a report, a dry run) passes `repair=False`, skips the unfinished
    line and leaves the file alone, since that line may be one the run is writing now."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        if repair:
            with path.open("r+b") as handle:
                handle.truncate(len(data))
    rows = []
    for line in data.decode().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # written by an older version that did not repair: skip
            continue
    return rows


@dataclass
class CacheHit:
    result: TaskResult
    twin: str | None = None
    """The candidate whose scores these are, when they were reused from a functional twin."""


class ScoreCache:
    """Append-only JSONL of per-example scores keyed by (candidate, task settings)."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self._entries: dict[tuple[str, str], CacheHit] = {}
        for row in read_jsonl(self.path) if self.path else []:
            self._entries[(row["candidate"], row["task_key"])] = CacheHit(TaskResult(row["task"], row["scores"]),
                                                                          row.get("twin"))

    def get(self, candidate: str, key: str) -> CacheHit | None:
        return self._entries.get((candidate, key))

    def put(self, candidate: str, key: str, result: TaskResult, *, twin: str | None = None) -> None:
        self._entries[(candidate, key)] = CacheHit(result, twin)
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            row = {"candidate": candidate, "task_key": key, "task": result.task, "scores": result.scores}
            with self.path.open("a") as handle:
                handle.write(json.dumps(row | ({"twin": twin} if twin else {})) + "\n")

    def __len__(self) -> int:
        return len(self._entries)
