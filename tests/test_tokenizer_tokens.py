"""mergekit's `tokenizer.tokens:` overrides: where a token's embedding and head rows come
from (a model's row for it, another token's row, zeros; with `force` in every model), as
mergekit 0.1.5 applies them (mergekit/tokenizer/embed.py), and the bad input refused before
any tensor is computed. Checked against mergekit itself by scripts/compare_mergekit.py
(`tokenizer-*` recipes, tests/test_mergekit_compat.py)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from merging.errors import RecipeError
from merging.recipe import parse_recipe
from merging.tokenizer import TokenOverride, Vocabulary
from tests.conftest import write_recipe

TWO = "merge_method: linear\nmodels:\n  - model: a\n  - model: b\n"
EMBED = "model.embed_tokens.weight"


def _tensors() -> dict[str, torch.Tensor]:
    """float64 rows that tell every model's every row apart."""
    generator = torch.Generator().manual_seed(0)
    return {m: torch.randn(4, 3, generator=generator, dtype=torch.float64) for m in "abc"}


# --- the rows, against a float64 reference ---------------------------------------------

def test_overrides_set_the_rows_of_tokens_a_model_lacks_and_forced_tokens_in_every_model():
    """Tokens: 0 all have it, forced to zeros; 1 only b has it, from a's row 3 (model_token);
    2 a and c have it, from c (a model); 3 all have it, an override that is not forced
    changes nothing; 4 nobody has it (added by `tokens:`), zeros."""
    rows = {"a": [0, -1, 1, 2, -1], "b": [0, 1, -1, 3, -1], "c": [0, -1, 2, 1, -1]}
    overrides = {0: TokenOverride("t0", True), 1: TokenOverride("t1", False, "a", 3),
                 2: TokenOverride("t2", False, "c", 2), 3: TokenOverride("t3", False, "b", 3),
                 4: TokenOverride("t4", False)}
    tensors = _tensors()
    out = Vocabulary(5, rows, 5, overrides=overrides).rows_for(["a", "b", "c"], None).apply(tensors)
    zero = torch.zeros(3, dtype=torch.float64)
    a, b, c = tensors["a"], tensors["b"], tensors["c"]
    expected = {
        "a": [zero, a[3], a[1], a[2], zero],
        "b": [zero, b[1], c[2], b[3], zero],
        "c": [zero, a[3], c[2], c[1], zero],
    }
    for model, want in expected.items():
        assert out[model].dtype == torch.float64
        torch.testing.assert_close(out[model], torch.stack(want), rtol=0, atol=0)


def test_a_forced_model_row_replaces_every_models_row_and_padding_takes_the_mean_after():
    rows = {"a": [0, 1, 2], "b": [0, 2, 1]}
    tensors = {m: t[:3] for m, t in _tensors().items() if m in "ab"}
    out = Vocabulary(3, rows, 4, overrides={1: TokenOverride("t1", True, "b", 2)}).rows_for(["a", "b"], "a").apply(tensors)
    for model, tensor in tensors.items():
        want = torch.stack([tensor[0], tensors["b"][2], tensor[rows[model][2]]])
        torch.testing.assert_close(out[model], torch.cat([want, want.mean(0, keepdim=True)]), rtol=0, atol=0)


def test_a_row_that_cannot_be_had_is_an_error_only_where_it_is_needed():
    """mergekit fails only when it computes the row: a forced token or a model lacking it."""
    problem = TokenOverride("t1", False, "a", -1, problem="recipe, line 9: model 'a' has no token 't1'")
    complete = Vocabulary(2, {"a": [0, 1], "b": [0, 1]}, 2, overrides={1: problem})
    complete.rows_for(["a", "b"], None)
    lacking = Vocabulary(2, {"a": [0, -1], "b": [0, 1]}, 2, overrides={1: problem})
    with pytest.raises(RecipeError, match="line 9: model 'a' has no token 't1'"):
        lacking.rows_for(["a", "b"], None)
    elsewhere = Vocabulary(2, {"a": [0, -1], "b": [0, 1], "c": [0, 1]}, 2,
                           overrides={1: TokenOverride("t1", False, "c", 1)})
    with pytest.raises(RecipeError, match="comes from model 'c', which this tensor does not merge"):
        elsewhere.rows_for(["a", "b"], None)


# --- the schema ---------------------------------------------------------------------------

def test_the_forms_mergekit_accepts_parse():
    recipe = parse_recipe(TWO + "tokenizer:\n  source: base\n  tokens:\n"
                          "    x: {source: a, force: true}\n"
                          "    y: {source: {kind: zero}}\n"
                          "    z: {source: {kind: model_token, model: b, token: q}}\n"
                          "    w: {source: {kind: model_token, model: b, token_id: 7}}\n"
                          "    v: {}\n")
    tokens = recipe.token_overrides
    assert tokens["x"].source == "a" and tokens["x"].force
    assert tokens["y"].source.kind == "zero" and tokens["z"].source.token == "q" and tokens["w"].source.token_id == 7
    assert tokens["v"].source is None and not tokens["v"].force


@pytest.mark.parametrize("entry, line, pattern", [
    ("x: {source: {kind: mean}}", 8, r"tokenizer\.tokens\.x\.source: a token's `source` is a model name"),
    ("x: {source: c}", 8, r"tokenizer\.tokens\.x\.source: model 'c' is not merged by this recipe"),
    ("x: {source: {kind: model_token, model: c, token: q}}", 8, r"source\.model: model 'c' is not merged"),
    ("x: {source: {kind: model_token, model: a}}", 8, r"give `token` or `token_id`"),
    ("x: {source: {kind: model_token, model: a, token: q, token_id: 1}}", 8, r"give `token` or `token_id`"),
    ("x: {source: {kind: model_token, model: a, token_id: -1}}", 8, r"`token_id` must be 0 or more"),
    ("x: {force: true}", 8, r"tokens\.x\.force: `force` needs a `source`"),
    ("x: {source: a, forse: true}", 8, r"unknown key 'forse'; did you mean 'force'"),
])
def test_bad_token_entries_name_their_line(entry, line, pattern):
    with pytest.raises(RecipeError, match=rf"r\.yaml, line {line}: .*{pattern}"):
        parse_recipe(TWO + f"tokenizer:\n  source: base\n  tokens:\n    {entry}\n", source="r.yaml")


# --- end to end ---------------------------------------------------------------------------

def _merge(tmp_path: Path, text: str, *flags: str) -> subprocess.CompletedProcess:
    recipe = write_recipe(tmp_path, text)
    return subprocess.run([sys.executable, "-m", "evomerge", "merge", str(recipe), str(tmp_path / "out"),
                           "--no-progress", *flags], capture_output=True, text=True)


def _ties(family: dict[str, Path], tokenizer: str) -> str:
    return (f"merge_method: task_arithmetic\nbase_model: {family['base']}\nmodels:\n"
            f"  - {{model: {family['variant_1']}, parameters: {{weight: 0.5}}}}\n"
            f"  - {{model: {family['variant_2']}, parameters: {{weight: 0.5}}}}\n{tokenizer}")


def test_tokens_add_a_token_and_set_rows_in_the_checkpoint(llama_family, tmp_path):
    """`<|new|>` is added to the base's tokenizer with variant_1's row of `Ġfox`; `Ġdog` is
    forced to zeros; `source: base` gives what naming the base model gives (mergekit 0.1.5
    fails on `source: base` with a token to add, KeyError: docs/mergekit-compat.md)."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    tokens = ("  tokens:\n"
              f"    \"<|new|>\": {{source: {{kind: model_token, model: {llama_family['variant_1']}, token: \"Ġfox\"}}}}\n"
              "    \"Ġdog\": {source: {kind: zero}, force: true}\n")
    result = _merge(tmp_path, _ties(llama_family, "tokenizer:\n  source: base\n" + tokens))
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    tokenizer = AutoTokenizer.from_pretrained(out)
    size = json.loads((llama_family["base"] / "config.json").read_text())["vocab_size"]
    assert tokenizer.convert_tokens_to_ids("<|new|>") == size and len(tokenizer) == size + 1
    assert json.loads((out / "config.json").read_text())["vocab_size"] == size + 1
    merged = load_file(out / "model.safetensors")
    source = load_file(llama_family["variant_1"] / "model.safetensors")
    fox, dog = (AutoTokenizer.from_pretrained(llama_family["variant_1"]).convert_tokens_to_ids(t) for t in ("Ġfox", "Ġdog"))
    for name in (EMBED, "lm_head.weight"):
        # every model gets variant_1's Ġfox row for <|new|>: the merge of equal rows keeps it
        torch.testing.assert_close(merged[name][size], source[name][fox], rtol=0, atol=1e-6)
        assert torch.equal(merged[name][dog], torch.zeros_like(merged[name][dog]))
    (tmp_path / "named").mkdir()
    named = _merge(tmp_path / "named", _ties(llama_family, f"tokenizer:\n  source: {llama_family['base']}\n" + tokens))
    assert named.returncode == 0, named.stderr
    again = load_file(tmp_path / "named" / "out" / "model.safetensors")
    assert all(torch.equal(merged[n], again[n]) for n in merged)


LACKING = ('"<|new|>": {{source: {{kind: model_token, model: {v1}, token: "<|nope|>"}}}}',
           r"tokenizer\.tokens\.<\|new\|>: the tokenizer of model '.*variant_1' has no token '<\|nope\|>'")


@pytest.mark.parametrize("entry, pattern, flags", [
    (*LACKING, ["--dry-run"]),
    (*LACKING, []),
    ('"<|new|>": {{source: {{kind: model_token, model: {v1}, token_id: 100000}}}}',
     r"tokenizer\.tokens\.<\|new\|>: model '.*variant_1' has \d+ embedding rows, so no row 100000", ["--dry-run"]),
    ('"<|new|>": {{source: {v1}}}', r"model '.*variant_1' has no token '<\|new\|>' to take its row from", ["--dry-run"]),
    ('"<|new|>": {{}}', r"some model lacks token '<\|new\|>', so it needs a `source`", ["--dry-run"]),
    ('"<|new|>": {{source: {{kind: avg}}}}', r"a token's `source` is a model name", ["--dry-run"]),
])
def test_bad_tokens_are_refused_before_any_tensor_and_by_dry_run(llama_family, tmp_path, entry, pattern, flags):
    text = _ties(llama_family, "tokenizer:\n  source: base\n  tokens:\n    "
                 + entry.format(v1=llama_family["variant_1"]) + "\n")
    result = _merge(tmp_path, text, *flags)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and re.search(pattern, result.stderr), result.stderr
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_a_dry_run_says_which_tokens_are_set(llama_family, tmp_path):
    text = _ties(llama_family, "tokenizer:\n  source: base\n  tokens:\n    \"Ġdog\": {source: {kind: zero}, force: true}\n")
    result = _merge(tmp_path, text, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "1 token(s) set by `tokens:`" in result.stdout + result.stderr
