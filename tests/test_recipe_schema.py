"""mergekit's YAML rules, its `tokenizer:` options and `chat_template`, as evomerge applies
them: what mergekit accepts runs (with a note where a user may not mean it), what it
refuses, or what evomerge cannot do yet, is refused before any tensor is computed."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from merging.chat_templates import TEMPLATES
from merging.errors import RecipeError, RecipeNote
from merging.recipe import parse_recipe
from tests.conftest import write_recipe

TWO = "merge_method: linear\nmodels:\n  - model: a\n  - model: b\n"


def test_a_key_given_twice_takes_the_last_value_with_a_note_naming_both_lines():
    with pytest.warns(RecipeNote, match=r"r\.yaml, line 3: key 'base_model' is given twice \(first on line 2\)"):
        recipe = parse_recipe("merge_method: ties\nbase_model: a\nbase_model: c\nmodels:\n  - model: b\n",
                              source="r.yaml")
    assert recipe.base_model == "c"


def test_keys_mergekit_ignores_are_ignored_with_a_note():
    text = "name: my-merge\n" + TWO.replace("  - model: b\n", "  - model: b\n    license: mit\n")
    with pytest.warns(RecipeNote) as notes:
        recipe = parse_recipe(text, source="r.yaml")
    messages = [str(n.message) for n in notes]
    assert any(m.startswith("r.yaml, line 1: name: key 'name'") and "ignored" in m for m in messages)
    assert any(m.startswith("r.yaml, line 6: models[1].license: key 'license'") for m in messages)
    assert [m.model for m in recipe.models] == ["a", "b"]


def test_parameters_a_method_does_not_take_are_ignored_with_a_note_as_mergekit_does():
    """Model-card recipes keep `normalize`, `int8_mask` or `density` from another method,
    or set a global parameter per model; mergekit 0.1.5 ignores them, and so do we."""
    text = ("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1, normalize: true}\n"
            "  - model: b\n    parameters: {weight: 2, density: 0.5}\nparameters: {int8_mask: true}\n")
    with pytest.warns(RecipeNote) as notes:
        recipe = parse_recipe(text, source="r.yaml")
    messages = [str(n.message) for n in notes]
    assert any(m.startswith("r.yaml, line 4: models[0].parameters.normalize: unknown parameter 'normalize'")
               and m.endswith("ignored, as mergekit does") for m in messages)
    assert any(m.startswith("r.yaml, line 6: models[1].parameters.density") for m in messages)
    assert any(m.startswith("r.yaml, line 7: parameters.int8_mask") for m in messages)
    assert recipe.models[0].parameters == {"weight": 1} and recipe.models[1].parameters == {"weight": 2}
    assert recipe.parameters == {}


def test_a_misspelt_parameter_is_refused_though_mergekit_would_ignore_it():
    with pytest.raises(RecipeError, match=r"line 4: .*unknown parameter 'wieght'; did you mean 'weight'.*"
                                          r"evomerge refuses a likely typo"):
        parse_recipe(TWO.replace("  - model: a\n", "  - model: a\n    parameters: {wieght: 1}\n"))


def test_residual_weight_is_ignored_with_a_note_as_it_does_nothing_in_mergekit():
    text = ("merge_method: passthrough\nslices:\n  - sources:\n      - {model: a, layer_range: [0, 2]}\n"
            "    residual_weight: 0.3\n")
    with pytest.warns(RecipeNote, match=r"r\.yaml, line 5: slices\[0\]\.residual_weight: .*no effect"):
        parse_recipe(text, source="r.yaml")


def test_a_misspelt_key_is_still_refused_not_ignored():
    with pytest.raises(RecipeError, match=r"line 5: .*unknown key 'paramters'; did you mean 'parameters'"):
        parse_recipe(TWO.replace("  - model: b\n", "  - model: b\n    paramters: {weight: 1}\n"))


@pytest.mark.parametrize("text, line, where", [
    (TWO + "  - model: a\n", 5, "`models:`"),
    ("merge_method: linear\nslices:\n  - sources:\n      - {model: a, layer_range: [0, 2]}\n"
     "      - {model: a, layer_range: [2, 4]}\n", 5, "this slice"),
])
def test_the_same_model_twice_in_one_merge_is_refused(text, line, where):
    with pytest.raises(RecipeError, match=rf"r\.yaml, line {line}: .*model 'a' is listed twice in {where}"):
        parse_recipe(text, source="r.yaml")


@pytest.mark.parametrize("extra, line, pattern", [
    ("tokenizer:\n  source: base\n  tokens:\n    <|im_start|>: {source: c}\n", 8, r"model 'c' is not merged"),
    ("tokenizer:\n  source: base\n  pad_to_multiple_of: 0\n", 7, r"pad_to_multiple_of` must be a positive"),
    ("tokenizer: {source: base}\ntokenizer_source: base\n", 5, r"not both"),
    ("chat_template: chatmI\n", 5, r"unknown chat template 'chatmI'; use one of auto, alpaca, chatml"),
    ("chat_template: '{{ x }}'\n", 5, r"too short to be a Jinja template"),
])
def test_unsupported_tokenizer_and_template_settings_name_their_line(extra, line, pattern):
    with pytest.raises(RecipeError, match=rf"r\.yaml, line {line}: .*{pattern}"):
        parse_recipe(TWO + extra, source="r.yaml")


def test_supported_tokenizer_settings_parse():
    assert parse_recipe(TWO + "tokenizer:\n  source: base\n").tokenizer_model_source == "base"
    assert parse_recipe(TWO + "tokenizer: {}\n").tokenizer_model_source == "union"  # mergekit's default
    recipe = parse_recipe(TWO + "tokenizer: {source: b}\nchat_template: llama3\n")
    assert recipe.tokenizer_model_source == "b" and "b" in recipe.referenced_models()


# --- against real model folders, through the CLI -----------------------------------------

def _merge(tmp_path: Path, text: str, *flags: str) -> subprocess.CompletedProcess:
    recipe = write_recipe(tmp_path, text)
    return subprocess.run([sys.executable, "-m", "evomerge", "merge", str(recipe), str(tmp_path / "out"),
                           "--no-progress", *flags], capture_output=True, text=True)


def _linear(a: Path, b: Path, extra: str = "") -> str:
    return f"merge_method: linear\nmodels:\n  - {{model: {a}, parameters: {{weight: 1.0}}}}\n" \
           f"  - {{model: {b}, parameters: {{weight: 1.0}}}}\n{extra}"


def _refused(result: subprocess.CompletedProcess, tmp_path: Path, pattern: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and re.search(pattern, result.stderr), result.stderr
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def _with_swapped_tokens(source: Path, folder: Path) -> Path:
    """A copy whose tokenizer gives two tokens each other's ids: same size, another vocabulary."""
    shutil.copytree(source, folder)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[300:302]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    return folder


def _with_an_extra_token(source: Path, folder: Path) -> Path:
    """A copy with one token more (`<|extra|>`, last id) and an embedding and head row for it."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    shutil.copytree(source, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens(["<|extra|>"])
    tokenizer.save_pretrained(folder)
    state = load_file(folder / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in state:
            state[name] = torch.cat([state[name], torch.full_like(state[name][:1], 0.25)])
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 1}))
    return folder


@pytest.mark.parametrize("form", ["tokenizer_source: union\n", "tokenizer: {}\n"])
def test_union_adds_the_tokens_only_one_model_has_with_that_models_row(llama_family, tmp_path, form):
    """The output vocabulary is the first model's plus `<|extra|>`; its row is the extra
    model's for every model (the only one that has it), so the linear merge keeps it."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    extra = _with_an_extra_token(llama_family["variant_2"], tmp_path / "extra")
    result = _merge(tmp_path, _linear(llama_family["variant_1"], extra, form))
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    size = json.loads((llama_family["variant_1"] / "config.json").read_text())["vocab_size"]
    assert json.loads((out / "config.json").read_text())["vocab_size"] == size + 1
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<|extra|>") == size
    merged, first, second = (load_file(f / "model.safetensors") for f in (out, llama_family["variant_1"], extra))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in merged:
            torch.testing.assert_close(merged[name][:size], (first[name] + second[name][:size]) / 2, rtol=0, atol=1e-6)
            assert torch.equal(merged[name][size], second[name][size])
    assert AutoModelForCausalLM_loads(out)


def AutoModelForCausalLM_loads(folder: Path) -> bool:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder) is not None


def test_a_tokenizer_source_rebuilds_the_rows_of_a_model_with_another_vocabulary(llama_family, tmp_path):
    """Two tokens swapped in the second model's tokenizer: its embedding and head rows are
    taken in the first model's (the source's) order before the linear merge, as mergekit does."""
    import torch
    from safetensors.torch import load_file

    other = _with_swapped_tokens(llama_family["variant_2"], tmp_path / "swapped")
    result = _merge(tmp_path, _linear(llama_family["variant_1"], other, "tokenizer:\n  source: base\n"))
    assert result.returncode == 0, result.stderr
    merged, first, second = (load_file(f / "model.safetensors") for f in (tmp_path / "out", llama_family["variant_1"], other))
    order = list(range(first["model.embed_tokens.weight"].shape[0]))
    order[300], order[301] = 301, 300
    vocabulary_indexed = [n for n in merged if n in ("model.embed_tokens.weight", "lm_head.weight")]
    assert vocabulary_indexed
    for name in merged:
        rows = second[name][order] if name in vocabulary_indexed else second[name]
        torch.testing.assert_close(merged[name], (first[name] + rows) / 2, rtol=0, atol=1e-6)
    assert not torch.equal(merged["model.embed_tokens.weight"], (first["model.embed_tokens.weight"] +
                                                                 second["model.embed_tokens.weight"]) / 2)


def test_pad_to_multiple_of_adds_rows_holding_the_mean_row(llama_family, tmp_path):
    import torch
    from safetensors.torch import load_file

    text = _linear(llama_family["variant_1"], llama_family["variant_2"], "tokenizer:\n  source: base\n"
                   "  pad_to_multiple_of: 100\n")
    result = _merge(tmp_path, text)
    assert result.returncode == 0, result.stderr
    size = json.loads((llama_family["variant_1"] / "config.json").read_text())["vocab_size"]
    padded = -(-size // 100) * 100
    assert padded > size and json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == padded
    merged, first, second = (load_file(f / "model.safetensors")
                             for f in (tmp_path / "out", llama_family["variant_1"], llama_family["variant_2"]))
    embed = merged["model.embed_tokens.weight"]
    assert embed.shape[0] == padded
    torch.testing.assert_close(embed[:size], (first["model.embed_tokens.weight"] + second["model.embed_tokens.weight"]) / 2,
                               rtol=0, atol=1e-6)
    mean = (first["model.embed_tokens.weight"].mean(0) + second["model.embed_tokens.weight"].mean(0)) / 2
    torch.testing.assert_close(embed[size:], mean.expand(padded - size, -1), rtol=0, atol=1e-6)


def test_rows_a_model_lacks_follow_mergekits_rules():
    """Token 0: all have it. 1: only b (its row for everyone). 2: a and the base c (c's).
    3: a and b, no base (their mean). 4: nobody (zeros)."""
    import torch

    from merging.tokenizer import Vocabulary

    vocabulary = Vocabulary(5, {"a": [0, -1, 1, 2, -1], "b": [0, 1, -1, 2, -1], "c": [0, -1, 1, -1, -1]}, 5)
    tensors = {m: torch.arange(6, dtype=torch.float32).reshape(3, 2) + 10 * i for i, m in enumerate("abc")}
    out = vocabulary.rows_for(["a", "b", "c"], "c").apply(tensors)
    b1, c1, mean3 = tensors["b"][1], tensors["c"][1], (tensors["a"][2] + tensors["b"][2]) / 2
    expected = {
        "a": [tensors["a"][0], b1, tensors["a"][1], tensors["a"][2], torch.zeros(2)],
        "b": [tensors["b"][0], b1, c1, tensors["b"][2], torch.zeros(2)],
        "c": [tensors["c"][0], b1, tensors["c"][1], mean3, torch.zeros(2)],
    }
    for model, rows in expected.items():
        torch.testing.assert_close(out[model], torch.stack(rows), rtol=0, atol=0)


def test_tokenizer_source_base_copies_the_base_tokenizer(llama_family, tmp_path):
    text = _linear(llama_family["variant_1"], llama_family["variant_2"], "tokenizer: {source: base}\n")
    result = _merge(tmp_path, text)
    assert result.returncode == 0, result.stderr
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (llama_family["variant_1"] / name).read_bytes()


def test_a_named_chat_template_is_written_where_transformers_reads_it_and_wins(llama_family, tmp_path):
    from transformers import AutoTokenizer

    source = tmp_path / "templated"
    shutil.copytree(llama_family["variant_1"], source)
    (source / "chat_template.jinja").write_text("{{ 'SOURCE' }}")
    result = _merge(tmp_path, _linear(source, llama_family["variant_2"], "chat_template: chatml\n"))
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    assert (out / "chat_template.jinja").read_text() == TEMPLATES["chatml"]
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())
    rendered = AutoTokenizer.from_pretrained(out).apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_without_a_recipe_template_the_source_template_file_is_kept(llama_family, tmp_path):
    source = tmp_path / "templated"
    shutil.copytree(llama_family["variant_1"], source)
    (source / "chat_template.jinja").write_text("{{ 'SOURCE' }}")
    assert _merge(tmp_path, _linear(source, llama_family["variant_2"])).returncode == 0
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == "{{ 'SOURCE' }}"


def test_auto_takes_the_template_most_sources_share(llama_family, tmp_path):
    """Two sources carry template X (one as chat_template.jinja, one in tokenizer_config.json),
    the base carries Y: auto picks X, although the output's tokenizer is the base's."""
    shared, other = "{% for m in messages %}{{ m.content }}|{% endfor %}", "{{ 'BASE ONLY TEMPLATE' }}"
    base, first, second = (tmp_path / n for n in ("base", "first", "second"))
    for folder, model in ((base, "base"), (first, "variant_1"), (second, "variant_2")):
        shutil.copytree(llama_family[model], folder)
    (base / "chat_template.jinja").write_text(other)
    (first / "chat_template.jinja").write_text(shared + "\n")
    config = json.loads((second / "tokenizer_config.json").read_text())
    (second / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": shared}))
    text = (f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
            f"  - {{model: {first}, parameters: {{weight: 0.5}}}}\n  - {{model: {second}, parameters: {{weight: 0.5}}}}\n"
            "chat_template: auto\n")
    result = _merge(tmp_path, text)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == shared


def test_notes_reach_the_user_and_the_merge_runs(llama_family, tmp_path):
    text = "name: demo\n" + _linear(llama_family["variant_1"], llama_family["variant_2"])
    result = _merge(tmp_path, text, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "evomerge: note: " in result.stderr and "line 1: name: key 'name'" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_parameter_set_outside_parameters_is_refused_not_ignored():
    """mergekit would drop `weight: 1` placed beside `model:` and merge without it."""
    with pytest.raises(RecipeError, match=r"line 5: models\[1\]\.weight: unknown key 'weight'; a merge parameter "
                                          r"goes under `parameters:`"):
        parse_recipe(TWO.replace("  - model: b\n", "  - model: b\n    weight: 1\n"))
