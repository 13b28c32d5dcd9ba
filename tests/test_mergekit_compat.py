"""evomerge against mergekit itself: the recipes of scripts/mergekit_recipes/ on tiny models
of several architecture families, from float32 and bfloat16 sources.

Slow (two tools x dozens of recipes, minutes per case) and needs mergekit in its own venv
(see docs/mergekit-compat.md), so it is marked slow and skipped where mergekit-yaml is
absent; the default suite never needs mergekit. MERGEKIT_YAML overrides the binary's path.
The Llama case runs every recipe; the other cases run the `*_sliced` recipes, one per
method, each with two slices, self_attn/mlp filters, gradients and the method's own
parameters (the full matrix, every recipe on every family, is in docs/mergekit-compat.md).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MERGEKIT = os.environ.get("MERGEKIT_YAML", "/opt/mergekit-venv/bin/mergekit-yaml")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(MERGEKIT).exists(), reason=f"mergekit-yaml not found at {MERGEKIT}"),
]

EVERY_METHOD = ["--only", "*_sliced"]

CASES = [
    pytest.param("llama", "float32", [], id="llama-float32-all"),
    pytest.param("llama", "bfloat16", EVERY_METHOD, id="llama-bfloat16"),
    pytest.param("qwen2", "float32", EVERY_METHOD, id="qwen2-float32"),
    pytest.param("qwen2", "bfloat16", EVERY_METHOD, id="qwen2-bfloat16"),
    pytest.param("gemma2", "float32", EVERY_METHOD, id="gemma2-tied-float32"),
    pytest.param("gemma2", "bfloat16", EVERY_METHOD, id="gemma2-tied-bfloat16"),
    pytest.param("mistral-nemo", "float32", EVERY_METHOD, id="mistral-nemo-float32"),
    pytest.param("mistral-nemo", "bfloat16", EVERY_METHOD, id="mistral-nemo-bfloat16"),
]


@pytest.mark.parametrize("family,source_dtype,only", CASES)
def test_evomerge_matches_mergekit(tmp_path: Path, family: str, source_dtype: str, only: list[str]) -> None:
    """Deterministic recipes agree to float32 rounding, DARE/DELLA recipes statistically."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "compare_mergekit.py"), "--work-dir", str(tmp_path),
         "--mergekit-bin", MERGEKIT, "--family", family, "--source-dtype", source_dtype, *only],
        capture_output=True, text=True, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "| match |" in proc.stdout
    assert "statistics agree" in proc.stdout


@pytest.mark.parametrize("models", [[], ["--family", "gemma", "--tied", "--source-dtype", "bfloat16"]],
                         ids=["llama-float32", "gemma-tied-bfloat16"])
def test_vocabularies_and_token_overrides_match_mergekit(tmp_path: Path, models: list[str]) -> None:
    """The `tokenizer-*` recipes, on models whose tokenizers differ: the same output
    tokens at the same ids, and every tensor bit for bit (float32 compute)."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "compare_mergekit.py"), "--work-dir", str(tmp_path),
         "--mergekit-bin", MERGEKIT, "--only", "tokenizer-*", "--details", *models],
        capture_output=True, text=True, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| tokenizer-")]
    assert len(rows) >= 5 and all(line.endswith("| 0.00e+00 | match |") for line in rows), proc.stdout
    assert proc.stdout.count("the same in both; 0 at other ids") == len(rows), proc.stdout
