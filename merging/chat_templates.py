"""Chat templates a recipe's `chat_template:` may name, as mergekit names them.

mergekit ships these as data files under an LGPL licence; the texts here are evomerge's
own Jinja, written to render every conversation exactly as mergekit's files do under
transformers' template environment (trim_blocks, lstrip_blocks), quirks included (the
alpaca prompt puts `### Response:` right after the last message; exaone's indentation),
so that a recipe naming one gives mergekit's output. tests/test_chat_templates.py renders
both on the same conversations when mergekit is installed.
"""
from __future__ import annotations

from collections import Counter

TEMPLATES: dict[str, str] = {
    "alpaca": (
        "{%- set system = messages | selectattr('role', 'equalto', 'system') | list -%}"
        "{{- ((system | last).content | trim if system else '') + '\\n\\n' -}}"
        "{%- set headers = {'user': 'Instruction', 'assistant': 'Response', 'user_context': 'Input'} -%}"
        "{%- for message in messages -%}"
        "{%- if message.role in headers -%}"
        "{{- '### ' + headers[message.role] + ':\\n' + message.content | trim + ('' if loop.last else '\\n\\n') -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt and messages[-1].role != 'assistant' %}{{ '### Response:\\n' }}{% endif -%}"
    ),
    "chatml": (
        "{%- for message in messages -%}"
        "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif -%}"
    ),
    "exaone": (
        "{%- for message in messages -%}"
        "{%- if loop.first and message.role != 'system' %}{{ '        [|system|][|endofturn|]\\n\\n' }}{% endif -%}"
        "{{- '    [|' + message.role + '|]' + message.content + '\\n        ' -}}"
        "{{- '\\n\\n' if message.role == 'user' else '[|endofturn|]\\n\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt %}{{ '    [|assistant|]\\n' }}{% endif -%}"
    ),
    "llama3": (
        "{%- for message in messages -%}"
        "{{- (bos_token if loop.first else '') + '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n'"
        " + message.content | trim + '<|eot_id|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif -%}"
    ),
    "mistral": (
        "{%- set has_system = messages[0].role == 'system' -%}"
        "{%- set turns = messages[1:] if has_system else messages -%}"
        "{{- bos_token -}}"
        "{%- for message in turns -%}"
        "{%- if (message.role == 'user') != (loop.index0 % 2 == 0) -%}"
        "{{- raise_exception('After the optional system message, conversation roles must alternate "
        "user/assistant/user/assistant/...') -}}"
        "{%- elif message.role == 'user' -%}"
        "{{- ' [INST] ' + (messages[0].content + '\\n\\n' if has_system and loop.first else '')"
        " + message.content + ' [/INST]' -}}"
        "{%- elif message.role == 'assistant' -%}"
        "{{- ' ' + message.content + eos_token -}}"
        "{%- else -%}"
        "{{- raise_exception('Only user and assistant roles are supported, with the exception of an "
        "initial optional system message!') -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
    ),
}


def is_template_name(value: str) -> bool:
    """mergekit's test: a short single line without `{` is a name, not a template."""
    return len(value) < 256 and "\n" not in value and "{" not in value


def template_problem(value: str) -> str | None:
    """Why a recipe's `chat_template` value is unusable, or None: `auto`, a known name,
    or a Jinja template (mergekit refuses text under 20 characters or without `{`)."""
    if value == "auto" or value in TEMPLATES or not (is_template_name(value) or len(value) < 20):
        return None
    known = ", ".join(["auto", *TEMPLATES])
    if is_template_name(value):
        return f"unknown chat template {value!r}; use one of {known}, or a Jinja template"
    return f"chat template {value!r} is too short to be a Jinja template; use one of {known}"


def most_common_template(templates: list[str]) -> str | None:
    """`auto`: the template most sources share (stripped, as mergekit compares them); a
    tie goes to the first in recipe order (mergekit's order there is its set's, arbitrary)."""
    stripped = [t.strip() for t in templates if t and t.strip()]
    return Counter(stripped).most_common(1)[0][0] if stripped else None
