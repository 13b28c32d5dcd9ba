"""Layer structure derived from real configs of the families transformers ships."""
from __future__ import annotations

import pytest

from merging.architecture import detect_architecture, num_layers_key
from merging.checkpoint import Checkpoint
from merging.synthetic import TINY_CONFIGS, build_family

EXPECTED_PREFIX = {"llama": "model.layers", "mistral": "model.layers", "qwen2": "model.layers",
                   "gemma": "model.layers", "gemma2": "model.layers", "mistral-nemo": "model.layers",
                   "phi": "model.layers", "gpt2": "transformer.h",
                   "gpt_neox": "gpt_neox.layers"}


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: build_family(root / f, family=f, variants=0, seed=0)["base"] for f in TINY_CONFIGS}


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_every_tensor_is_classified(families, family):
    checkpoint = Checkpoint.open(str(families[family]))
    arch = detect_architecture(checkpoint.config)
    assert arch.layer_prefixes[0] == EXPECTED_PREFIX[family]
    assert arch.num_layers == 4
    positions = {name: arch.position(name) for name in checkpoint.tensors}
    layers = {arch.layer_of(n) for n, p in positions.items() if p == "layer"}
    assert layers == {0, 1, 2, 3}
    pre = {n for n, p in positions.items() if p == "pre"}
    post = {n for n, p in positions.items() if p == "post"}
    assert pre and all("emb" in n or "wte" in n or "wpe" in n or "embed_in" in n for n in pre)
    assert post and all("norm" in n or "ln_f" in n or "head" in n or "embed_out" in n for n in post)


def test_rename_layer_keeps_the_rest_of_the_name(families):
    arch = detect_architecture(Checkpoint.open(str(families["gpt2"])).config)
    assert arch.rename_layer("transformer.h.3.mlp.c_fc.weight", 12) == "transformer.h.12.mlp.c_fc.weight"
    assert arch.rename_layer("h.3.mlp.c_fc.weight", 0) == "h.0.mlp.c_fc.weight"  # prefix-less checkpoints
    assert arch.layer_of("transformer.h.10.attn.c_attn.weight") == 10
    assert arch.layer_of("transformer.wte.weight") is None


def test_depth_key_follows_the_config_class(families):
    assert num_layers_key(Checkpoint.open(str(families["gpt2"])).config) == "n_layer"
    assert num_layers_key(Checkpoint.open(str(families["llama"])).config) == "num_hidden_layers"


def test_a_detected_architecture_is_kept_on_disk_and_read_back_the_same(families, tmp_path, monkeypatch):
    """The meta model is built once per config and transformers version; later merges read
    the architecture from the cache (a damaged cache file is rebuilt, not trusted)."""
    import merging.architecture as architecture

    monkeypatch.setattr(architecture, "ARCHITECTURE_CACHE", tmp_path)
    config = Checkpoint.open(str(families["gpt2"])).config
    first = detect_architecture(config)
    [cached] = tmp_path.glob("*.json")
    built = []
    monkeypatch.setattr(architecture, "_detect", lambda *args: built.append(args) or first)
    assert detect_architecture(config) == first and not built
    cached.write_text("{not json")
    assert detect_architecture(config) == first and len(built) == 1
    other = dict(config, n_layer=2)
    detect_architecture(other)
    assert len(built) == 2 and len(list(tmp_path.glob("*.json"))) == 2
