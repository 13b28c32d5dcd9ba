"""Merge recipes: mergekit's YAML schema, typed, with errors that name the recipe line.

A recipe says *what* to merge: the method, the models (or layer `slices` of them), and
parameters. A parameter value is a scalar, a gradient (a list interpolated over the
layers of an output slice) or a list of `{filter, value}` entries matched against the
tensor name, exactly as mergekit evaluates them, so a mergekit recipe runs unchanged.
Precedence, highest first: a slice source's (or `models[]` entry's) parameters, the
slice's, the module's (under `modules:`), the top-level `parameters`.

`modules:` merges each part of a multi-module model (a VLM's `text_decoder`,
`vision_tower`, `multi_modal_projector`; merging/architecture.py) from its own `models:`
or `slices:` and `parameters`, with the recipe's one `merge_method` and `base_model`, as
mergekit 0.1.5 does.
"""
from __future__ import annotations

import difflib
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Iterable, Iterator, Literal, Optional, Union, get_args, get_origin

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, PrivateAttr, Tag, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from merging.chat_templates import template_problem
from merging.errors import RecipeError, RecipeNote
from merging.operators import METHODS
from merging.operators.base import REQUIRED, MergeMethod

Scalar = Union[bool, int, float, str]
ScalarOrGradient = Union[Scalar, list[Scalar]]

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16,
                                  "bfloat16": torch.bfloat16, "float64": torch.float64}
"""The dtype names a recipe's `dtype` / `out_dtype` may give: the one table of the project."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FilteredValue(_Strict):
    """One entry of a filter list: applies when `filter` is a substring of the tensor name."""

    value: ScalarOrGradient
    filter: Optional[str] = None


ParameterSetting = Union[FilteredValue, list[FilteredValue], ScalarOrGradient]
Parameters = Optional[dict[str, ParameterSetting]]


class ModelSource(_Strict):
    model: str
    parameters: Parameters = None


class SliceSource(_Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: Parameters = None


class Slice(_Strict):
    sources: list[SliceSource]
    base_model: Optional[str] = None
    parameters: Parameters = None
    residual_weight: Optional[float] = None
    """In mergekit 0.1.5's schema, but no merge reads it: accepted and ignored, with a note."""


class ModuleSpec(_Strict):
    """One entry of `modules:`: what one module of the model is merged from."""

    models: Optional[list[ModelSource]] = None
    slices: Optional[list[Slice]] = None
    parameters: Parameters = None


MODULE_KEYS_MERGEKIT_IGNORES = {
    "merge_method": "mergekit merges every module with the recipe's top-level `merge_method`",
    "base_model": "mergekit takes a module's base from the top-level `base_model`, or from a slice's",
}
"""Keys a user may expect in a module that mergekit's schema lacks (so it ignores them): the
note says what happens instead."""


class ModelToken(_Strict):
    """`{kind: model_token, model: M, token: T}` (or `token_id: N`): the row model M has
    for its token T (its own tokenizer's id) or its row N."""

    kind: Literal["model_token"]
    model: str
    token: Optional[str] = None
    token_id: Optional[int] = None

    @model_validator(mode="after")
    def _one_token(self) -> "ModelToken":
        if (self.token is None) == (self.token_id is None):
            raise PydanticCustomError("model_token", "give `token` or `token_id` (one of them), as mergekit asks")
        if self.token_id is not None and self.token_id < 0:
            raise PydanticCustomError("model_token", "`token_id` must be 0 or more")
        return self


class ZeroToken(_Strict):
    """`{kind: zero}`: a row of zeros."""

    kind: Literal["zero"]


def _token_source_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "model"
    kind = value.get("kind") if isinstance(value, dict) else getattr(value, "kind", None)
    return kind if kind in ("model_token", "zero") else None


TokenSource = Annotated[
    Union[Annotated[ModelToken, Tag("model_token")], Annotated[ZeroToken, Tag("zero")], Annotated[str, Tag("model")]],
    Discriminator(_token_source_kind, custom_error_type="token_source",
                  custom_error_message="a token's `source` is a model name, {kind: model_token, model: M, "
                                       "token: T} (or token_id: N) or {kind: zero}"),
]


class TokenEmbedding(_Strict):
    """One entry of `tokenizer.tokens` (mergekit's TokenEmbeddingConfig): where the row of
    a token comes from when a model lacks it, and with `force` for every model."""

    source: Optional[TokenSource] = None
    force: bool = False


class TokenizerSpec(_Strict):
    """mergekit's `tokenizer:` block. A token of `tokens` that the output tokenizer lacks
    is added to it, as mergekit adds it."""

    source: str = "union"
    tokens: Optional[dict[str, TokenEmbedding]] = None
    pad_to_multiple_of: Optional[int] = None


class Recipe(_Strict):
    merge_method: str
    base_model: Optional[str] = None
    models: Optional[list[ModelSource]] = None
    slices: Optional[list[Slice]] = None
    modules: Optional[dict[str, ModuleSpec]] = None
    parameters: Parameters = None
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None
    tokenizer: Optional[TokenizerSpec] = None
    chat_template: Optional[str] = None
    _where: dict[str, str] = PrivateAttr(default_factory=dict)
    """`recipe.yaml, line 7: tokenizer.source`: the tokenizer source, `slices:` and the
    module names are checked against the models when the merge is planned, and those
    errors still name the line."""

    def __eq__(self, other: object) -> bool:
        """Recipes are equal by their keys; where they were read from is no part of them."""
        return isinstance(other, Recipe) and self.model_dump() == other.model_dump()

    @property
    def method(self) -> MergeMethod:
        return METHODS[self.merge_method]

    @property
    def tokenizer_model_source(self) -> str | None:
        """`base`, `union`, a model, or None (no tokenizer asked for: the donor's is copied)."""
        return self.tokenizer.source if self.tokenizer else self.tokenizer_source

    @property
    def token_overrides(self) -> dict[str, "TokenEmbedding"]:
        """`tokenizer.tokens`: the tokens whose rows the recipe sets (none: {})."""
        return (self.tokenizer.tokens if self.tokenizer else None) or {}

    def where(self, key: str) -> str:
        """Where `key` (`tokenizer`, `tokens.TOKEN`, `slices`, `modules.NAME`) is set: the
        recipe line, or the key."""
        return self._where.get(key, key)

    def referenced_models(self) -> list[str]:
        """Every model the recipe names, in first-mention order."""
        names: list[str] = [self.base_model] if self.base_model else []
        for source in self.models or []:
            names.append(source.model)
        for slice_ in output_slices(self):
            names.extend([slice_.base_model] if slice_.base_model else [])
            names.extend(s.model for s in slice_.sources)
        if self.tokenizer_model_source not in (None, "base", "union"):
            names.append(self.tokenizer_model_source)
        return list(dict.fromkeys(names))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(exclude_none=True, mode="json"), sort_keys=False)


@dataclass
class OutputSlice:
    """A normalised output slice: `models:` recipes become one slice over all layers."""

    sources: list[SliceSource | ModelSource]
    base_model: str | None
    parameters: Parameters
    module_parameters: Parameters = None
    """The `parameters` of the module (under `modules:`) the slice belongs to."""

    def layer_range(self, source: SliceSource | ModelSource, num_layers: int) -> tuple[int, int]:
        return source.layer_range if isinstance(source, SliceSource) else (0, num_layers)


def output_slices(recipe: Recipe) -> list[OutputSlice]:
    """Every output slice of the recipe (of all its modules, in order)."""
    return [slice_ for slices in module_slices(recipe).values() for slice_ in slices]


def module_slices(recipe: Recipe) -> dict[str | None, list[OutputSlice]]:
    """Each module's output slices ({None: ...} without `modules:`, for every module of
    the model). mergekit's normalisation: `models:` -> one slice; the base joins the sources."""
    if recipe.modules is None:
        return {None: _slices_of(recipe, recipe.models, recipe.slices, None)}
    return {name: _slices_of(recipe, module.models, module.slices, module.parameters)
            for name, module in recipe.modules.items()}


def _slices_of(recipe: Recipe, models: list[ModelSource] | None, slices: list[Slice] | None,
               module_parameters: Parameters) -> list[OutputSlice]:
    if models:
        sources: list[SliceSource | ModelSource] = list(models)
        if recipe.base_model and all(s.model != recipe.base_model for s in sources):
            sources.append(ModelSource(model=recipe.base_model))
        return [OutputSlice(sources, recipe.base_model, None, module_parameters)]
    return [OutputSlice(list(s.sources), s.base_model or recipe.base_model, s.parameters, module_parameters)
            for s in slices or []]


def assign_modules(recipe: Recipe, modules: list[str], model: str) -> dict[str, list[OutputSlice]]:
    """Each module of `model` (the one whose config the output takes) -> its output slices.

    As mergekit: `models:` merges every module from the same models; `slices:` (layer
    ranges) fits a model of one module only. Unlike mergekit, which fails with a bare
    KeyError on a module name the model lacks and writes a checkpoint without the tensors
    of a module `modules:` leaves out, both are refused here, naming the recipe line."""
    slices = module_slices(recipe)
    if recipe.modules is None:
        if recipe.slices and len(modules) > 1:
            raise RecipeError(f"{recipe.where('slices')}: model {model!r} has {len(modules)} modules "
                              f"({', '.join(modules)}); give the layer slices of each under `modules:` "
                              "(mergekit refuses `slices:` for such a model too)")
        return {name: slices[None] for name in modules}
    for name in recipe.modules:
        if name not in modules:
            raise RecipeError(f"{recipe.where('modules.' + name)}: model {model!r} has no module {name!r}"
                              f"{did_you_mean(name, modules)}; its modules: {', '.join(modules)}")
    left_out = [name for name in modules if name not in recipe.modules]
    if left_out:
        raise RecipeError(f"{recipe.where('modules')}: `modules:` leaves out module(s) {', '.join(left_out)} of "
                          f"model {model!r}; list every module (mergekit would write a checkpoint without "
                          "their tensors)")
    return {name: slices[name] for name in modules}


def parameter_scopes(recipe: Recipe, slice_: OutputSlice, model: str | None) -> list[Parameters]:
    """Where a parameter may be set, highest precedence first (mergekit's order)."""
    scopes: list[Parameters] = []
    if model is not None:
        scopes.extend(s.parameters for s in slice_.sources if s.model == model)
    scopes.append(slice_.parameters)
    scopes.append(slice_.module_parameters)
    scopes.append(recipe.parameters)
    return scopes


def evaluate_setting(setting: ParameterSetting, tensor_name: str, t: float) -> Any:
    """A parameter's value for one tensor at relative depth `t` in [0, 1].

    Numeric gradients interpolate linearly between evenly spaced points; non-numeric
    lists pick the point at or below `t`; a filter list returns its first entry whose
    filter is a substring of `tensor_name` (no filter or `*` matches everything).
    Returns None when no filter entry matches.
    """
    if isinstance(setting, FilteredValue):
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(v, FilteredValue) for v in setting):
            for entry in setting:
                if entry.filter in (None, "*") or (tensor_name and entry.filter in tensor_name):
                    return evaluate_setting(entry.value, tensor_name, t)
            return None
        setting = [_number(v) for v in setting]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        low = int(scaled)
        high = min(len(setting) - 1, low + 1)
        fraction = scaled - low
        return (1 - fraction) * setting[low] + fraction * setting[high]
    return setting


def resolve_parameter(name: str, default: Any, scopes: list[Parameters], tensor_name: str,
                      t: float, where: str) -> Any:
    """First scope that sets `name` (and whose filters match) wins; else the default."""
    for scope in scopes:
        if scope and name in scope:
            value = evaluate_setting(scope[name], tensor_name, t)
            if value is not None:
                return _coerce(name, value, default, where)
    if default is REQUIRED:
        raise RecipeError(f"missing required parameter {name!r} for {where}")
    return default


def _number(value: Any) -> Any:
    """A numeric string as its number, anything else unchanged. PyYAML reads `1e-5` (no
    dot) as a string; mergekit validates parameters with pydantic, which takes a numeric
    string for a number, so `tol: 1e-5` and `epsilon: [1e-3, 1e-6]` are numbers there."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _coerce(name: str, value: Any, default: Any, where: str) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise RecipeError(f"parameter {name!r} for {where} must be true or false, got {value!r}")
        return value
    value = _number(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecipeError(f"parameter {name!r} for {where} must be a number, got {value!r}")
    return float(value)


# --- loading, with line numbers -------------------------------------------------------

def load_recipe(path: str | Path) -> Recipe:
    """Parse and validate a recipe file; every error names the line at fault."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror}") from exc
    return parse_recipe(text, source=str(path))


def parse_recipe(text: str, source: str = "<recipe>") -> Recipe:
    data, root = load_yaml(text, source, duplicates="last")
    return validate_recipe(data, root, source)


def load_yaml(text: str, source: str, *, duplicates: str = "refuse") -> tuple[Any, yaml.Node]:
    """The YAML's data and its node tree (for line numbers); a YAML error names its line.

    A key given twice in one mapping: YAML keeps the last without a word. A recipe
    (`duplicates="last"`) follows mergekit, which reads recipes with PyYAML: the last
    value wins, with a note naming both lines. evomerge's own files refuse it."""
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        context = getattr(exc, "context_mark", None)
        where = f"{source}, line {mark.line + 1}" if mark else source
        started = f" (in the {exc.context.split()[-1]} that starts on line {context.line + 1})" \
            if context is not None and exc.context and context.line != mark.line else ""
        raise RecipeError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}{started}") from exc
    for key, line, first in _duplicate_keys(root):
        message = f"{source}, line {line}: key {key!r} is given twice (first on line {first})"
        if duplicates == "refuse":
            raise RecipeError(message)
        warnings.warn(RecipeNote(f"{message}; the last value is used, as mergekit does"), stacklevel=2)
    return data, root


def _duplicate_keys(node: yaml.Node | None) -> Iterable[tuple[str, int, int]]:
    """(key, its line, the line of its first occurrence) for every repeated mapping key."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                line = key.start_mark.line + 1
                if key.value in seen:
                    yield key.value, line, seen[key.value]
                seen.setdefault(key.value, line)
            yield from _duplicate_keys(value)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            yield from _duplicate_keys(item)


def validate_recipe(data: Any, root: yaml.Node, source: str, *, strict_parameters: bool = False) -> Recipe:
    """Recipe data (parsed YAML) to a Recipe; errors name the line in `root` at fault.
    Shared with recipe templates (niches/genome.py), whose free markers are replaced
    before validation.

    A parameter the method does not take is ignored with a note, as mergekit 0.1.5 ignores
    it (recipes on model cards often keep `normalize` or `int8_mask` from another
    method), unless its name is close to one the method takes (`densty`): that is refused
    as the typo it most likely is, like a misspelt key. `strict_parameters` refuses every
    unknown parameter: a search template must not spend a gene on a parameter that does
    nothing."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping with at least `merge_method`")

    def fail(loc: tuple, message: str) -> RecipeError:
        return RecipeError(f"{located(root, loc, source)}: {message}")

    for loc in _ignored_keys(data):
        why = MODULE_KEYS_MERGEKIT_IGNORES.get(loc[-1], "") if _in_module(loc) else ""
        warnings.warn(RecipeNote(f"{located(root, loc, source)}: key {loc[-1]!r} is not part of "
                                 f"mergekit's recipe schema; ignored, as mergekit does{f' ({why})' if why else ''}"),
                      stacklevel=2)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        # a union (a scalar, a gradient or a filter list) fails once per branch; an unknown
        # key is the branch's error a user can act on, so it wins over "not a number"
        error = next((e for e in exc.errors() if e["type"] == "extra_forbidden"), exc.errors()[0])
        loc = tuple(p for p in error["loc"] if not isinstance(p, str) or p in _all_keys(data))
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = unknown_key_message(Recipe, error["loc"])
            if error["loc"][-1] in _parameter_names() and "did you mean" not in message:
                message += "; a merge parameter goes under `parameters:`"
        raise fail(loc, message) from None
    for at, _, slices, _ in _parts(recipe):
        for i, slice_ in enumerate(slices or []):
            if slice_.residual_weight is not None:
                warnings.warn(RecipeNote(f"{located(root, at + ('slices', i, 'residual_weight'), source)}: "
                                         "`residual_weight` has no effect in mergekit 0.1.5; ignored"), stacklevel=2)
    for loc, params, allowed in _parameter_scopes(recipe) if recipe.merge_method in METHODS else ():
        for name in [name for name in params or {} if name not in allowed]:
            message = unknown_parameter_message(recipe.merge_method, name, allowed)
            if strict_parameters:
                raise fail(loc + (name,), message)
            if did_you_mean(name, allowed):
                raise fail(loc + (name,), f"{message} (mergekit would ignore it and use the default; "
                                          "evomerge refuses a likely typo)")
            warnings.warn(RecipeNote(f"{located(root, loc + (name,), source)}: {message}; ignored, as mergekit "
                                     "does"), stacklevel=2)
            del params[name]
    for loc, message in _semantic_errors(recipe):
        raise fail(loc, message)
    if recipe.tokenizer_model_source is not None:
        loc = ("tokenizer", "source") if recipe.tokenizer else ("tokenizer_source",)
        recipe._where["tokenizer"] = located(root, loc, source)
        for token in recipe.token_overrides:
            recipe._where[f"tokens.{token}"] = located(root, ("tokenizer", "tokens", token), source)
    places: dict[str, tuple] = {"slices": ("slices",)} if recipe.slices else {}
    if recipe.modules:
        places["modules"] = ("modules",)
        places.update({f"modules.{name}": ("modules", name) for name in recipe.modules})
    for key, loc in places.items():
        recipe._where[key] = located(root, loc, source)
    return recipe


def _in_module(loc: tuple) -> bool:
    """Whether `loc` is a key of one entry of `modules:` (`modules.text_decoder.KEY`)."""
    return len(loc) == 3 and loc[0] == "modules"


def unknown_parameter_message(method: str, name: str, allowed: set[str]) -> str:
    hint = (f"{did_you_mean(name, allowed)}; {method} takes {', '.join(sorted(allowed))}"
            if allowed else f"; {method} takes no parameters here")
    return f"unknown parameter {name!r}{hint}"


def _parameter_scopes(recipe: Recipe) -> Iterator[tuple[tuple, Parameters, set[str]]]:
    """Every `parameters:` mapping of a recipe: its location, itself, and the names the
    method takes there (per model: its model parameters; elsewhere: all of them)."""
    allowed_model = set(recipe.method.model_params)
    allowed_any = allowed_model | set(recipe.method.global_params)
    yield ("parameters",), recipe.parameters, allowed_any
    for at, models, slices, parameters in _parts(recipe):
        if at:
            yield at + ("parameters",), parameters, allowed_any
        for i, source in enumerate(models or []):
            yield at + ("models", i, "parameters"), source.parameters, allowed_model
        for i, slice_ in enumerate(slices or []):
            yield at + ("slices", i, "parameters"), slice_.parameters, allowed_any
            for j, source in enumerate(slice_.sources):
                yield at + ("slices", i, "sources", j, "parameters"), source.parameters, allowed_model


def _parameter_names() -> set[str]:
    return {name for method in METHODS.values() for name in (*method.model_params, *method.global_params)}


def _ignored_keys(data: Any, loc: tuple = ()) -> list[tuple]:
    """Keys mergekit's schema does not have, which it ignores (its pydantic models take
    pydantic's default, `extra="ignore"`), e.g. `name:`. They are removed from `data`
    (the caller notes each). A key close to one the schema has at that place is kept,
    so that validation refuses it as the typo it most likely is (`paramters:` would
    otherwise drop every parameter without a word); so is a parameter name set outside
    `parameters:` (`- model: a` then `weight: 1`), which mergekit would drop too."""
    found: list[tuple] = []
    if isinstance(data, dict):
        allowed = schema_keys_at(Recipe, loc)
        for key in list(data):
            if not allowed or key in allowed:
                found.extend(_ignored_keys(data[key], loc + (key,)))
            elif (not (isinstance(key, str) and (did_you_mean(key, allowed) or key in _parameter_names()))
                  or (_in_module(loc + (key,)) and key in MODULE_KEYS_MERGEKIT_IGNORES)):
                found.append(loc + (key,))
                del data[key]
    elif isinstance(data, list):
        for index, item in enumerate(data):
            found.extend(_ignored_keys(item, loc + (index,)))
    return found


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """"; did you mean 'X'?" for the known word nearest a misspelt one, else "". A typo
    is the usual unknown key, and the fix is quicker to read than the list of keys."""
    match = difflib.get_close_matches(word, sorted(known), n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""


def unknown_key_message(schema: type[BaseModel], loc: tuple) -> str:
    """The message for pydantic's `extra_forbidden` error at `loc` (the unknown key last):
    the key, and the nearest key the schema allows at that place. Shared with the run
    configs of niches/, whose schema is as strict."""
    key = str(loc[-1])
    return f"unknown key {key!r}{did_you_mean(key, schema_keys_at(schema, loc[:-1]))}"


def schema_keys_at(schema: type[BaseModel], loc: tuple) -> set[str]:
    """The keys a pydantic schema allows in the mapping at `loc` (a pydantic error
    location: field names, list indexes, dict keys, and union branch tags, skipped)."""
    current: list[Any] = [schema]
    for part in loc:
        following = []
        for member in (m for annotation in current for m in _union_members(annotation)):
            if isinstance(member, type) and issubclass(member, BaseModel):
                if part in member.model_fields:
                    following.append(member.model_fields[part].annotation)
            elif get_origin(member) is list and isinstance(part, int):
                following.append(get_args(member)[0])
            elif get_origin(member) is dict and isinstance(part, str):
                following.append(get_args(member)[1])
        current = following or current  # a union branch tag ('list[FilteredValue]') leads nowhere
    return {name for annotation in current for member in _union_members(annotation)
            if isinstance(member, type) and issubclass(member, BaseModel) for name in member.model_fields}


def _union_members(annotation: Any) -> list[Any]:
    if get_origin(annotation) is Annotated:  # e.g. a discriminated union's tagged members
        return _union_members(get_args(annotation)[0])
    if get_origin(annotation) in (Union, types.UnionType):
        return [m for arg in get_args(annotation) for m in _union_members(arg)]
    return [annotation]


def _semantic_errors(recipe: Recipe):
    """What the schema cannot express: known method, model counts, layer ranges."""
    if recipe.merge_method not in METHODS:
        yield ("merge_method",), f"unknown merge method {recipe.merge_method!r}; known: {', '.join(sorted(METHODS))}"
        return
    method = recipe.method
    if sum(1 for part in (recipe.models, recipe.slices, recipe.modules) if part) != 1:
        yield (), "give exactly one of `models:`, `slices:` or `modules:` (mergekit's rule)"
        return
    for name, module in (recipe.modules or {}).items():
        if bool(module.models) == bool(module.slices):
            yield ("modules", name), f"module {name!r} needs exactly one of `models:` or `slices:`"
            return
    for key in ("dtype", "out_dtype"):
        value = getattr(recipe, key)
        if value is not None and value not in DTYPES:
            yield (key,), f"unknown dtype {value!r}; use one of {', '.join(DTYPES)}"
    yield from _tokenizer_errors(recipe)
    if recipe.chat_template is not None and (problem := template_problem(recipe.chat_template)):
        yield ("chat_template",), problem
    for at, models, slices, parameters in _parts(recipe):
        yield from _repeated_models(at, models, slices)
        for i, slice_ in enumerate(slices or []):
            loc = at + ("slices", i)
            for j, source in enumerate(slice_.sources):
                begin, end = source.layer_range
                # in a module, [0, 0] is the range of one without layers (a projector), as in mergekit
                if begin < 0 or end < begin or (end == begin and not at):
                    yield loc + ("sources", j, "layer_range"), f"layer_range {[begin, end]} is empty or negative"
            if len({s.layer_range[1] - s.layer_range[0] for s in slice_.sources}) > 1:
                yield loc + ("sources",), "all sources of a slice must span the same number of layers"
            if not slice_.sources:
                yield loc + ("sources",), "a slice needs at least one source"
    for at, models, slices, parameters in _parts(recipe):
        for i, slice_ in enumerate(_slices_of(recipe, models, slices, parameters)):
            loc = at + (("models",) if models else ("slices", i))
            base = slice_.base_model
            if method.needs_base and not base:
                yield ("merge_method",), f"{recipe.merge_method} needs a `base_model`"
                return
            if method.takes_base and base and slices and all(s.model != base for s in slice_.sources):
                # the base's layers for this slice are those of its own layer_range (mergekit reads
                # them from the slice's sources too); guessing them would merge the wrong layers
                yield (loc + ("sources",)), (f"{recipe.merge_method} subtracts the base model {base!r}, so list it "
                                             "among this slice's sources with the layer_range to subtract")
                continue
            count = sum(1 for s in slice_.sources if not (method.takes_base and s.model == base))
            if count < method.min_models:
                yield loc, f"{recipe.merge_method} needs at least {method.min_models} non-base model(s), got {count}"
            if method.max_models is not None and count > method.max_models:
                yield loc, f"{recipe.merge_method} takes at most {method.max_models} non-base model(s), got {count}"


def _parts(recipe: Recipe) -> list[tuple[tuple, list[ModelSource] | None, list[Slice] | None, Parameters]]:
    """(where, models, slices, module parameters) of the recipe itself, or of each module."""
    if recipe.modules is None:
        return [((), recipe.models, recipe.slices, None)]
    return [(("modules", name), m.models, m.slices, m.parameters) for name, m in recipe.modules.items()]


def _tokenizer_errors(recipe: Recipe):
    """Tokenizer options that cannot work: both forms, a token's row from a model the recipe
    does not merge (mergekit fails on it mid-merge). What depends on the models' vocabularies
    is checked when the merge is planned (merging/tokenizer.py)."""
    if recipe.tokenizer and recipe.tokenizer_source:
        yield ("tokenizer",), "give `tokenizer:` or `tokenizer_source:`, not both (mergekit refuses both)"
        return
    merged = {s.model for slice_ in output_slices(recipe) for s in slice_.sources}
    for token, entry in recipe.token_overrides.items():
        loc = ("tokenizer", "tokens", token)
        model = entry.source if isinstance(entry.source, str) else getattr(entry.source, "model", None)
        if model is not None and model not in merged:
            where = loc + (("source",) if isinstance(entry.source, str) else ("source", "model"))
            yield where, (f"model {model!r} is not merged by this recipe; a token's row comes from one of "
                          f"its models: {', '.join(sorted(merged))}")
        if entry.source is None and entry.force:
            yield loc + ("force",), "`force` needs a `source` (mergekit has no row to force otherwise)"
    if recipe.tokenizer and recipe.tokenizer.pad_to_multiple_of is not None and recipe.tokenizer.pad_to_multiple_of < 1:
        yield ("tokenizer", "pad_to_multiple_of"), "`pad_to_multiple_of` must be a positive whole number"


def _repeated_models(at: tuple, models: list[ModelSource] | None, slices: list[Slice] | None):
    """The same model twice among the inputs of one merge: mergekit refuses it ("Duplicate
    merge inputs"); merging it would silently use one of its entries only."""
    groups = [(at + ("models",), models or [])]
    groups += [(at + ("slices", i, "sources"), slice_.sources) for i, slice_ in enumerate(slices or [])]
    for loc, sources in groups:
        first: dict[str, int] = {}
        for j, source in enumerate(sources):
            if source.model in first:
                where = "`models:`" if loc[-1] == "models" else "this slice"
                yield loc + (j, "model"), (f"model {source.model!r} is listed twice in {where} (also as entry "
                                           f"{first[source.model]}); mergekit refuses duplicate merge inputs. "
                                           "List each model once (give it one weight)")
            first.setdefault(source.model, j)


def _all_keys(data: Any) -> set:
    if isinstance(data, dict):
        return set(data) | set().union(*(_all_keys(v) for v in data.values()))
    if isinstance(data, list):
        return set().union(*(_all_keys(v) for v in data)) if data else set()
    return set()


def located(root: yaml.Node, loc: tuple, source: str) -> str:
    """`recipe.yaml, line 7: models[1].parameters.density`: where an error points."""
    return f"{source}, line {_line_of(root, loc)}: {_dotted(loc)}"


def _line_of(node: yaml.Node, loc: tuple) -> int:
    """The 1-based line of the YAML node at `loc` (as deep as the path exists)."""
    for depth, part in enumerate(loc):
        if isinstance(node, yaml.MappingNode):
            # a key given twice: the last occurrence is the one in effect
            match = next(((k, v) for k, v in reversed(node.value) if k.value == part), None)
            if match is None:
                break
            node = match[0] if depth == len(loc) - 1 else match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            break
    return node.start_mark.line + 1


def _dotted(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "recipe"
