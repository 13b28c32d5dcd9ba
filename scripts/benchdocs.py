"""Write a benchmark's results into docs/benchmarks.md, between marker comments.

Each benchmark owns one section, `<!-- NAME:start -->` ... `<!-- NAME:end -->`; a rerun
replaces its section and leaves the rest of the page (and the other benchmarks) alone.
"""
from __future__ import annotations

from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def update_section(name: str, heading: str, body: str, docs: Path = DOCS) -> None:
    """Replace section `name` with `body` (appended under `heading` the first time)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    section = f"{start}\n{body}\n{end}"
    text = docs.read_text() if docs.exists() else "# Benchmarks\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + f"\n\n## {heading}\n\n{section}\n"
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text(text)
