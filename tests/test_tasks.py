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
])
def test_extract_last_number(text, expected):
    assert extract_last_number(text) == expected


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
