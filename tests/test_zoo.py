"""The offline zoo: a micro zoo built once per session (about a minute on 2 cores)."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from evaluation.zoo import build_tokenizer, format_matrix, load_digits_split, zoo_tasks
from evaluation.zoo import data

SKILLS = {"math": "math", "lang": "lang", "reverse": "reverse"}


@pytest.fixture(scope="session")
def zoo(micro_zoo) -> tuple[Path, dict]:
    return micro_zoo


def test_zoo_layout_and_manifest(zoo):
    out, manifest = zoo
    assert json.loads((out / "zoo.json").read_text()) == manifest
    assert set(manifest["models"]) == {"base", "math", "lang", "reverse"}
    assert set(manifest["tasks"]) == {"math", "lang", "reverse", "math_lang"}
    assert manifest["size"] == "micro" and manifest["seed"] == 0 and manifest["wall_time_s"] > 0
    assert not list(out.parent.glob(".micro.tmp-*")), "the staging folder must be renamed away"
    table = format_matrix(manifest)
    assert table.count("\n| ") == 5 and "math_lang" in table


def test_splits_do_not_overlap(zoo):
    out, manifest = zoo
    for name, task in zoo_tasks(out).items():
        prompts = {split: {r["prompt"] for r in replace(task, split=split).load()} for split in ("train", "dev", "test")}
        assert all(len(p) == manifest["tasks"][name]["n"][s] for s, p in prompts.items()), name
        assert not prompts["train"] & prompts["dev"] and not prompts["train"] & prompts["test"]
        assert not prompts["dev"] & prompts["test"]
        assert all({"prompt", "answer"} <= set(r) for r in task.load(5))


def test_math_lang_is_asked_in_lang(zoo):
    out, _ = zoo
    rows = zoo_tasks(out)["math_lang"].load()
    assert all("how many" not in r["prompt"] and r["answer"].isdigit() for r in rows)


def test_models_load_and_tokenizer_round_trips(zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, manifest = zoo
    for path in manifest["models"].values():
        model = AutoModelForCausalLM.from_pretrained(out / path)
        assert type(model).__name__ == "LlamaForCausalLM"
        assert (out / path / "generation_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(out / manifest["models"]["base"])
    text = "Q: tom has 3 apples. then tom buys 5 more.\nA: 8\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tokenizer.decode(ids) == text


def test_matrix_shows_specialization(zoo):
    _, manifest = zoo
    matrix = manifest["matrix"]
    for model, task in SKILLS.items():
        own, base = matrix[model][task], matrix["base"][task]
        assert own["n"] == 100
        assert own["mean"] - base["mean"] >= 0.1 and own["mean"] - base["mean"] > 2 * own["stderr"], (model, own, base)
    for model, row in matrix.items():
        assert row["math_lang"]["mean"] <= 0.15, (model, row["math_lang"])


def test_same_seed_same_data():
    counts = {"train": 50, "dev": 10, "test": 10}
    assert data.make_tasks(3, counts) == data.make_tasks(3, counts)
    assert data.make_tasks(3, counts) != data.make_tasks(4, counts)
    assert data.make_lang(3) == data.make_lang(3)


def test_tokenizer_round_trips_all_characters(tmp_path):
    from transformers import AutoTokenizer

    build_tokenizer().save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer.decode(tokenizer(data.ALPHABET, add_special_tokens=False)["input_ids"]) == data.ALPHABET


def test_digits_split():
    x_train, y_train, x_test, y_test = load_digits_split()
    assert x_train.shape == (1437, 64) and x_test.shape == (360, 64)
    assert y_train.shape == (1437,) and y_test.shape == (360,)
    assert float(x_train.min()) >= 0.0 and float(x_train.max()) <= 1.0
    assert set(y_train.tolist()) == set(range(10)) and set(y_test.tolist()) <= set(range(10))
