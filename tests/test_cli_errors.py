"""Every bad input of `evomerge merge`, as a user meets it: one message naming the model,
tensor or recipe line, exit status 2, no traceback, and no output folder left behind."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merging.engine import resolve_device
from merging.errors import EvomergeError
from tests.conftest import write_recipe

LINEAR = "merge_method: linear\nmodels:\n  - {{model: {a}, parameters: {{weight: 1.0}}}}\n" \
         "  - {{model: {b}, parameters: {{weight: 1.0}}}}\n"


def _copy_with(source: Path, folder: Path, edit) -> Path:
    shutil.copytree(source, folder)
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _truncate(source: Path, folder: Path) -> Path:
    shutil.copytree(source, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folder


def _pickled(source: Path, folder: Path) -> Path:
    folder.mkdir()
    shutil.copy(source / "config.json", folder)
    torch.save(load_file(source / "model.safetensors"), folder / "pytorch_model.bin")
    return folder


def _case(name: str, llama: dict[str, Path], tmp: Path) -> tuple[str, str]:
    """(recipe text, the pattern the message must contain) for one bad input."""
    a, b = llama["variant_1"], llama["variant_2"]
    if name == "shape mismatch":
        from merging.synthetic import build_family

        wide = build_family(tmp / "wide", variants=0, hidden_size=128)["base"]
        return LINEAR.format(a=a, b=wide), r"shape mismatch for tensor model\.embed_tokens\.weight"
    if name == "missing tensor":
        broken = _copy_with(b, tmp / "broken", lambda s: s.pop("model.layers.1.mlp.gate_proj.weight"))
        return LINEAR.format(a=a, b=broken), r"model\.layers\.1\.mlp\.gate_proj\.weight is missing in model '.*broken'"
    if name == "different architectures":
        from merging.synthetic import build_family

        gpt2 = build_family(tmp / "gpt2", family="gpt2", variants=0)["base"]
        return LINEAR.format(a=a, b=gpt2), r"different architectures"
    if name == "nan":
        poisoned = _copy_with(b, tmp / "poisoned",
                              lambda s: s["model.layers.3.mlp.up_proj.weight"].view(-1).__setitem__(0, float("nan")))
        return LINEAR.format(a=a, b=poisoned), r"poisoned'.*model\.layers\.3\.mlp\.up_proj\.weight.*NaN or Inf"
    if name == "truncated safetensors":
        return LINEAR.format(a=a, b=_truncate(b, tmp / "cut")), r"model '.*cut'.*model\.safetensors.*truncated"
    if name == "pickle":
        return LINEAR.format(a=a, b=_pickled(b, tmp / "pickled")), r"pickle.*--allow-pickle"
    if name == "bad yaml":
        return "merge_method: linear\nmodels:\n  - model: [unclosed\n", r"line \d+: invalid YAML"
    if name == "unknown method":
        return LINEAR.format(a=a, b=b).replace("linear", "magic"), r"line 1: .*unknown merge method 'magic'"
    if name == "unknown parameter":
        return LINEAR.format(a=a, b=b).replace("weight: 1.0}}\n  -", "weight: 1.0, wieght: 2}}\n  -", 1), \
            r"line 3: .*unknown parameter 'wieght'; did you mean 'weight'"
    raise AssertionError(name)


CASES = ["shape mismatch", "missing tensor", "different architectures", "nan", "truncated safetensors",
         "pickle", "bad yaml", "unknown method", "unknown parameter"]


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_one_clear_message_and_no_output(name, llama_family, tmp_path):
    text, pattern = _case(name, llama_family, tmp_path)
    recipe = write_recipe(tmp_path, text)
    result = subprocess.run([sys.executable, "-m", "evomerge", "merge", str(recipe), str(tmp_path / "out"),
                             "--no-progress"], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("evomerge: error: ")
    import re

    assert re.search(pattern, result.stderr), result.stderr
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_pickle_loads_with_the_flag(llama_family, tmp_path, capsys):
    from evomerge.cli import main

    pickled = _pickled(llama_family["variant_2"], tmp_path / "pickled")
    recipe = write_recipe(tmp_path, LINEAR.format(a=llama_family["variant_1"], b=pickled))
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--allow-pickle", "--no-progress"]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_unknown_devices_are_named():
    with pytest.raises(EvomergeError, match="device 'gpu' is not one torch knows"):
        resolve_device("gpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_auto_picks_the_gpu_when_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(EvomergeError, match="'cuda:3': this machine has 1 CUDA device"):
        resolve_device("cuda:3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


def test_a_dry_run_needs_no_gpu(llama_family, tmp_path, capsys):
    from evomerge.cli import main

    recipe = write_recipe(tmp_path, LINEAR.format(a=llama_family["variant_1"], b=llama_family["variant_2"]))
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--dry-run", "--device", "cuda:0"]) == 0
    assert "method: linear" in capsys.readouterr().out


def test_overwrite_never_replaces_the_current_folder_or_a_checkout(llama_family, tmp_path, monkeypatch, capsys):
    from evomerge.cli import main

    recipe = write_recipe(tmp_path, LINEAR.format(a=llama_family["variant_1"], b=llama_family["variant_2"]))
    monkeypatch.chdir(tmp_path)
    assert main(["merge", str(recipe), ".", "--overwrite", "--no-progress"]) == 2
    (tmp_path / "work" / ".git").mkdir(parents=True)
    assert main(["merge", str(recipe), str(tmp_path / "work"), "--overwrite", "--no-progress"]) == 2
    assert "refusing to --overwrite" in capsys.readouterr().err
    assert (tmp_path / "recipe.yaml").is_file() and (tmp_path / "work" / ".git").is_dir()


def test_the_card_of_a_random_merge_gives_its_seed(llama_family, tmp_path):
    from merging.engine import run_recipe

    text = (f"merge_method: dare_ties\nbase_model: {llama_family['base']}\nmodels:\n"
            f"  - {{model: {llama_family['variant_1']}, parameters: {{weight: 1.0, density: 0.5}}}}\n")
    out = run_recipe(write_recipe(tmp_path, text), tmp_path / "out", seed=7)
    assert "evomerge merge recipe.yaml OUT_DIR --seed 7" in (out / "README.md").read_text()


@pytest.mark.parametrize("flag, value", [("--limit", "-5"), ("--batch-size", "0"), ("--limit", "two")])
def test_eval_counts_must_be_positive_whole_numbers(flag, value, tmp_path):
    """`--limit -5` would score rows[:-5], `--batch-size 0` died in range()."""
    done = subprocess.run([sys.executable, "-m", "evomerge", "eval", str(tmp_path), "--task", "math", flag, value],
                          capture_output=True, text=True)
    assert done.returncode == 2 and f"argument {flag}:" in done.stderr and "Traceback" not in done.stderr
