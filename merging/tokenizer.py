"""The output's tokenizer and chat template, decided before any tensor is computed.

A recipe's `tokenizer_source` / `tokenizer.source` names the model whose tokenizer the
output takes. mergekit then rebuilds every model's embedding and head rows in that
tokenizer's order; evomerge copies the tokenizer as it is, which gives the same tensors
exactly when every merged model has that vocabulary, token for token, and one embedding
row per token. Anything else needs vocabulary merging, refused here with the recipe line.

`chat_template` is resolved as mergekit resolves it: `auto` (the template most sources
share), a name (merging/chat_templates.py) or a Jinja template given literally. It is
written to chat_template.jinja, which transformers reads before tokenizer_config.json.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from merging.chat_templates import TEMPLATES, most_common_template
from merging.checkpoint import Checkpoint
from merging.errors import RecipeError
from merging.recipe import VOCABULARY_MERGE, Recipe

CHAT_TEMPLATE_FILE = "chat_template.jinja"


def tokenizer_model(recipe: Recipe, reference: str) -> str:
    """The model whose tokenizer files the output takes: the named one, else the base
    model, else `reference` (the config donor)."""
    source = recipe.tokenizer_model_source
    return recipe.base_model or reference if source in (None, "base") else source


def check_vocabularies(recipe: Recipe, checkpoints: dict[str, Checkpoint], source: str,
                       merged: list[str]) -> None:
    """When the recipe asks for a tokenizer source, every merged model must hold that
    tokenizer's vocabulary (same tokens, same ids) in as many embedding rows; then
    mergekit's row permutation is the identity and copying the tokenizer is exact."""
    if recipe.tokenizer_model_source is None:
        return
    vocabulary = _vocabulary(checkpoints[source])
    if vocabulary is None:
        raise RecipeError(f"{recipe.where('tokenizer')}: model {source!r} has no tokenizer that "
                          "transformers can load")
    for model in merged:
        theirs = vocabulary if model == source else _vocabulary(checkpoints[model])
        rows = checkpoints[model].config.get("vocab_size")
        if theirs is None:
            continue  # mergekit takes a model without a tokenizer to have the source's
        if theirs != vocabulary:
            missing = len(set(vocabulary) - set(theirs))
            moved = sum(1 for token, index in theirs.items() if vocabulary.get(token, index) != index)
            raise RecipeError(f"{recipe.where('tokenizer')}: model {model!r} has another vocabulary than "
                              f"{source!r} ({len(theirs)} vs {len(vocabulary)} tokens, {missing} missing, "
                              f"{moved} at other ids); {VOCABULARY_MERGE}")
        if rows is not None and rows != len(vocabulary):
            raise RecipeError(f"{recipe.where('tokenizer')}: model {model!r} has {rows} embedding rows for "
                              f"{len(vocabulary)} tokens; mergekit resizes them to the tokenizer, which "
                              "evomerge does not do yet (leave the tokenizer source out to keep the rows)")


def _vocabulary(checkpoint: Checkpoint) -> dict[str, int] | None:
    return _folder_vocabulary(str(checkpoint.path.resolve()))


@lru_cache(maxsize=16)
def _folder_vocabulary(folder: str) -> dict[str, int] | None:
    """A folder's vocabulary (token -> id), or None. Cached: an evolution run plans a
    merge per candidate from the same sources, and loading a tokenizer takes a second."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder).get_vocab()
    except Exception:  # no tokenizer files, or none transformers can read
        return None


def resolve_chat_template(recipe: Recipe, checkpoints: dict[str, Checkpoint], models: list[str]) -> str | None:
    """The template the output gets, or None to keep the copied tokenizer's own.
    `models`: those mergekit polls for `auto` (the recipe's models, in recipe order)."""
    value = recipe.chat_template
    if value is None:
        return None
    if value == "auto":
        return most_common_template([t for t in (source_chat_template(checkpoints[m].path) for m in models) if t])
    return TEMPLATES.get(value, value)


def source_chat_template(folder: Path) -> str | None:
    """A model folder's chat template as transformers loads it: chat_template.jinja wins
    over tokenizer_config.json; of named templates, the `default` one."""
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        return (folder / CHAT_TEMPLATE_FILE).read_text()
    config_file = folder / "tokenizer_config.json"
    try:
        template = json.loads(config_file.read_text()).get("chat_template") if config_file.is_file() else None
    except json.JSONDecodeError:
        return None
    if isinstance(template, list):
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def write_chat_template(out_dir: Path, template: str) -> None:
    """Write `template` where transformers reads it first, and remove the copied ones it
    would otherwise meet (tokenizer_config.json's entry, a processor's chat_template.json)."""
    (out_dir / CHAT_TEMPLATE_FILE).write_text(template)
    config_file = out_dir / "tokenizer_config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        if config.pop("chat_template", None) is not None:
            config_file.write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "chat_template.json").unlink(missing_ok=True)
