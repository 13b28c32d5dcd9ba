"""Shared fixtures: small real checkpoints built once per test session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama base and three fine-tune-like variants (float32, real tokenizer)."""
    from merging.synthetic import build_family

    return build_family(tmp_path_factory.mktemp("llama"), family="llama", variants=3, seed=0)


@pytest.fixture(scope="session")
def sharded_family(tmp_path_factory) -> dict[str, Path]:
    """Like llama_family but bfloat16 and split into several safetensors shards."""
    import torch

    from merging.synthetic import build_family

    return build_family(tmp_path_factory.mktemp("sharded"), family="llama", variants=1, seed=1,
                        dtype=torch.bfloat16, max_shard_size="100KB")


@pytest.fixture(scope="session")
def micro_zoo(tmp_path_factory) -> tuple[Path, dict]:
    """The micro zoo (about a minute on 2 cores), built once per session: its folder and manifest."""
    from evaluation.zoo import build_zoo

    out = tmp_path_factory.mktemp("zoo") / "micro"
    return out, build_zoo(out, size="micro", seed=0, progress=False)


def write_recipe(folder: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def resolved_parameters(recipe) -> dict[str, dict]:
    """Each output tensor's parameters as the engine resolves them for `recipe` (planning
    only: headers are read, no tensor is merged)."""
    from merging.engine import open_models, plan_merge

    plan = plan_merge(recipe, open_models(recipe))
    try:
        return {task.output.name: task.params for task in plan.tasks}
    finally:
        plan.close()
