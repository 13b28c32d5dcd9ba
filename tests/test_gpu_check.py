"""scripts/gpu_check.sh as a session lent a GPU runs it: it stops early and clearly where it
cannot run, and on the CPU (DEVICE=cpu) it runs every step and writes its table."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def run_check(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "OUT": str(tmp_path / "out"), **env}, timeout=600)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the check runs here")
def test_without_cuda_it_stops_at_once_and_says_why(tmp_path):
    result = run_check(tmp_path)
    assert result.returncode == 3
    assert "sees no CUDA device" in result.stderr and "DEVICE=cpu" in result.stderr
    assert not (tmp_path / "out").exists()


def test_without_torch_or_with_a_wrong_argument_it_stops_and_says_why(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python3").write_text("#!/bin/sh\nexit 1\n")  # a python3 without torch
    (fake / "python3").chmod(0o755)
    result = run_check(tmp_path, PATH=f"{fake}:{os.environ['PATH']}")
    assert result.returncode == 3 and "has no torch" in result.stderr

    result = run_check(tmp_path, "--devcie", "cpu")
    assert result.returncode == 2 and "unknown argument --devcie" in result.stderr


@pytest.mark.slow
def test_on_the_cpu_every_step_runs_and_the_table_is_written(tmp_path, micro_zoo):
    zoo, _ = micro_zoo
    result = run_check(tmp_path, "--device", "cpu", ZOO_DIR=str(zoo), MAX_EVALS="10", LIMIT="20", EVAL_LIMIT="20")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    for step in ["environment", "merge", "eval-model", "eval-recipe", "evolve-serial", "evolve-pool-1",
                 "evolve-pool-2"]:
        assert rows[step].endswith("| ok |"), rows[step]
    for step in ["evolve-serial", "evolve-pool-1", "evolve-pool-2"]:
        candidates, per_minute = rows[step].split(" | ")[4:6]
        assert int(candidates) >= 10 and float(per_minute) > 0
    assert "evolve-pool-2" in result.stdout and "GPU check summary" in result.stdout
    assert (tmp_path / "out" / "gpu_check.log").exists()
