"""Every numeric parameter of every merge method can be searched by `evolve`.

Parametrized over the operator registry, so a method added later is covered without a
word here: each parameter a method declares numeric (`MergeMethod.domains`) is made a
free marker of a template at every scope a genome supports (a model's own, or the
top-level one; one gene, one per layer, one per group of two layers), and the decoded
recipe must give every tensor its gene's value and change the merge when the genes
change. Switches (true/false) cannot be free, nor can bounds leave a parameter's domain.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from merging.checkpoint import Checkpoint
from merging.engine import execute_task, open_models, plan_merge
from merging.errors import RecipeError
from merging.operators import METHODS
from merging.operators.base import REQUIRED, Domain, MergeMethod
from niches.genome import LayerLayout, RecipeGenome

NUMERIC = [(name, param) for name, method in METHODS.items() for param in method.domains]
SWITCHES = [(name, param) for name, method in METHODS.items()
            for param in (*method.model_params, *method.global_params) if param not in method.domains]
SCOPES = [(name, param, scope, base) for name, param in NUMERIC
          for scope in (("model", "top") if param in METHODS[name].model_params else ("top",))
          for base in ((False, True) if METHODS[name].optional_base else (METHODS[name].needs_base,))]
"""(method, parameter, where the marker sits, whether the recipe has a base model): both
forms of a method whose base is optional (nuslerp's and multislerp's task-vector mode)."""
GRANULARITIES = ["global", "layer", 2]

INVARIANT = {("task_arithmetic", "density"): "task_arithmetic accepts density and ignores it, as mergekit does"}
"""(method, parameter) pairs whose value cannot change the merge, and why."""
CONTEXT = {"density": 0.5, ("ramplus_tl", "epsilon"): 0.02}
"""Fixed values of the parameters not searched, where a default would hide the searched
one: below density 1 something is dropped, so `gamma` and `epsilon` act; RAM+ boosts
only the entries one model alone changes by more than `epsilon` (the default 1e-5 makes
every entry of these dense deltas shared, so `r` and `alpha` would multiply nothing)."""


def search_bounds(domain: Domain) -> tuple[float, float]:
    """Bounds well inside a domain, wide enough that the two ends merge differently."""
    if domain.integer:
        return domain.low + 1, domain.low + 20
    if math.isinf(domain.low):
        return 0.3, 1.5
    if math.isinf(domain.high):  # tolerances, thresholds, small factors
        return domain.low + 1e-3, domain.low + 0.1
    width = domain.high - domain.low
    return domain.low + 0.3 * width, domain.low + 0.7 * width


def middle(method: MergeMethod, param: str) -> float:
    low, high = search_bounds(method.domains[param])
    return round((low + high) / 2) if method.domains[param].integer else (low + high) / 2


def fixed_value(name: str, param: str) -> float | None:
    """The value a parameter not searched is given (None: its default)."""
    method = METHODS[name]
    for key in ((name, param), param):
        if key in CONTEXT:
            return CONTEXT[key]
    default = {**method.model_params, **method.global_params}[param]
    return middle(method, param) if default is REQUIRED else None


def template(name: str, family: dict, param: str | None = None, scope: str = "top", marker: Any = None,
             base: bool | None = None) -> dict:
    """A template of `name` over the tiny Llama family with `param` set to `marker`: in the
    first model's parameters (scope "model") or the top-level ones ("top"; the other
    models then set their own value, so a per-model parameter searched at the top still
    acts on one model alone, which a normalised weight needs). Without `param`, a plain
    recipe of the method. `base`: whether it names a base model (default: if the method
    needs one)."""
    method = METHODS[name]
    count = min(method.max_models or 3, 3)  # karcher needs three: two points' mean is their midpoint
    models = [{"model": str(family[f"variant_{i + 1}"]), "parameters": {}} for i in range(count)]
    top: dict[str, Any] = {}
    for other in method.domains:
        value = fixed_value(name, other)
        if other == param or value is None:
            continue
        for params in [m["parameters"] for m in models] if other in method.model_params else [top]:
            params[other] = value
    if param in method.model_params:
        for model in models[1:]:
            model["parameters"][param] = middle(method, param)
    if param is not None:
        (models[0]["parameters"] if scope == "model" else top)[param] = marker
    data: dict[str, Any] = {"merge_method": name}
    if method.needs_base if base is None else base:
        data["base_model"] = str(family["base"])
    data["models"] = [m if m["parameters"] else {"model": m["model"]} for m in models]
    if top:
        data["parameters"] = top
    data["dtype"] = "float32"
    return data


@pytest.fixture(scope="module")
def layout(llama_family) -> LayerLayout:
    return LayerLayout.of(Checkpoint("base", llama_family["base"]))


def genome_of(data: dict, layout: LayerLayout) -> RecipeGenome:
    return RecipeGenome.from_text(yaml.safe_dump(data, sort_keys=False), "template.yaml", layout)


def gene_value(values: np.ndarray, granularity: Any, tensor: str, layout: LayerLayout) -> float:
    """The value a tensor must get: the embeddings' gene, its layer's (group's), the head's."""
    if granularity == "global" or tensor in layout.pre_names:
        return values[0]
    if tensor in layout.post_names:
        return values[-1]
    layer = int(tensor.split(".layers.")[1].split(".")[0])
    return values[1 + layer // (1 if granularity == "layer" else granularity)]


def merged(genome: RecipeGenome, genes: np.ndarray, *, merge: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """Each tensor's resolved parameters, and (if `merge`) the merged layer tensors, of a
    genome's recipe. The vocabulary-sized embeddings and head are left out for speed:
    their genes are checked through their resolved parameters."""
    recipe = genome.decode(genes)
    plan = plan_merge(recipe, open_models(recipe))
    try:
        params = {task.output.name: task.params for task in plan.tasks}
        layers = [task for task in plan.tasks if ".layers." in task.output.name] if merge else []
        with torch.no_grad():
            return params, {task.output.name: execute_task(plan, task, torch.device("cpu"), seed=0) for task in layers}
    finally:
        plan.close()


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("name, param, scope, base", SCOPES)
def test_every_numeric_parameter_can_be_searched(name, param, scope, base, granularity, llama_family, layout):
    method = METHODS[name]
    low, high = search_bounds(method.domains[param])
    marker = {"free": [low, high], "granularity": granularity}
    genome = genome_of(template(name, llama_family, param, scope, marker, base), layout)
    assert len(genome.parameters) == 1
    assert genome.dimension == {"global": 1, "layer": 6, 2: 4}[granularity]  # embed, 4 layers or 2 groups, head

    spread = np.linspace(0.25, 1.0, genome.dimension)  # a different value on every gene
    params, _ = merged(genome, spread, merge=False)
    (values,) = genome.values(spread)
    for tensor, resolved in params.items():
        got = resolved[param][0] if param in method.model_params else resolved[param]
        assert got == pytest.approx(gene_value(values, granularity, tensor, layout)), tensor

    ends = [merged(genome, np.full(genome.dimension, gene)) for gene in (0.0, 1.0)]
    for bound, (ends_params, _) in zip((low, high), ends):
        assert all((p[param][0] if param in method.model_params else p[param]) == pytest.approx(bound)
                   for p in ends_params.values())
    changed = [t for t in ends[0][1] if not torch.equal(ends[0][1][t], ends[1][1][t])]
    if (name, param) in INVARIANT:
        assert not changed, INVARIANT[(name, param)]
    else:
        assert changed, f"{name}: the merge is the same at {param} = {low} and {high}"


@pytest.mark.parametrize("name, param", NUMERIC)
def test_declared_defaults_lie_in_their_domains(name, param):
    method = METHODS[name]
    default = {**method.model_params, **method.global_params}[param]
    assert default is REQUIRED or default is None or method.domains[param].contains(default)


def test_every_parameter_is_a_number_or_a_switch():
    """A parameter without a domain must be a switch (its default true or false): a
    numeric parameter a method forgot to declare would silently be unsearchable."""
    for name, param in SWITCHES:
        default = {**METHODS[name].model_params, **METHODS[name].global_params}[param]
        assert isinstance(default, bool), f"{name}: declare the domain of {param!r}"


@pytest.mark.parametrize("name, param", SWITCHES)
def test_a_switch_cannot_be_free(name, param, llama_family, layout):
    data = template(name, llama_family)
    data.setdefault("parameters", {})[param] = {"free": [0.0, 1.0]}
    with pytest.raises(RecipeError, match=rf"template.yaml, line \d+: parameters.{param}: {name}'s '{param}' "
                                          r"is a switch \(true or false\), not a number: it cannot be free"):
        genome_of(data, layout)


@pytest.mark.parametrize("name, param, side", [(n, p, side) for n, p in NUMERIC for side in ("low", "high")
                                               if not math.isinf(getattr(METHODS[n].domains[p], side))])
def test_bounds_must_stay_in_the_domain(name, param, side, llama_family, layout):
    """A bound past a finite end of the domain, or on an open end, is refused."""
    domain = METHODS[name].domains[param]
    low, high = search_bounds(domain)
    if side == "low":
        low = domain.low if domain.low_open else domain.low - 1
    else:
        high = domain.high if domain.high_open else domain.high + 1
    data = template(name, llama_family, param, "top", {"free": [low, high]})
    with pytest.raises(RecipeError, match=rf"template.yaml, line \d+: parameters.{param}: bounds .* leave the "
                                          rf"values {name}'s '{param}' takes, "):
        genome_of(data, layout)


@pytest.mark.parametrize("name, param", [(n, p) for n, p in NUMERIC if METHODS[n].domains[p].integer])
def test_an_integer_parameter_decodes_to_whole_numbers(name, param, llama_family, layout):
    """mergekit types them `int`: the decoded recipe runs there too."""
    genome = genome_of(template(name, llama_family, param, "top", {"free": [1, 20], "granularity": "layer"}),
                       layout)
    recipe = yaml.safe_load(genome.decode(np.linspace(0.0, 1.0, genome.dimension)).to_yaml())
    *ends, layers = recipe["parameters"][param]  # the embeddings', the final norm's and head's, the layers'
    numbers = [entry["value"] for entry in ends] + layers["value"]
    assert all(type(v) is int for v in numbers)
    assert [ends[0]["value"], ends[-1]["value"]] == [1, 20] and layers["value"] == [5, 9, 12, 16]  # 1 + 19 g, rounded


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "recipes").glob("*-template.yaml")),
                         ids=lambda p: p.stem)
def test_the_shipped_templates_keep_their_bounds_in_the_domains(path):
    """Every template the project ships is a genome (bounds inside each parameter's
    domain, no switch made free), on a layout of their models' depth or deeper."""
    layout = LayerLayout(32, ("model.embed_tokens.weight",), ("model.norm.weight", "lm_head.weight"))
    genome = RecipeGenome.from_file(path, layout)
    assert genome.decode(genome.x0).merge_method == yaml.safe_load(path.read_text())["merge_method"]


@pytest.mark.parametrize("marker, message", [
    ("rescale: {free: [0.0, 1.0]}", r"parameters.rescale: dare_ties's 'rescale' is a switch"),
    ("lambda: {free: [0.5, 1.5]}\n  density: {free: [0.5, 1.2]}", r"parameters.density: bounds \[0.5, 1.2\] leave"),
])
def test_evolve_refuses_such_a_template_before_the_run_folder(marker, message, micro_zoo, tmp_path, capsys):
    from evomerge.cli import main

    (tmp_path / "template.yaml").write_text("merge_method: dare_ties\nbase_model: zoo:base\nmodels:\n"
                                            "  - {model: zoo:lang, parameters: {weight: 0.5}}\n"
                                            "  - {model: zoo:math, parameters: {weight: 0.5}}\n"
                                            f"parameters:\n  {marker}\n")
    (tmp_path / "config.yaml").write_text(f"method: ps\nzoo: {micro_zoo[0]}\nmodels: [zoo:lang, zoo:math]\n"
                                          "fitness: {tasks: [math_lang], split: train, limit: 4}\n"
                                          "report: {tasks: [math_lang], split: test, limit: 4}\n"
                                          "ps: {template: template.yaml, optimizer: {max_evals: 2}}\ndevice: cpu\n")
    assert main(["evolve", str(tmp_path / "config.yaml"), "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 2
    assert re.search(rf"template.yaml, line \d+: {message}", capsys.readouterr().err)
    assert not (tmp_path / "run").exists()
