"""evomerge against mergekit itself: every recipe of scripts/mergekit_recipes/.

Slow (two tools x every recipe there, several minutes) and needs mergekit in its own venv (see
docs/mergekit-compat.md), so it is marked slow and skipped where mergekit-yaml is absent;
the default suite never needs mergekit. MERGEKIT_YAML overrides the binary's path.
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


def test_evomerge_matches_mergekit(tmp_path: Path) -> None:
    """Deterministic recipes agree to float32 rounding, DARE recipes statistically."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "compare_mergekit.py"), "--work-dir", str(tmp_path),
         "--mergekit-bin", MERGEKIT],
        capture_output=True, text=True, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "| match |" in proc.stdout
