"""The run folder: the files a run keeps, the rule for rerunning in it, and the record of
which source checkpoints its logged scores were measured on.

    config.yaml, template.yaml   the config (and PS template) as given
    candidates.jsonl             a line per evaluated candidate (niches/loop.py reads and writes it)
    optimizer.jsonl              the search's summary after every ask/tell round
    scores.jsonl                 the harness's per-example score cache
    sources.json                 per stage, the identity of each source checkpoint
    sessions.jsonl               per finished invocation: its start, seconds, candidates scored, load, peak RSS

A rerun must give the same config: its log is replayed against the search the config
describes. The exception is a folder where nothing was scored yet (a first attempt that
failed at its first candidate, say): its config is simply replaced.
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from evaluation.harness import checkpoint_hash, read_jsonl
from merging.checkpoint import write_atomic
from merging.errors import EvomergeError


class RunFolder:
    """The files of one run; appends are line-atomic enough for JSONL (see read_jsonl).
    `read_only`: a view for a dry run, which reads the logs as they are (a run may be
    writing them) and never repairs them."""

    def __init__(self, path: str | Path, *, read_only: bool = False):
        self.path = Path(path).resolve()
        self.read_only = read_only
        self.session: float | None = None
        """The invocation holding the folder, by its start (unix seconds; set by `claimed`):
        logged lines carry it, so a killed invocation's time is still known."""
        self.candidates_file = self.path / "candidates.jsonl"
        self.optimizer_file = self.path / "optimizer.jsonl"
        self.scores_file = self.path / "scores.jsonl"
        self.sessions_file = self.path / "sessions.jsonl"
        self.sources_file = self.path / "sources.json"

    @contextmanager
    def claimed(self, session: float | None = None) -> Iterator[None]:
        """The folder for this invocation alone: a second `evomerge evolve` on it at the
        same time would score the same candidates and interleave their log lines.
        `session`: the invocation's start (unix seconds; default: now)."""
        import fcntl

        self.path.mkdir(parents=True, exist_ok=True)
        with (self.path / ".lock").open("w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise EvomergeError(f"run folder {self.path} is in use by another evomerge evolve; wait for it "
                                    "to finish or stop it, then rerun") from None
            self.session = round(time.time(), 3) if session is None else session
            try:
                yield
            finally:
                self.session = None

    def start(self, config_text: str, template_text: str | None, *, scored: bool) -> None:
        """Record the config (first run, or a folder with nothing `scored` yet) or check
        that a rerun gives the same one."""
        self.path.mkdir(parents=True, exist_ok=True)
        if not scored:  # nothing to replay: whatever an earlier attempt left says nothing
            for stale in (self.optimizer_file, self.sources_file, self.path / "template.yaml",
                          self.path / "m2n2_gram.safetensors"):
                stale.unlink(missing_ok=True)
        else:
            self.check_same_config(config_text, template_text)
        for name, text in (("config.yaml", config_text), ("template.yaml", template_text)):
            if text is not None and not (scored and (self.path / name).is_file()):
                write_atomic(self.path / name, text)

    def check_same_config(self, config_text: str, template_text: str | None) -> None:
        """A folder with scored candidates takes only the config (and template) it was
        started with, comments and layout aside: its log replays against that search."""
        for name, text in (("config.yaml", config_text), ("template.yaml", template_text)):
            stored = self.path / name
            if text is not None and stored.is_file() and _parsed(stored.read_text()) != _parsed(text):
                raise EvomergeError(f"run folder {self.path} was started with a different {name} and has scored "
                                    "candidates; rerun with the config it was started with, or use a new --run-dir")

    def rows(self, file: Path) -> list[dict]:
        return read_jsonl(file, repair=not self.read_only)

    def append(self, file: Path, row: dict) -> None:
        with file.open("a") as handle:
            handle.write(json.dumps(row) + "\n")

    def write_json(self, name: str, data: Any) -> Path:
        return write_atomic(self.path / name, json.dumps(data, indent=2) + "\n")

    def in_use(self) -> bool:
        """Whether another invocation holds the folder now (`claimed`): the lock is tried
        and let go at once, and nothing is written."""
        import fcntl

        lock_file = self.path / ".lock"
        if not lock_file.is_file():
            return False
        with lock_file.open("r") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(lock, fcntl.LOCK_UN)
            return False

    def check_sources(self, stage: str, sources: dict[str, str | Path], logged: int) -> None:
        """Record the identity of a stage's source checkpoints (reference -> folder), and
        refuse to replay logged fitness measured on a source that has changed since (a
        replay checks genomes, which stay the same when a model under them is rewritten).
        A read-only folder checks without recording."""
        recorded = json.loads(self.sources_file.read_text()) if self.sources_file.is_file() else {}
        before = recorded.get(stage)
        if self.read_only and not (logged and before):  # nothing it could refuse: spare the hashing
            return
        now = {ref: checkpoint_hash(path) for ref, path in sources.items()}
        if before == now:
            return
        # compared in the stage's order, by content: the same models in other folders (a run
        # folder carried to a machine that rebuilt them) are the same sources
        if before is None:
            changed = []
        elif len(before) != len(now):
            changed = list(now)
        else:
            changed = [ref for ref, old in zip(now, before.values()) if now[ref] != old]
        if logged and changed:
            raise EvomergeError(
                f"{self.path}: the {stage} stage's {logged} logged candidates were scored with "
                f"{', '.join(changed)} as it was then, and it has been rewritten since (its files' contents differ: "
                "a model rebuilt with other bytes, e.g. a zoo built on another kind of machine, or ps/best when the "
                "PS stage of a ps+dfs run, extended with --max-evals, finds a new best), so their fitness cannot be "
                "replayed. Use a new --run-dir; to keep the new model, copy it out first and name it in the new config")
        if not self.read_only:
            recorded[stage] = now
            self.write_json(self.sources_file.name, recorded)


def _parsed(text: str) -> Any:
    """A config's content, so that a rerun may reformat or comment it."""
    return yaml.safe_load(text)
