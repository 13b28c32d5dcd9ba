"""`evomerge` as a user runs it: help texts, exit codes, dry runs, real merges."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evomerge.cli import main
from tests.conftest import write_recipe

RECIPE = """\
merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters: {{density: 0.5, weight: 0.5}}
  - model: {b}
    parameters: {{density: 0.5, weight: 0.5}}
dtype: float32
"""


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "evomerge", *args], capture_output=True, text=True)


def test_help_explains_the_commands():
    top = run_cli("--help")
    assert top.returncode == 0 and "merge" in top.stdout
    merge = run_cli("merge", "--help")
    assert merge.returncode == 0
    for flag in ("--dry-run", "--device", "--overwrite", "--allow-pickle", "--seed", "--out-shard-size",
                 "--threads"):
        assert flag in merge.stdout


def test_console_script_is_installed():
    assert shutil.which("evomerge"), "pip install -e . should install the evomerge command"


@pytest.fixture
def recipe(llama_family, tmp_path):
    return write_recipe(tmp_path, RECIPE.format(base=llama_family["base"], a=llama_family["variant_1"],
                                                b=llama_family["variant_2"]))


def test_dry_run_prints_the_plan_and_writes_nothing(recipe, tmp_path, capsys):
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "method: ties" in printed
    assert "model.layers.0.mlp.up_proj.weight [128, 64] float32" in printed
    assert "density=[0.5,0.5]" in printed
    assert re.search(r"expected peak memory: about \d+\.\d\d GiB on a CPU with 2 threads", printed)
    assert not (tmp_path / "out").exists()
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--dry-run", "--threads", "1"]) == 0
    assert "with 1 thread (--threads)" in capsys.readouterr().out


def test_merge_writes_and_refuses_to_overwrite(recipe, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["merge", str(recipe), str(out), "--no-progress"]) == 0
    assert (out / "model.safetensors").is_file()
    assert main(["merge", str(recipe), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["merge", str(recipe), str(out), "--overwrite", "--no-progress"]) == 0


def test_bad_recipe_exits_non_zero_with_the_line(tmp_path):
    recipe = write_recipe(tmp_path, "merge_method: ties\nbase_model: a\nmodels:\n  - model: b\n    weight: 1\n")
    result = run_cli("merge", str(recipe), str(tmp_path / "out"))
    assert result.returncode == 2
    assert "line 5" in result.stderr and "unknown key 'weight'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_missing_recipe_file(tmp_path):
    result = run_cli("merge", str(tmp_path / "nope.yaml"), str(tmp_path / "out"))
    assert result.returncode == 2 and "cannot read recipe" in result.stderr


def test_cuda_without_a_gpu_is_a_clear_error(recipe, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = run_cli("merge", str(recipe), str(tmp_path / "out"), "--device", "cuda")
    assert result.returncode == 2 and "no CUDA device" in result.stderr


def test_every_shipped_demo_recipe_runs(tmp_path, monkeypatch):
    """recipes/demo-*.yaml as the README runs them: from the repository root, on demo models."""
    from pathlib import Path

    from merging.synthetic import build_family

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    build_family(tmp_path / "demo" / "models", family="llama", variants=2, seed=0)
    # demo-evolve*.yaml are the demo's evolution config and its template, not recipes
    recipes = sorted(p for p in (root / "recipes").glob("demo-*.yaml") if not p.stem.startswith("demo-evolve"))
    assert len(recipes) >= 4
    for recipe in recipes:
        out = tmp_path / "merged" / recipe.stem
        assert main(["merge", str(recipe), str(out), "--no-progress"]) == 0, recipe.name
        assert (out / "model.safetensors").is_file()


def _jsonl_task(tmp_path):
    import json

    path = tmp_path / "sums.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"{i} plus 1 is", "answer": i + 1}) for i in range(4)))
    return path


def test_eval_scores_a_checkpoint_and_writes_per_example_results(llama_family, tmp_path, capsys):
    import json

    task = _jsonl_task(tmp_path)
    out = tmp_path / "results.json"
    assert main(["eval", str(llama_family["base"]), "--task", str(task), "--device", "cpu",
                 "--output", str(out), "--limit", "3"]) == 0
    printed = capsys.readouterr().out
    assert "sums" in printed and "mean" in printed
    results = json.loads(out.read_text())
    assert len(results["tasks"]["sums"]["scores"]) == 3


def test_eval_scores_a_recipe_without_writing_a_checkpoint(recipe, tmp_path, capsys):
    task = _jsonl_task(tmp_path)
    cache = tmp_path / "cache.jsonl"
    assert main(["eval", str(recipe), "--task", str(task), "--device", "cpu", "--cache", str(cache)]) == 0
    assert cache.is_file() and len(cache.read_text().splitlines()) == 1
    assert not [p for p in tmp_path.iterdir() if (p / "model.safetensors").exists()]


def test_eval_unknown_task_is_a_clear_error(llama_family, capsys):
    assert main(["eval", str(llama_family["base"]), "--task", "nonesuch", "--device", "cpu"]) == 2
    assert "unknown task 'nonesuch'" in capsys.readouterr().err


def test_eval_help_explains_tasks_and_flags():
    result = run_cli("eval", "--help")
    assert result.returncode == 0, result.stderr
    for flag in ("--task", "--split", "--limit", "--zoo", "--device", "--batch-size", "--cache", "--output",
                 "--lm-eval-include"):
        assert flag in result.stdout
    for task in ("mgsm_ja", "gsm8k", ".jsonl", "lm_eval:TASK"):
        assert task in result.stdout


def test_zoo_build_help_explains_sizes_and_flags():
    result = run_cli("zoo", "build", "--help")
    assert result.returncode == 0, result.stderr
    for text in ("--size", "micro", "small", "real", "--out", "--seed", "--overwrite", "zoo.json"):
        assert text in result.stdout


# --- the dispatcher and the layers ---------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def _modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running `code` (from the repository root)."""
    result = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


@pytest.mark.parametrize("argv", [["--help"], ["eval", "--help"], ["zoo", "build", "--help"], ["evolve", "--help"]])
def test_help_imports_no_torch(argv):
    """`evomerge --help` answers at once: building the parser imports no torch (3.9 s)."""
    modules = _modules_after("import contextlib, io\nfrom evomerge.cli import main\n"
                             "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
                             f"    main({argv!r})")
    assert "evomerge.cli" in modules and "torch" not in modules and "transformers" not in modules


def test_merge_help_lists_the_methods_from_the_registry():
    result = run_cli("merge", "--help")
    from merging.operators import METHODS

    assert result.returncode == 0
    for name in METHODS:
        assert f"  {name} " in result.stdout
    assert "141 stdout closed early" in result.stdout


def _layer_modules(package: str) -> list[str]:
    import importlib
    import pkgutil

    root = importlib.import_module(package)
    return [package] + [m.name for m in pkgutil.walk_packages(root.__path__, f"{package}.")
                        if not m.name.endswith("__main__")]


@pytest.mark.parametrize("layer, above", [("merging", ("evaluation", "niches", "evomerge")),
                                          ("evaluation", ("niches", "evomerge")),
                                          ("niches", ("evomerge",))])
def test_no_module_imports_a_layer_above_it(layer, above):
    """merging <- evaluation <- niches <- evomerge (the dispatcher): import every module of a
    layer in a fresh interpreter; no module of a layer above may have come along."""
    modules = _layer_modules(layer)
    loaded = _modules_after("\n".join(f"import {name}" for name in modules))
    assert set(modules) <= loaded
    intruders = sorted(m for m in loaded if m.split(".")[0] in above)
    assert not intruders, f"{layer} imports {intruders}"


# --- a closed stdout is not an error ---------------------------------------------------------

def test_a_closed_stdout_ends_quietly(recipe, tmp_path):
    """The reader of stdout is gone before the first line is written: the command stops
    without a word on stderr, with 141 (a Unix tool killed by SIGPIPE), not 2."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    result = subprocess.run([sys.executable, "-m", "evomerge", "merge", str(recipe), str(tmp_path / "out"),
                             "--dry-run"], stdout=write_end, stderr=subprocess.PIPE, text=True)
    os.close(write_end)
    assert result.returncode == 141, result.stderr
    assert result.stderr == ""


def test_a_dry_run_piped_into_head(recipe, tmp_path):
    """What the demo did: `evomerge merge ... --dry-run | head -n 3` under pipefail."""
    evomerge = shlex.join([sys.executable, "-m", "evomerge", "merge", str(recipe), str(tmp_path / "out")])
    command = f"set -o pipefail; {evomerge} --dry-run | head -n 3"
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True)
    assert result.stdout.splitlines()[0] == "method: ties" and len(result.stdout.splitlines()) == 3
    assert result.returncode in (0, 141) and result.stderr == ""


# --- zoo: model names, the recipe beside the checkpoint --------------------------------------

ZOO_RECIPE = """\
merge_method: task_arithmetic
base_model: zoo:base
models:
  - model: zoo:lang
    parameters: {weight: 1.0}
  - model: zoo:math
    parameters: {weight: 1.0}
dtype: float32
"""


def test_zoo_models_in_merge_and_eval(micro_zoo, tmp_path):
    zoo_dir, _ = micro_zoo
    recipe = write_recipe(tmp_path, ZOO_RECIPE)
    env = {**os.environ, "EVOMERGE_ZOO": str(zoo_dir.parent)}  # so that `--zoo micro` is this zoo
    out = tmp_path / "merged"
    merge = subprocess.run([sys.executable, "-m", "evomerge", "merge", str(recipe), str(out), "--zoo", "micro",
                            "--no-progress"], capture_output=True, text=True, env=env)
    assert merge.returncode == 0, merge.stderr
    card = (out / "README.md").read_text()
    assert "base_model: zoo:base" in card and "- model: zoo:lang" in card and "--zoo ZOO" in card
    assert "Loading weights" not in merge.stderr and "Writing model shards" not in merge.stderr
    evaluate = subprocess.run([sys.executable, "-m", "evomerge", "eval", str(recipe), "--zoo", str(zoo_dir),
                               "--task", "math", "--limit", "3", "--device", "cpu"],
                              capture_output=True, text=True, env=env)
    assert evaluate.returncode == 0, evaluate.stderr
    assert "math" in evaluate.stdout and "Loading weights" not in evaluate.stderr
    single = subprocess.run([sys.executable, "-m", "evomerge", "eval", "zoo:math", "--zoo", "micro",
                             "--task", "math", "--limit", "3", "--device", "cpu"], capture_output=True, text=True, env=env)
    assert single.returncode == 0, single.stderr


def test_zoo_models_without_zoo_say_to_pass_it(tmp_path, capsys):
    recipe = write_recipe(tmp_path, ZOO_RECIPE)
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--dry-run"]) == 2
    assert "model 'zoo:base' is a zoo model: say which zoo with --zoo" in capsys.readouterr().err


def test_an_unbuilt_zoo_says_how_to_build_it(tmp_path, capsys):
    recipe = write_recipe(tmp_path, ZOO_RECIPE)
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--dry-run", "--zoo", str(tmp_path / "none")]) == 2
    assert "no zoo at" in capsys.readouterr().err


def test_the_recipe_is_written_beside_the_checkpoint_and_remakes_it(recipe, tmp_path):
    from safetensors.torch import load_file

    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["merge", str(recipe), str(first), "--no-progress"]) == 0
    assert "evomerge merge recipe.yaml OUT_DIR" in (first / "README.md").read_text()
    assert main(["merge", str(first / "recipe.yaml"), str(second), "--no-progress"]) == 0
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


# --- Ctrl-C during evolve -------------------------------------------------------------------

def test_ctrl_c_during_evolve_says_what_was_kept_and_how_to_resume(micro_zoo, tmp_path):
    """The demo's own config, interrupted once candidates are logged: the message counts
    the logged candidates and gives the command that resumes the run."""
    config, run_dir = ROOT / "recipes" / "demo-evolve.yaml", tmp_path / "run"
    command = [sys.executable, "-m", "evomerge", "evolve", str(config), "--run-dir", str(run_dir), "--no-progress"]
    # Ctrl-C is the default action again in the child: a test run started in the background by a
    # shell ignores SIGINT, and a Python started with SIGINT ignored keeps ignoring it
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "EVOMERGE_ZOO": str(micro_zoo[0].parent)},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    log = run_dir / "candidates.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and len(log.read_text().splitlines() if log.exists() else []) < 3:
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    logged = len(log.read_text().splitlines())
    assert process.returncode == 130, stderr
    assert "no output was written" not in stderr and "Traceback" not in stderr
    assert f"{logged} scored candidate(s) are kept in {log}" in stderr
    assert f"evomerge evolve {config} --run-dir {run_dir} --no-progress" in stderr
    assert all(json.loads(line) for line in log.read_text().splitlines())


# --- set-up scripts -------------------------------------------------------------------------

FAKE_PYTHON = """\
#!/usr/bin/env bash
echo "$*" >> "$CALLS"
case "$*" in
  *sys.executable*) echo /fake/python ;;
  *"import evomerge"*) echo "$INSTALLED_AT" ;;
  *"import torch"*) exit "${NO_TORCH:-0}" ;;
esac
"""


def test_setup_installs_what_is_asked_and_skips_what_is_current(tmp_path):
    """setup.sh against a stand-in python that records its calls: the demo's core install,
    the tests' dev install, nothing when current, again when pyproject.toml changes or
    evomerge imports from elsewhere, and torch only when none is present."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "setup.sh", repo / "scripts")
    shutil.copy(ROOT / "pyproject.toml", repo)
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    calls = tmp_path / "calls"

    def pip_calls(*args: str, **env: str) -> list[str]:
        calls.write_text("")
        result = subprocess.run(["bash", str(repo / "scripts" / "setup.sh"), *args], capture_output=True, text=True,
                                env={**os.environ, "PYTHON": str(python), "CALLS": str(calls),
                                     "INSTALLED_AT": str(repo), **env})
        assert result.returncode == 0, result.stderr
        return [line for line in calls.read_text().splitlines() if line.startswith("-m pip")]

    assert pip_calls() == ["-m pip install --quiet -e ."]
    assert pip_calls() == []
    assert pip_calls("dev") == ["-m pip install --quiet -e .[dev]"]
    assert pip_calls("dev") == [] and pip_calls() == []  # dev holds the core
    with open(repo / "pyproject.toml", "a") as file:
        file.write("\n# changed\n")
    assert pip_calls("dev") == ["-m pip install --quiet -e .[dev]"]
    assert pip_calls("dev", INSTALLED_AT="/elsewhere") == ["-m pip install --quiet -e .[dev]"]
    (repo / ".cache").rename(tmp_path / "stamps")
    assert pip_calls(NO_TORCH="1") == ["-m pip install --quiet torch==2.13.0", "-m pip install --quiet -e ."]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "```bash\nbash scripts/test.sh\n```" in readme
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("\nbash scripts/test.sh")


def test_the_small_zoo_reproduction_prints_measured_facts_only():
    """Its table carries the machine's measured core count and load, no run path of the
    machine that made it, and the command anyone can run."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from reproduce_evollm_small import METHODS, table

    score = {"mean": 0.1, "stderr": 0.01, "n": 300}
    report = {"scores": {m: {t: score for t in ("math_lang", "math", "lang")}
                         for m in ("evolved", "zoo:lang", "/somewhere/models/math")}}
    stage = {"evaluations": 200, "best_fitness": 0.125}
    results = {name: {"report": report, "stages": {"ps": stage}} for name in METHODS}
    text = table(results, {name: 100.0 for name in METHODS}, 0.5, "2 cores, load average 1.0", {name: 0 for name in METHODS})
    assert "2 cores, load average 1.0" in text and "busy" not in text and "/somewhere" not in text
    assert "| math |" in text and "--runs runs --write-docs" in text
