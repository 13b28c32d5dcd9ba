"""The output's tokenizer and chat template, decided before any tensor is computed.

A recipe's `tokenizer_source` / `tokenizer.source` names the tokenizer the output takes:
a model's (its files are copied) or `union` (the base's plus the tokens only other
models have, saved through transformers). mergekit then rebuilds every model's embedding
and head rows in that tokenizer's order, and so does evomerge (`Vocabulary`), before the
merge; when nothing would change, the rows are read as they are. `tokenizer.tokens`
names the row of single tokens (`TokenOverride`) and adds the tokens the output lacks.
The harness scores candidates with the same tokenizer files (`write_tokenizer_files`).

`chat_template` is resolved as mergekit resolves it: `auto` (the template most sources
share), a name (merging/chat_templates.py) or a Jinja template given literally. It is
written to chat_template.jinja, which transformers reads before tokenizer_config.json.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from merging.chat_templates import TEMPLATES, most_common_template
from merging.checkpoint import Checkpoint, copy_tokenizer
from merging.errors import RecipeError
from merging.recipe import Recipe, TokenEmbedding, ZeroToken

if TYPE_CHECKING:
    from merging.engine import MergePlan

CHAT_TEMPLATE_FILE = "chat_template.jinja"


def tokenizer_model(recipe: Recipe, reference: str) -> str:
    """The model whose tokenizer files the output takes: the named one, else the base
    model, else `reference` (the config donor); for `union`, the one the union starts from."""
    source = recipe.tokenizer_model_source
    return recipe.base_model or reference if source in (None, "base", "union") else source


@dataclass(frozen=True)
class TokenOverride:
    """An entry of the recipe's `tokenizer.tokens`, resolved against the models: the row a
    token gets where a model lacks it (every model's row with `force`): `model`'s row `row`,
    or zeros (model None). `problem`: why it cannot be had (a token the model's tokenizer
    lacks, ...), raised only when the row is needed, as mergekit fails only then."""

    token: str
    force: bool
    model: str | None = None
    row: int = -1
    problem: str | None = None


@dataclass
class VocabularyRows:
    """For one vocabulary-indexed tensor (embeddings, head): the output's row count, each
    model's row for every output token (-1 where it lacks the token), and the rows averaged
    for a token some model lacks (mergekit's `PermutedVocabulary`: the row `tokens:` names,
    else the one model that has it, else the base's row, else the mean over the models that
    have it; none: zeros). `forced` tokens get that row in every model."""

    size: int
    index: dict[str, list[int]]
    fill: dict[int, list[tuple[str, int]]]
    padded: int = 0
    """Rows in all (`pad_to_multiple_of`); those past `size` get the mean of the others."""
    forced: frozenset[int] = frozenset()
    dtype: torch.dtype | None = None
    """What the rows are computed in (`Vocabulary.dtype`)."""

    def apply(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each model's rows rebuilt in the output vocabulary's order, in `dtype` (else
        float32, or the inputs' dtype if wider) and mergekit's order of summation."""
        first = next(iter(tensors.values()))
        dtype = torch.float32
        for tensor in tensors.values():
            dtype = torch.promote_types(dtype, tensor.dtype)
        dtype = self.dtype or dtype
        tensors = {m: t.to(dtype) for m, t in tensors.items()}
        defaults = {}
        for token, pairs in self.fill.items():
            if len(pairs) == 1:
                defaults[token] = tensors[pairs[0][0]][pairs[0][1]]
                continue
            row = torch.zeros(first.shape[1:], dtype=dtype, device=first.device)
            for model, source_row in pairs:
                row = row + tensors[model][source_row]
            defaults[token] = row / len(pairs) if pairs else row
        forced = torch.zeros(self.size, dtype=torch.bool, device=first.device)
        forced[list(self.forced)] = True
        result = {}
        for model, tensor in tensors.items():
            index = torch.tensor(self.index[model], device=tensor.device)
            out = torch.zeros((max(self.size, self.padded), *tensor.shape[1:]), dtype=dtype, device=tensor.device)
            present = (index >= 0) & ~forced
            out[:self.size][present] = tensor[index[present]]
            for token in torch.nonzero(~present).flatten().tolist():
                out[token] = defaults[token]
            if self.padded > self.size:  # as mergekit: https://nlp.stanford.edu/~johnhew/vocab-expansion.html
                out[self.size:] = torch.mean(out[:self.size], dim=0)
            result[model] = out
        return result


@dataclass
class Vocabulary:
    """The output vocabulary (the tokenizer source's, plus the tokens `tokens:` adds) and
    every merged model's row for each of its tokens (-1: the model lacks the token)."""

    size: int
    rows: dict[str, list[int]]
    padded: int
    """The output's rows: `size` rounded up to `pad_to_multiple_of`."""
    tokenizer: Any = None
    """The tokenizer built (transformers) when it is not a source's (`union`, or tokens
    added by `tokens:`), which the output saves; else None (the source's files are copied)."""
    overrides: dict[int, TokenOverride] = field(default_factory=dict)
    """`tokenizer.tokens` by output token id."""
    union: bool = False
    dtype: torch.dtype | None = None
    """What rows are averaged in: the recipe's `dtype` when it is float32 or float64, as
    mergekit reads its inputs in it; else float32 (evomerge computes in float32 where
    mergekit would round to 16 bits), or the inputs' dtype if wider."""

    def rows_for(self, models: list[str], base: str | None) -> VocabularyRows:
        """The rows of one tensor merged from `models` (a slice's sources, in order)."""
        fill: dict[int, list[tuple[str, int]]] = {}
        forced = set()
        for token in range(self.size):
            override = self.overrides.get(token)
            having = [(m, self.rows[m][token]) for m in models if self.rows[m][token] >= 0]
            if len(having) == len(models) and not (override and override.force):
                continue
            if override is not None:
                fill[token] = _override_rows(override, models)
                if override.force:
                    forced.add(token)
                continue
            if len(having) > 1 and base in models and self.rows[base][token] >= 0:
                having = [(base, self.rows[base][token])]
            fill[token] = having
        return VocabularyRows(self.size, {m: self.rows[m] for m in models}, fill, self.padded, frozenset(forced),
                              self.dtype)


def _override_rows(override: TokenOverride, models: list[str]) -> list[tuple[str, int]]:
    """The row `tokens:` names for a token, as a fill list (empty: zeros)."""
    if override.problem:
        raise RecipeError(override.problem)
    if override.model is None:
        return []
    if override.model not in models:
        raise RecipeError(f"the row of token {override.token!r} comes from model {override.model!r}, which "
                          f"this tensor does not merge ({', '.join(models)}); mergekit fails on it too")
    return [(override.model, override.row)]


def plan_vocabulary(recipe: Recipe, checkpoints: dict[str, Checkpoint], source: str,
                    merged: list[str], base: str) -> Vocabulary | None:
    """When the recipe names a tokenizer source, the output takes that tokenizer (plus the
    tokens of `tokens:` it lacks) and every merged model's embedding and head rows are
    rebuilt in its order, as mergekit does (mergekit/tokenizer/build.py, embed.py). None
    when nothing changes: no source named, or every model has the source's vocabulary in
    as many rows and `tokens:` sets nothing (then the tensors are copied as is).
    `base`: whose vocabulary a model without a tokenizer is taken to have (mergekit's)."""
    if recipe.tokenizer_model_source is None:
        return None
    tokenizer = None
    if recipe.tokenizer_model_source == "union":
        tokenizer = union_tokenizer(recipe, checkpoints, base, merged)
        vocabulary = tokenizer.get_vocab()
    else:
        vocabulary = _vocabulary(checkpoints[source])
        if vocabulary is not None and any(token not in vocabulary for token in recipe.token_overrides):
            tokenizer = _load_tokenizer(checkpoints[source])
    if vocabulary is None:
        raise RecipeError(f"{recipe.where('tokenizer')}: model {source!r} has no tokenizer that "
                          "transformers can load")
    if tokenizer is not None:  # mergekit adds every token of `tokens:` the output lacks
        for token in recipe.token_overrides:
            if token not in tokenizer.get_vocab():
                tokenizer.add_tokens(token)
        vocabulary = tokenizer.get_vocab()
    size = len(vocabulary)
    if sorted(vocabulary.values()) != list(range(size)):
        raise RecipeError(f"{recipe.where('tokenizer')}: the tokenizer of {source!r} does not number its "
                          f"{size} tokens 0..{size - 1}")
    if recipe.tokenizer_model_source != "union":
        own = len(_vocabulary(checkpoints[source]))
        source_rows = checkpoints[source].config.get("vocab_size", own)
        if source_rows < own:
            raise RecipeError(f"{recipe.where('tokenizer')}: the tokenizer of {source!r} has {own} tokens for "
                              f"{source_rows} embedding rows; mergekit drops the extra tokens, which evomerge "
                              "does not do yet")
    by_id = sorted(vocabulary, key=vocabulary.get)
    rows: dict[str, list[int]] = {}
    for model in merged:
        theirs = _model_vocabulary(checkpoints, model, base) or vocabulary
        limit = checkpoints[model].config.get("vocab_size", len(theirs))
        rows[model] = [theirs[token] if theirs.get(token, limit) < limit else -1 for token in by_id]
    overrides = {vocabulary[token]: _resolve_override(recipe, token, entry, checkpoints, rows, vocabulary[token], base)
                 for token, entry in recipe.token_overrides.items()}
    multiple = recipe.tokenizer.pad_to_multiple_of if recipe.tokenizer else None
    padded = -(-size // multiple) * multiple if multiple else size
    identity = list(range(size))
    if tokenizer is None and not overrides and padded == size and all(
            rows[m] == identity and checkpoints[m].config.get("vocab_size", size) == size for m in merged):
        return None
    dtype = {"float32": torch.float32, "float64": torch.float64}.get(recipe.dtype or "")
    return Vocabulary(size, rows, padded, tokenizer, overrides, union=recipe.tokenizer_model_source == "union",
                      dtype=dtype)


def _resolve_override(recipe: Recipe, token: str, entry: TokenEmbedding, checkpoints: dict[str, Checkpoint],
                      rows: dict[str, list[int]], token_id: int, base: str) -> TokenOverride:
    """A `tokens:` entry as the row it names (mergekit's compute_default_embedding)."""
    where = recipe.where(f"tokens.{token}")
    source = entry.source
    if source is None:
        return TokenOverride(token, entry.force, problem=f"{where}: some model lacks token {token!r}, so it "
                                                         "needs a `source` (mergekit fails without one)")
    if isinstance(source, ZeroToken):
        return TokenOverride(token, entry.force)
    if isinstance(source, str):
        row = rows[source][token_id]
        problem = None if row >= 0 else f"{where}: model {source!r} has no token {token!r} to take its row from"
        return TokenOverride(token, entry.force, source, row, problem)
    model, row, problem = source.model, source.token_id, None
    limit = checkpoints[model].config.get("vocab_size")
    if source.token is not None:
        theirs = _model_vocabulary(checkpoints, model, base)
        row = -1 if theirs is None else theirs.get(source.token, -1)
        if row < 0:
            problem = f"{where}: the tokenizer of model {model!r} has no token {source.token!r}"
    if problem is None and limit is not None and row >= limit:
        problem = f"{where}: model {model!r} has {limit} embedding rows, so no row {row}"
    return TokenOverride(token, entry.force, model, row, problem)


def _model_vocabulary(checkpoints: dict[str, Checkpoint], model: str, base: str) -> dict[str, int] | None:
    """A model's vocabulary; mergekit takes a model without a tokenizer to have the base's."""
    return _vocabulary(checkpoints[model]) or _vocabulary(checkpoints[base])


def _load_tokenizer(checkpoint: Checkpoint) -> Any:
    """A fresh transformers tokenizer of a model (to add tokens to: never the cached one)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint.path)


def union_tokenizer(recipe: Recipe, checkpoints: dict[str, Checkpoint], base: str, merged: list[str]) -> Any:
    """mergekit's union vocabulary (build_union_tokenizer): the base's tokenizer, then the
    tokens only other models have, added in recipe order, each model's in id order (mergekit
    takes the models in a set's order, so its new ids vary between runs), then every added
    (special) token, the first model's settings winning. Tokens at ids beyond a model's
    embedding rows are left out."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoints[base].path)
    except Exception:
        raise RecipeError(f"{recipe.where('tokenizer')}: the base model {base!r} has no tokenizer that "
                          "transformers can load") from None
    known = set(tokenizer.get_vocab())
    new: dict[str, None] = {}
    special: dict[str, Any] = {}
    for model in dict.fromkeys([base, *merged]):
        try:
            theirs = tokenizer if model == base else AutoTokenizer.from_pretrained(checkpoints[model].path)
        except Exception:
            continue  # mergekit takes a model without a tokenizer to have the base's
        limit = checkpoints[model].config.get("vocab_size", len(theirs))
        added = theirs.added_tokens_decoder
        for token, index in sorted(theirs.get_vocab().items(), key=lambda item: item[1]):
            if index < limit and index not in added and token not in known:
                new.setdefault(token)
        for index, info in sorted(added.items()):
            if index < limit:
                special.setdefault(info.content, info)
    for token in new:
        if token not in special:
            tokenizer.add_tokens(token)
    for info in special.values():
        tokenizer.add_tokens(info)
    return tokenizer


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


def write_tokenizer_files(plan: "MergePlan", folder: Path) -> list[str]:
    """The output's tokenizer in `folder`: the tokenizer source's files copied, or the
    tokenizer built (a union, tokens added by `tokens:`) saved, then the chat template the
    recipe resolves to. What a merged checkpoint gets, and what the harness scores its
    candidates with (evaluation/harness.py). Returns the tokenizer files' names."""
    if plan.vocabulary is not None and plan.vocabulary.tokenizer is not None:
        files = sorted(Path(f).name for f in plan.vocabulary.tokenizer.save_pretrained(folder))
    else:
        files = copy_tokenizer(plan.checkpoints[plan.tokenizer_model].path, folder)
    if plan.chat_template is not None:
        write_chat_template(folder, plan.chat_template)
    return files


def tokenizer_identity(plan: "MergePlan") -> str:
    """What decides the output's tokenizer: the folder its files come from and, when the
    recipe sets a tokenizer or chat template, those settings and every model's folder.
    Two plans with the same identity write the same tokenizer files."""
    recipe = plan.recipe
    identity: dict[str, Any] = {"files": str(plan.checkpoints[plan.tokenizer_model].path.resolve())}
    if recipe.tokenizer_model_source is not None or recipe.chat_template is not None:
        identity["settings"] = [recipe.tokenizer_source, recipe.tokenizer.model_dump(mode="json") if recipe.tokenizer
                                else None, plan.chat_template]
        identity["models"] = {ref: str(c.path.resolve()) for ref, c in plan.checkpoints.items()}
    return json.dumps(identity, sort_keys=True)


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
