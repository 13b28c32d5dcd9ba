"""Scorers on hand-written cases: answer extraction is where fitness silently goes wrong."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from evaluation.tasks import Task, TaskResult, cut_at_stop, extract_last_number


@pytest.mark.parametrize("text,expected", [
    ("The answer is 42.", "42"),
    ("1,234 apples", "1234"),
    ("costs $1,234.50 total", "1234.5"),
    ("she owes -7 dollars", "-7"),
    ("\u22123 degrees", "-3"),          # unicode minus
    ("3.0", "3"),
    ("from 5 to 12", "12"),             # the last number counts
    ("#### 18", "18"),                  # GSM8K's answer marker
    ("x = .5", "0.5"),
    ("no digits here", None),
    ("", None),
    ("Step 1. add. Step 2.", "2"),
    ("+5 more", "5"),                   # a leading plus is ignored
    ("5-3", "3"),                       # a hyphen after a digit joins, it is no minus sign
    ("pages 10-12", "12"),
    ("x-4", "4"),                       # nor after a letter
    ("答えは-5です", "-5"),              # Japanese has no spaces: a sign after kana stays
    ("１，２３４", "1234"),              # full-width digits and comma
    ("1，234", "1234"),
    ("－７", "-7"),                     # full-width minus
    ("12 m²", "12"),                    # a superscript is no digit of its own
    ("12345678901234567891", "12345678901234567891"),  # exact beyond float precision
    ("0.10", "0.1"),
])
def test_extract_last_number(text, expected):
    assert extract_last_number(text) == expected


def test_numbers_compare_exactly_beyond_float_precision(tmp_path):
    task = Task("t", "generate", str(tmp_path / "x.jsonl"))
    assert task.score_generation({"answer": "12345678901234567890"}, "12345678901234567891") == 0.0
    assert task.score_generation({"answer": "12345678901234567890"}, "12,345,678,901,234,567,890") == 1.0
    assert task.score_generation({"answer": 1234}, "答えは１，２３４です") == 1.0
    long = "9" * 5000  # longer than int() converts, longer than Decimal's default 28 digits
    assert extract_last_number(f"{long}1 vs {long}.50") == f"{long}.5"
    assert task.score_generation({"answer": long + "1"}, long + "2") == 0.0
    assert extract_last_number("-0.00") == "0"


def test_cut_at_stop_takes_the_earliest_stop():
    assert cut_at_stop("12\nQ: next", ["\n", "Q:"]) == "12"
    assert cut_at_stop("12 Q:\n", ["\n", "Q:"]) == "12 "
    assert cut_at_stop("no stop", ["\n"]) == "no stop"


def test_generation_scores_compare_normalised_numbers(tmp_path):
    task = Task("t", "generate", str(tmp_path / "x.jsonl"))
    assert task.score_generation({"answer": "1,000"}, " 1000\nmore") == 1.0
    assert task.score_generation({"answer": 18}, "She has 18.\n") == 1.0
    assert task.score_generation({"answer": "Janet...\n#### 18"}, "18") == 1.0  # GSM8K references
    assert task.score_generation({"answer": "18"}, "\n18") == 0.0          # cut at the first newline
    assert task.score_generation({"answer": "18"}, "about 19") == 0.0
    exact = Task("t", "generate", "x", extract="exact")
    assert exact.score_generation({"answer": "blue"}, " blue \n") == 1.0
    assert exact.score_generation({"answer": "blue"}, "blue sky") == 0.0


def test_fewshot_prompts_and_loading(tmp_path):
    data = tmp_path / "test.jsonl"
    data.write_text("\n".join(json.dumps({"q": f"{i}+1?", "answer": i + 1}) for i in range(5)))
    task = Task("t", "generate", str(tmp_path / "{split}.jsonl"), template="Q: {q}\nA: ",
                fewshot=[{"q": "1+1?", "answer": 2}])
    rows = task.load(limit=3)
    assert len(rows) == 3
    assert task.prompt(rows[0]) == "Q: 1+1?\nA: 2\n\nQ: 0+1?\nA: "


def test_missing_data_names_the_task(tmp_path):
    from merging.errors import EvomergeError

    with pytest.raises(EvomergeError, match="task 'gone'.*not found"):
        Task("gone", "generate", str(tmp_path / "none.jsonl")).load()


def test_result_mean_and_standard_error():
    result = TaskResult("t", [1.0, 0.0, 1.0, 1.0])
    assert result.mean == 0.75
    assert result.stderr == pytest.approx((0.25 / 4) ** 0.5)
    assert result.to_dict()["n"] == 4


def test_digits_classification_scores_every_test_example():
    from merging.errors import EvomergeError
    """A real classifier (ridge regression on one-hot labels, fitted on the train split) is
    scored per example on the held-out 20%; an untrained one is near chance."""
    from evaluation.scoring import evaluate
    from evaluation.tasks import BUILTIN_TASKS

    task = BUILTIN_TASKS["digits"]
    train = dataclasses.replace(task, split="train").load()
    test = task.load()
    assert len(train) == 1437 and len(test) == 360  # 80/20 of 1797, in a fixed order
    x = torch.stack([e["features"] for e in train])
    y = torch.nn.functional.one_hot(torch.tensor([e["label"] for e in train]), 10).float()
    linear = torch.nn.Linear(64, 10)
    with torch.no_grad():
        design = torch.cat([x, torch.ones(len(x), 1)], 1).double()
        solution = torch.linalg.solve(design.T @ design + 1e-2 * torch.eye(65, dtype=torch.float64),
                                      design.T @ y.double()).float()  # ridge regression
        linear.weight.copy_(solution[:64].T)
        linear.bias.copy_(solution[64])
    result = evaluate(linear, None, task)
    assert len(result.scores) == 360 and set(result.scores) <= {0.0, 1.0}
    expected = (linear(torch.stack([e["features"] for e in test])).argmax(-1)
                == torch.tensor([e["label"] for e in test])).float().mean().item()
    assert result.mean == pytest.approx(expected) and result.mean > 0.85
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    assert evaluate(linear, None, task).mean < 0.2
    with pytest.raises(EvomergeError, match="splits train and test"):
        dataclasses.replace(task, split="dev").load()


def test_result_table_and_json_without_a_standard_error():
    """One example has no standard error: the table says n/a, the JSON null (NaN is not JSON)."""
    from evaluation.tasks import format_results

    one = TaskResult("t", [1.0])
    table = format_results([Task("t", "generate", "x.jsonl")], {"t": one})
    assert table.splitlines()[1].split() == ["t", "test", "1", "1.0000", "n/a"]
    assert "nan" not in table
    assert json.loads(json.dumps(one.to_dict()))["stderr"] is None
    assert TaskResult("t", [1.0, 0.0]).to_dict()["stderr"] == pytest.approx(0.5)


MGSM_TSV = (
    "Janet has 3 apples and buys 4 more. How many?\t7\n"
    "\n"  # a blank line is no row
    '"A ""quoted"" question,\twith a tab inside"\t1,234\n'
    "ジャネットのアヒルは1日に16個の卵を産みます。\t18\n"
)


def test_parse_mgsm_tsv_reads_quotes_tabs_and_thousands(tmp_path):
    from evaluation.tasks import parse_mgsm_tsv

    path = tmp_path / "mgsm_ja.tsv"
    path.write_text(MGSM_TSV, encoding="utf-8")
    rows = parse_mgsm_tsv(path)
    assert rows == [
        {"question": "Janet has 3 apples and buys 4 more. How many?", "answer_number": 7},
        {"question": 'A "quoted" question,\twith a tab inside', "answer_number": 1234},
        {"question": "ジャネットのアヒルは1日に16個の卵を産みます。", "answer_number": 18},
    ]
    path.write_text("a question without an answer\n", encoding="utf-8")
    from merging.errors import EvomergeError

    with pytest.raises(EvomergeError, match="mgsm_ja.tsv: row 1"):
        parse_mgsm_tsv(path)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face Hub cache, offline: what a machine without a network sees."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_mgsm_tasks_read_the_tsv_from_the_hub_cache(hub_cache):
    """The file as `hf_hub_download` stored it (a snapshot under refs/main) is read offline."""
    from evaluation.tasks import BUILTIN_TASKS

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub_cache / "datasets--juletxara--mgsm"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "mgsm_ja.tsv").write_text(MGSM_TSV, encoding="utf-8")
    task = BUILTIN_TASKS["mgsm_ja"]
    rows = task.load(limit=2)
    assert [r["answer_number"] for r in rows] == [7, 1234]
    assert task.prompt(rows[0]) == "問題：Janet has 3 apples and buys 4 more. How many?\nステップごとの答え："
    assert task.score_generation(rows[1], " 1000と234で1,234です。\n\n\n問題：次") == 1.0
    assert task.score_generation(rows[1], " 答えは1234\n問題: 次は99") == 1.0  # half-width stop too
    assert len(BUILTIN_TASKS["mgsm_ja_evollm"].load()) == 3
    assert task.fingerprint() == BUILTIN_TASKS["mgsm_ja_evollm"].fingerprint()  # the same file


def test_mgsm_without_the_file_cached_names_task_and_file(hub_cache):
    from evaluation.tasks import BUILTIN_TASKS
    from merging.errors import EvomergeError

    with pytest.raises(EvomergeError, match="task 'mgsm_en': cannot fetch mgsm_en.tsv of the dataset juletxara/mgsm"):
        BUILTIN_TASKS["mgsm_en"].load()
    with pytest.raises(EvomergeError, match="task 'mgsm_ja'.*test split; there is no 'train' split"):
        dataclasses.replace(BUILTIN_TASKS["mgsm_ja"], split="train").load()


def test_hf_tasks_load_a_local_dataset_folder(tmp_path, monkeypatch):
    """`datasets.load_dataset` for real, on a folder of JSONL files (no Hub needed)."""
    datasets = pytest.importorskip("datasets")
    from evaluation.tasks import _load_hf
    from merging.errors import EvomergeError

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    folder = tmp_path / "sums"
    folder.mkdir()
    (folder / "test.jsonl").write_text("\n".join(json.dumps({"question": f"{i}+1?", "answer": f"#### {i + 1}"})
                                                 for i in range(3)))
    task = Task("sums", "generate", f"hf:{folder}", template="{question}")
    rows = task.load()
    assert rows == [{"question": f"{i}+1?", "answer": f"#### {i + 1}"} for i in range(3)]
    assert task.score_generation(rows[2], "3") == 1.0
    before = task.fingerprint()
    assert task.fingerprint() == before
    (folder / "test.jsonl").write_text(json.dumps({"question": "9+1?", "answer": "#### 10"}))
    assert task.fingerprint() != before
    with pytest.raises(EvomergeError, match="task 'sums': cannot load dataset .*split 'train'"):
        _load_hf("sums", str(folder), "train")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(EvomergeError, match="task 'gsm8k': cannot load dataset 'no-such-org/no-such-data'"):
        _load_hf("gsm8k", "no-such-org/no-such-data:main", "test")


def test_hf_tasks_without_datasets_say_what_to_install(monkeypatch):
    import sys

    from evaluation.tasks import _load_hf
    from merging.errors import EvomergeError

    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(EvomergeError, match=r"task 'gsm8k' reads the dataset 'openai/gsm8k'.*evomerge\[datasets\]"):
        _load_hf("gsm8k", "openai/gsm8k:main", "test")


def test_the_fingerprint_follows_the_content_of_the_data(tmp_path):
    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    task = Task("t", "generate", str(tmp_path / "{split}.jsonl"))
    before = task.fingerprint()
    data.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")  # rewritten, same bytes
    assert task.fingerprint() == before
    data.write_text(json.dumps({"prompt": "1+2=", "answer": "3"}) + "\n")
    assert task.fingerprint() != before
    from merging.errors import EvomergeError

    with pytest.raises(EvomergeError, match="task 't': data file .*dev.jsonl not found"):
        dataclasses.replace(task, split="dev").fingerprint()


def test_tasks_do_not_import_the_zoo():
    """Layers inside evaluation: the zoo uses tasks, tasks never import the zoo (digits included)."""
    import subprocess
    import sys

    code = ("import sys, evaluation.tasks as tasks; tasks.resolve_task('digits').load(3); "
            "print(sorted(m for m in sys.modules if m.startswith('evaluation.zoo')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_zoo_task_specs_are_tasks(tmp_path):
    from evaluation.tasks import task_from_spec, zoo_tasks

    (tmp_path / "zoo.json").write_text(json.dumps({"tasks": {"math": {"extract": "last_number", "max_new_tokens": 4},
                                                             "ppl": {"kind": "perplexity", "bos": True}}}))
    tasks = zoo_tasks(tmp_path)
    assert tasks["math"] == task_from_spec("math", {"extract": "last_number", "max_new_tokens": 4}, tmp_path)
    assert tasks["math"].data == str(tmp_path / "data" / "math" / "{split}.jsonl") and tasks["math"].max_new_tokens == 4
    assert tasks["ppl"].kind == "perplexity" and tasks["ppl"].bos and tasks["math"].bos is None
