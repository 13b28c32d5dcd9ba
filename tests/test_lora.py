"""`model+lora` sources (merging/lora.py): a real PEFT adapter, made offline with peft,
folded into its base gives peft's own `merge_and_unload` weights bit for bit, in float32
and in bfloat16 with tied embeddings; a recipe merges the folded model; adapters for
another model, and PEFT kinds that do not fold, are refused by name."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

peft = pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]


def make_adapter(base: Path, out: Path, *, targets: list[str], seed: int = 0, **settings) -> Path:
    """A LoRA adapter of `base` with random (non-zero) A and B, saved as peft saves it."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **settings)
    peft.get_peft_model(model, config).save_pretrained(out)
    return out


def peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """What mergekit folds: the base loaded by transformers, the adapter by peft, merged."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {name: tensor.detach() for name, tensor in merged.state_dict().items()}


def folded(reference: str, cache: Path, monkeypatch) -> dict[str, torch.Tensor]:
    import merging.lora
    from merging.checkpoint import resolve_model_path

    monkeypatch.setattr(merging.lora, "LORA_CACHE", cache)
    path = resolve_model_path(reference)
    assert path.parent == cache
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.mark.parametrize("dtype, tied", [(torch.float32, False), (torch.bfloat16, True)])
def test_a_folded_adapter_is_peft_merge_and_unload_bit_for_bit(dtype, tied, tmp_path, monkeypatch):
    from merging.synthetic import build_family

    family = build_family(tmp_path / "family", variants=0, dtype=dtype, tie_word_embeddings=tied)
    base = family["base"]
    targets = ["q_proj", "v_proj", "down_proj", "embed_tokens"]
    adapter = make_adapter(base, tmp_path / "adapter", targets=targets,
                           **({} if tied else {"modules_to_save": ["lm_head"], "use_rslora": True}))
    ours = folded(f"{base}+{adapter}", tmp_path / "cache", monkeypatch)
    theirs = peft_merged(base, adapter)
    original = load_file(base / "model.safetensors")
    assert set(ours) == set(original)
    changed = [name for name in ours if not torch.equal(ours[name], original[name])]
    assert any("q_proj" in n for n in changed) and any("embed_tokens" in n for n in changed)
    assert not tied or "lm_head.weight" not in ours  # a tied head stays the embedding
    for name, tensor in ours.items():
        assert tensor.dtype == dtype and torch.equal(tensor, theirs[name]), name


def test_a_recipe_merges_a_folded_source_and_a_foreign_adapter_is_refused(tmp_path):
    """`evomerge merge` with `model: BASE+ADAPTER` (a linear merge of weight 1 is the folded
    model); an adapter of a model with another width, or a DoRA adapter, stop before any
    output with the adapter named, exit 2."""
    from merging.synthetic import build_family

    base = build_family(tmp_path / "family", variants=0)["base"]
    other = build_family(tmp_path / "other", variants=0, hidden_size=32, intermediate_size=64)["base"]
    adapter = make_adapter(base, tmp_path / "adapter", targets=["q_proj"])
    foreign = make_adapter(other, tmp_path / "foreign", targets=["q_proj"])
    env = {"EVOMERGE_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}

    def merge(source: Path, name: str) -> subprocess.CompletedProcess:
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {base}+{source}\n    parameters: {{weight: 1.0}}\n")
        return subprocess.run([sys.executable, "-m", "evomerge", "merge", str(recipe), str(tmp_path / name),
                               "--no-progress"], capture_output=True, text=True, cwd=ROOT, env=env)

    done = merge(adapter, "merged")
    assert done.returncode == 0, done.stderr
    folded_dir = next((tmp_path / "cache" / "lora").iterdir())
    assert torch.equal(load_file(tmp_path / "merged" / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"],
                       load_file(folded_dir / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"])

    done = merge(foreign, "wrong")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"LoRA adapter {str(foreign)!r}" in done.stderr and "trained on another model" in done.stderr
    assert not (tmp_path / "wrong").exists()

    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    done = merge(adapter, "dora")
    assert done.returncode == 2 and "DoRA (use_dora) is not supported" in done.stderr
    assert not (tmp_path / "dora").exists()
