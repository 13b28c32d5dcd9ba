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

__all__ = ["ZOO_HOME", "SIZES", "build_tokenizer", "build_zoo", "build_real_zoo", "format_matrix", "zoo_tasks",
           "load_digits_split"]
