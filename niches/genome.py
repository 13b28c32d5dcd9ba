"""Genomes: a bounded real vector <-> a candidate recipe.

CMA-ES searches the unit box [0, 1]^n; a genome turns a point of it into a recipe the
engine can merge, and a recipe back into its point. Two kinds:

`RecipeGenome` (parameter space). A recipe *template* is an ordinary recipe in which some
parameter values are free markers:

    models:
      - model: ./lang
        parameters:
          density: {free: [0.1, 1.0], init: 0.5, granularity: layer}
          weight: {free: [0.0, 1.0]}                 # init: mid-point, granularity: global

`granularity` is `global` (one gene), `layer` (one gene for the embeddings, one per
layer, one for the final norm and head) or an integer k (embeddings, one gene per group
of k consecutive layers, final norm and head). A gene g in [0, 1] means low + g (high - low),
rounded for a whole-number parameter (karcher's `max_iter`). The bounds must lie in the
values the method declares for the parameter (`MergeMethod.domains`), and a switch
(true/false) cannot be free: a search must never propose what the method cannot merge.
Per-layer values become a filter list that any mergekit-style engine evaluates: the exact
names of the embedding and final tensors first, then a gradient of one point per layer
(mergekit evaluates a gradient of L points at layer i at i / (L - 1), so each point lands
on its layer exactly).

In a `slices:` template, mergekit evaluates a gradient over each output slice on its own,
t = i / (slice length - 1) for the slice's i-th layer (mergekit/plan.py, `plan_slice`), and
takes the embeddings with the first slice's parameters and the final norm and head with
the last slice's. So a per-layer marker there belongs to its slice: one gene per layer
of the slice (the layer_range of the source it sits in, or of the slice's first source),
an embeddings gene only in the first slice and a head gene only in the last, every gene
read. A per-layer marker in the top-level `parameters` of a `slices:` template would be
read again from its start in every slice: it is refused.

In a `modules:` template (merging/recipe.py) markers may sit in a module's `parameters`,
models and slices too, with `global` granularity: a module's layers are not the layout's.

`DataflowGenome` (data-flow space, merging/dataflow.py): one gene per slot of the layer
path (slot used when the gene is above 0.5, i.e. when I_t = 2 g - 1 > 0) and, optionally,
one gene per scale, mapped log-uniformly onto its bounds so that 1 sits in the middle of
a symmetric range such as [0.5, 2].
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import yaml

from merging.checkpoint import Checkpoint
from merging.dataflow import DataflowSpace, dataflow_recipe, output_projections
from merging.errors import RecipeError
from merging.operators import METHODS
from merging.operators.base import Domain
from merging.recipe import FilteredValue, Recipe, located, load_yaml, validate_recipe

MARKER_KEYS = {"free", "init", "granularity"}


@dataclass(frozen=True)
class LayerLayout:
    """What per-layer genes need to know of the models: the depth, and the exact names of
    the tensors before the layers (embeddings) and after them (final norm, head)."""

    num_layers: int
    pre_names: tuple[str, ...]
    post_names: tuple[str, ...]

    @classmethod
    def of(cls, checkpoint: Checkpoint) -> "LayerLayout":
        from merging.architecture import detect_architecture

        from merging.architecture import model_modules

        modules = model_modules(checkpoint.config)
        if len(modules) > 1:
            raise RecipeError(f"model {checkpoint.reference!r} is a {checkpoint.config.get('model_type')} of several "
                              f"modules ({', '.join(modules)}); evolve searches recipes of language models only")
        arch = detect_architecture(checkpoint.config)
        names = sorted(checkpoint.tensors)
        return cls(arch.num_layers, tuple(n for n in names if arch.position(n) == "pre"),
                   tuple(n for n in names if arch.position(n) == "post"))


@dataclass(frozen=True)
class FreeParameter:
    """One free marker of a template."""

    loc: tuple
    """Path of the marker in the template data, e.g. ("models", 1, "parameters", "density")."""
    name: str
    model: str | None
    """The model whose parameter this is (None: a slice- or recipe-wide parameter)."""
    low: float
    high: float
    init: float
    granularity: int | Literal["global", "layer"]
    labels: tuple[str, ...]
    """One label per gene: ("all",), or ("embed", "L0", ..., "head"), or ("embed", "L0-3", ..., "head");
    in a slice, its own layers, with "embed" only in the first slice and "head" only in the last."""
    layers: tuple[int, int] | None = None
    """Per-layer markers: the layers [start, end) its gradient covers (the slice's, or all)."""
    embed: bool = True
    """Whether it has a gene for the embeddings (per-layer markers not in the first slice do not)."""
    head: bool = True
    """Whether it has a gene for the final norm and head (only in the last slice)."""
    integer: bool = False
    """A whole-number parameter (karcher's `max_iter`): its values are rounded."""

    @property
    def size(self) -> int:
        return len(self.labels)

    def value(self, gene: float) -> float | int:
        value = self.low + float(np.clip(gene, 0.0, 1.0)) * (self.high - self.low)
        return round(value) if self.integer else value

    def gene(self, value: float) -> float:
        return (value - self.low) / (self.high - self.low)


class RecipeGenome:
    """The free parameters of a recipe template, as a point of [0, 1]^dimension."""

    def __init__(self, template: dict, root: yaml.Node, source: str, layout: LayerLayout | None = None):
        self.template = template
        self.source = source
        self.layout = layout
        self.parameters: list[FreeParameter] = []
        for loc, marker, model in _markers(template):
            self.parameters.append(self._free_parameter(loc, marker, model, root, template))
        if not self.parameters:
            raise RecipeError(f"{source}: the template marks no parameter free; write e.g. "
                              "`density: {free: [0.1, 1.0], granularity: layer}`")
        validate_recipe(self._substitute([p.init for p in self.parameters]), root, source, strict_parameters=True)

    @classmethod
    def from_text(cls, text: str, source: str = "<template>", layout: LayerLayout | None = None) -> "RecipeGenome":
        data, root = load_yaml(text, source)
        if not isinstance(data, dict):
            raise RecipeError(f"{source}: a recipe template is a YAML mapping")
        return cls(data, root, source, layout)

    @classmethod
    def from_file(cls, path: str | Path, layout: LayerLayout | None = None) -> "RecipeGenome":
        return cls.from_text(Path(path).read_text(), str(path), layout)

    def _free_parameter(self, loc: tuple, marker: dict, model: str | None, root: yaml.Node,
                        template: dict) -> FreeParameter:
        def fail(message: str) -> RecipeError:
            return RecipeError(f"{located(root, loc, self.source)}: {message}")

        unknown = set(marker) - MARKER_KEYS
        if unknown:
            raise fail(f"unknown key(s) {sorted(unknown)} in a free marker; it takes {sorted(MARKER_KEYS)}")
        bounds = marker["free"]
        if not (isinstance(bounds, list) and len(bounds) == 2 and all(_is_number(b) for b in bounds)
                and bounds[0] < bounds[1]):
            raise fail(f"`free` must be [low, high] with low < high, got {bounds!r}")
        low, high = float(bounds[0]), float(bounds[1])
        domain = _domain(template.get("merge_method"), loc[-1], fail)
        if domain is not None and not (domain.contains(low) and domain.contains(high)):
            raise fail(f"bounds {bounds!r} leave the values {template['merge_method']}'s {loc[-1]!r} takes, {domain}")
        integer = domain is not None and domain.integer
        init = marker.get("init", (low + high) / 2)
        if not _is_number(init) or not low <= init <= high:
            raise fail(f"`init` must be a number inside [{low}, {high}], got {init!r}")
        granularity = marker.get("granularity", "global")
        if granularity == "global":
            return FreeParameter(loc, str(loc[-1]), model, low, high, float(init), granularity, ("all",),
                                 integer=integer)
        if loc[0] == "modules":
            raise fail("a marker inside `modules:` takes granularity global only (per-layer genes follow the "
                       "model's layers, not a module's)")
        if not (granularity == "layer" or (isinstance(granularity, int) and not isinstance(granularity, bool)
                                           and granularity >= 1)):
            raise fail(f"`granularity` must be global, layer or a number of layers per group, got {granularity!r}")
        if self.layout is None:
            raise fail("per-layer granularity needs the models' layout (RecipeGenome(..., layout=...))")
        (start, end), embed, head = self._gradient_span(loc, template, fail)
        size = 1 if granularity == "layer" else granularity
        groups = [(a, min(a + size, end)) for a in range(start, end, size)]
        labels = (*(["embed"] if embed else []), *(f"L{a}" if b - a == 1 else f"L{a}-{b - 1}" for a, b in groups),
                  *(["head"] if head else []))
        return FreeParameter(loc, str(loc[-1]), model, low, high, float(init), granularity, labels, (start, end),
                             embed, head, integer)

    def _gradient_span(self, loc: tuple, template: dict, fail) -> tuple[tuple[int, int], bool, bool]:
        """The layers a per-layer marker's gradient is read over, and whether the
        embeddings and the head read it too: every layer and both in a `models:`
        template; in a `slices:` one, the marker's slice (mergekit's semantics)."""
        slices = template.get("slices")
        if not slices:
            return (0, self.layout.num_layers), True, True
        if loc[0] != "slices":
            raise fail("a per-layer marker at the top level of a `slices:` template would be read from its start "
                       "again in every slice (mergekit evaluates gradients per slice); put it in a slice's "
                       "`parameters` or sources")
        index = loc[1]
        sources = slices[index].get("sources") or [{}]
        source = sources[loc[3]] if loc[2] == "sources" else sources[0]
        span = source.get("layer_range")
        if not (isinstance(span, list) and len(span) == 2 and all(isinstance(v, int) for v in span)
                and 0 <= span[0] < span[1]):
            raise fail(f"its slice's layer_range must be [start, end] with 0 <= start < end, got {span!r}")
        return (span[0], span[1]), index == 0, index == len(slices) - 1

    @property
    def dimension(self) -> int:
        return sum(p.size for p in self.parameters)

    @property
    def x0(self) -> np.ndarray:
        """The genome of every `init` value."""
        return np.concatenate([np.full(p.size, p.gene(p.init)) for p in self.parameters])

    @property
    def labels(self) -> list[str]:
        """A name per gene: `lang:density@L3`."""
        return [f"{p.model or '*'}:{p.name}@{label}" for p in self.parameters for label in p.labels]

    def values(self, genome: Sequence[float]) -> list[np.ndarray]:
        """Each free parameter's values (one per gene, rounded for an integer parameter), in order."""
        genome = self._check(genome)
        out, start = [], 0
        for p in self.parameters:
            out.append(np.array([p.value(g) for g in genome[start:start + p.size]]))
            start += p.size
        return out

    def decode(self, genome: Sequence[float]) -> Recipe:
        """The candidate recipe of a genome (genes outside [0, 1] are clipped)."""
        settings = [self._setting(p, v) for p, v in zip(self.parameters, self.values(genome))]
        return Recipe.model_validate(self._substitute(settings))

    def encode(self, recipe: Recipe) -> np.ndarray:
        """The genome of a recipe this genome decoded (or one written the same way)."""
        data = recipe.model_dump(mode="json", exclude_none=True)
        genes = []
        for p in self.parameters:
            setting = _get(data, p.loc)
            genes.extend(p.gene(v) for v in self._gene_values(p, setting))
        return np.array(genes, dtype=float)

    def _setting(self, p: FreeParameter, values: np.ndarray) -> Any:
        number = int if p.integer else float
        if p.granularity == "global":
            return number(values[0])
        layout = self.layout
        size = 1 if p.granularity == "layer" else int(p.granularity)
        start, end = p.layers
        first = 1 if p.embed else 0
        per_layer = [number(values[first + offset // size]) for offset in range(end - start)]
        return ([{"filter": name, "value": number(values[0])} for name in layout.pre_names if p.embed]
                + [{"filter": name, "value": number(values[-1])} for name in layout.post_names if p.head]
                + [{"value": per_layer}])

    def _gene_values(self, p: FreeParameter, setting: Any) -> list[float]:
        if p.granularity == "global":
            return [float(setting)]
        entries = [FilteredValue.model_validate(e) for e in setting]
        by_filter = {e.filter: e.value for e in entries}
        layers = entries[-1].value
        size = 1 if p.granularity == "layer" else int(p.granularity)
        pre = [by_filter[self.layout.pre_names[0]] if self.layout.pre_names else layers[0]] if p.embed else []
        post = [by_filter[self.layout.post_names[0]] if self.layout.post_names else layers[-1]] if p.head else []
        return [*pre, *layers[::size], *post]

    def _substitute(self, settings: Sequence[Any]) -> dict:
        data = copy.deepcopy(self.template)
        for p, setting in zip(self.parameters, settings):
            _get(data, p.loc[:-1])[p.loc[-1]] = setting
        return data

    def _check(self, genome: Sequence[float]) -> np.ndarray:
        genome = np.asarray(genome, dtype=float)
        if genome.shape != (self.dimension,):
            raise ValueError(f"genome has shape {list(genome.shape)}; this template has {self.dimension} genes")
        return genome


class DataflowGenome:
    """Inclusion genes (one per slot) and scale genes of a data-flow space.

    `scales`: "layer_pairs" (the paper's W, one scale per pair of layers from different
    models; pairs within one model keep 1, as the stream is only rescaled where the path
    crosses models), "model_pairs" (one scale per ordered pair of different models) or
    "none". `init`: "first_model" starts from model 0's own path (its slots in the first
    repeat at 0.6, the rest at 0.4, so a sigma of ~0.2 explores from there).

    A family whose scales cannot fold into weights (post-norm) is refused here, when the
    search is set up, rather than at the first candidate's decode after hours of work.
    """

    def __init__(self, space: DataflowSpace, *, scales: str = "layer_pairs",
                 scale_bounds: tuple[float, float] = (0.5, 2.0), init: str = "first_model"):
        if scales not in ("layer_pairs", "model_pairs", "none"):
            raise RecipeError(f"scales must be layer_pairs, model_pairs or none, got {scales!r}")
        if scales != "none":
            try:
                output_projections(space.model_type)
            except RecipeError as exc:
                raise RecipeError(f"model {space.sources[0]} (model 0 of the data-flow space): {exc}") from None
        if not 0 < scale_bounds[0] < 1 < scale_bounds[1]:
            raise RecipeError(f"scale bounds must satisfy 0 < low < 1 < high, got {list(scale_bounds)}")
        if init not in ("first_model", "uniform"):
            raise RecipeError(f"init must be first_model or uniform, got {init!r}")
        self.space = space
        self.scales = scales
        self.scale_bounds = (float(scale_bounds[0]), float(scale_bounds[1]))
        self.init = init
        models = [m for m, _ in space.layers]
        if scales == "layer_pairs":
            self.scale_pairs = [(i, j) for i in range(space.num_layers) for j in range(space.num_layers)
                                if models[i] != models[j]]
        elif scales == "model_pairs":
            count = len(space.sources)
            self.scale_pairs = [(a, b) for a in range(count) for b in range(count) if a != b]
        else:
            self.scale_pairs = []

    @property
    def dimension(self) -> int:
        return self.space.num_slots + len(self.scale_pairs)

    @property
    def x0(self) -> np.ndarray:
        slots = np.full(self.space.num_slots, 0.5 if self.init == "uniform" else 0.4)
        if self.init == "first_model":
            slots[: self.space.layer_counts[0]] = 0.6
        return np.concatenate([slots, np.full(len(self.scale_pairs), self._gene_of_scale(1.0))])

    @property
    def labels(self) -> list[str]:
        slots = [f"I[{t}]=m{m}.L{layer}" for t in range(self.space.num_slots)
                 for m, layer in [self.space.layers[t % self.space.num_layers]]]
        return slots + [f"W[{i},{j}]" for i, j in self.scale_pairs]

    def inclusion(self, genome: Sequence[float]) -> np.ndarray:
        """I in [-1, 1]: slot t is on the path when I[t] > 0."""
        genome = self._check(genome)
        return 2.0 * np.clip(genome[: self.space.num_slots], 0.0, 1.0) - 1.0

    def scale_matrix(self, genome: Sequence[float]) -> np.ndarray | None:
        """W (N x N, layer pairs), or None when scales are not searched."""
        if self.scales == "none":
            return None
        genes = self._check(genome)[self.space.num_slots:]
        scales = [self._scale_of_gene(g) for g in genes]
        if self.scales == "model_pairs":
            pairs = np.ones((len(self.space.sources),) * 2)
            for (a, b), s in zip(self.scale_pairs, scales):
                pairs[a, b] = s
            return self.space.expand_model_scales(pairs).numpy()
        matrix = np.ones((self.space.num_layers,) * 2)
        for (i, j), s in zip(self.scale_pairs, scales):
            matrix[i, j] = s
        return matrix

    def path(self, genome: Sequence[float]) -> list[tuple[int, int]]:
        return self.space.path_from_inclusion(self.inclusion(genome))

    def decode(self, genome: Sequence[float]) -> Recipe:
        return dataflow_recipe(self.space, self.inclusion(genome), self.scale_matrix(genome))

    def encode(self, inclusion: Sequence[float], scales: np.ndarray | None = None) -> np.ndarray:
        """The genome of an inclusion vector (I in [-1, 1]) and a scale matrix (as
        `scale_matrix` returns it; None: every scale 1)."""
        slots = (np.clip(np.asarray(inclusion, dtype=float), -1, 1) + 1) / 2
        genes = []
        for a, b in self.scale_pairs:
            if scales is None:
                value = 1.0
            elif self.scales == "model_pairs":
                value = scales[self._first_layer(a), self._first_layer(b)]
            else:
                value = scales[a, b]
            genes.append(self._gene_of_scale(float(value)))
        return np.concatenate([slots, np.array(genes)])

    def _first_layer(self, model: int) -> int:
        return self.space.layers.index((model, 0))

    def _scale_of_gene(self, gene: float) -> float:
        low, high = (math.log(b) for b in self.scale_bounds)
        return math.exp(low + float(np.clip(gene, 0.0, 1.0)) * (high - low))

    def _gene_of_scale(self, scale: float) -> float:
        low, high = (math.log(b) for b in self.scale_bounds)
        return (math.log(scale) - low) / (high - low)

    def _check(self, genome: Sequence[float]) -> np.ndarray:
        genome = np.asarray(genome, dtype=float)
        if genome.shape != (self.dimension,):
            raise ValueError(f"genome has shape {list(genome.shape)}; this space has {self.dimension} genes")
        return genome


def _markers(data: dict):
    """(loc, marker, model) of every free marker in a recipe's parameter scopes."""
    def scan(params: Any, loc: tuple, model: str | None):
        for name, value in (params or {}).items() if isinstance(params, dict) else ():
            if isinstance(value, dict) and "free" in value:
                yield loc + (name,), value, model

    def merge(part: dict, at: tuple):
        for i, source in enumerate(part.get("models") or []):
            if isinstance(source, dict):
                yield from scan(source.get("parameters"), at + ("models", i, "parameters"), source.get("model"))
        for i, slice_ in enumerate(part.get("slices") or []):
            if not isinstance(slice_, dict):
                continue
            yield from scan(slice_.get("parameters"), at + ("slices", i, "parameters"), None)
            for j, source in enumerate(slice_.get("sources") or []):
                if isinstance(source, dict):
                    yield from scan(source.get("parameters"), at + ("slices", i, "sources", j, "parameters"),
                                    source.get("model"))

    yield from scan(data.get("parameters"), ("parameters",), None)
    yield from merge(data, ())
    modules = data.get("modules")
    for name, module in modules.items() if isinstance(modules, dict) else ():
        if isinstance(module, dict):
            yield from scan(module.get("parameters"), ("modules", name, "parameters"), None)
            yield from merge(module, ("modules", name))


def _domain(method: Any, name: Any, fail) -> Domain | None:
    """The values parameter `name` of `method` takes, or None when the method or the name
    is unknown (the template's validation names those); a switch cannot be free."""
    known = METHODS.get(method) if isinstance(method, str) else None
    if known is None or name not in {**known.model_params, **known.global_params}:
        return None
    if name not in known.domains:
        raise fail(f"{method}'s {name!r} is a switch (true or false), not a number: it cannot be free")
    return known.domains[name]


def _get(data: Any, loc: tuple) -> Any:
    for part in loc:
        data = data[part]
    return data


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
