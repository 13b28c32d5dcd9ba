"""The named chat templates render every conversation exactly as mergekit's files do
(compared when mergekit is installed: `pip install --no-deps mergekit`), and the forms
every chat model of that family expects (always)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from transformers.utils.chat_template_utils import _compile_jinja_template

from merging.chat_templates import TEMPLATES, most_common_template

CONVERSATIONS = [
    [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi "},
     {"role": "assistant", "content": " Hello"}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
    [{"role": "user", "content": "Sum"}, {"role": "user_context", "content": "1 2"}],
    [{"role": "system", "content": "A"}, {"role": "system", "content": "B"}, {"role": "user", "content": "Hi"}],
    [{"role": "assistant", "content": "first"}, {"role": "user", "content": "x"}],
    [{"role": "user", "content": "Hi"}, {"role": "tool", "content": "T"}],
]


def _render(template: str, messages: list[dict], generation: bool) -> str:
    try:
        return _compile_jinja_template(template).render(messages=messages, add_generation_prompt=generation,
                                                         bos_token="<s>", eos_token="</s>")
    except Exception as exc:  # raise_exception in a template: compare the messages
        return f"error: {exc}"


@pytest.mark.skipif(importlib.util.find_spec("mergekit") is None, reason="mergekit is not installed")
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_renders_as_mergekits_template_file(name):
    folder = Path(importlib.util.find_spec("mergekit").submodule_search_locations[0]) / "_data" / "chat_templates"
    theirs = (folder / f"{name}.jinja").read_text()
    for messages in CONVERSATIONS:
        for generation in (False, True):
            assert _render(TEMPLATES[name], messages, generation) == _render(theirs, messages, generation)


@pytest.mark.parametrize("name, expected", [
    ("chatml", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>assistant\n"),
    ("llama3", "<s><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\n"
               "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>\n"
               "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    ("mistral", "<s> [INST] Hi [/INST] Hello</s>"),
    ("alpaca", "\n\n### Instruction:\nHi\n\n### Response:\nHello"),
])
def test_the_families_forms(name, expected):
    assert _render(TEMPLATES[name], CONVERSATIONS[1], True) == expected


def test_auto_compares_stripped_templates_and_breaks_ties_by_order():
    assert most_common_template(["X\n", "Y", "X"]) == "X"
    assert most_common_template(["Y", "X"]) == "Y"
    assert most_common_template([]) is None
