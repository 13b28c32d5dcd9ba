"""The offline model zoo: a small Llama base and skill fine-tunes, trained on CPU from a seed.

A miniature of the setting of Sakana's evolutionary merging paper: a model that knows a
second language and a model that knows math, both fine-tuned from one base, are to be
merged into one that solves math problems asked in that language. See docs/zoo.md.
"""
import os
from pathlib import Path

ZOO_HOME = Path(os.environ.get("EVOMERGE_ZOO", Path.home() / ".cache" / "evomerge" / "zoo"))
"""Where `evomerge zoo build --size SIZE` writes (ZOO_HOME/SIZE) unless told otherwise."""

from evaluation.tasks import load_digits_split, zoo_tasks
from evaluation.zoo.build import SIZES, build_tokenizer, build_zoo, format_matrix
from evaluation.zoo.real import build_real_zoo


def find_zoo(zoo: str | Path, base_dir: Path = Path(".")) -> Path:
    """A zoo size name (micro, small, real: ZOO_HOME/SIZE) or a zoo folder (relative to
    `base_dir`) -> the folder, which must hold a built zoo (zoo.json)."""
    from merging.errors import EvomergeError

    if str(zoo) in (*SIZES, "real"):
        path, hint = ZOO_HOME / str(zoo), f"build it with `evomerge zoo build --size {zoo}`"
    else:
        path = Path(zoo).expanduser()
        path, hint = (path if path.is_absolute() else base_dir / path), "build one with `evomerge zoo build --out FOLDER`"
    if not (path / "zoo.json").is_file():
        raise EvomergeError(f"zoo {str(zoo)!r}: no zoo at {path}; {hint}")
    return path


__all__ = ["ZOO_HOME", "SIZES", "find_zoo", "build_tokenizer", "build_zoo", "build_real_zoo", "format_matrix", "zoo_tasks",
           "load_digits_split"]
