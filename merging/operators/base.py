"""The shared interface of every merge operator.

An operator is a pure function on tensors: it never reads files and knows nothing of
recipes. The engine resolves a recipe's parameters for one tensor and calls

    method.merge(base=..., tensors=[...], generator=..., **params)

where ``tensors`` are the non-base models in recipe order, every per-model parameter
arrives as a list aligned with ``tensors`` and every global parameter as a scalar.
Operators compute in float32 (float64 when any input is float64, which the tests use
for references) and return the result in that compute dtype; casting to the output
dtype is the engine's job.
"""
from __future__ import annotations

import keyword
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

REQUIRED = object()
"""Marks a parameter with no default: a recipe must give it."""


@dataclass(frozen=True)
class Domain:
    """The values a numeric parameter takes. A search's free marker must keep its bounds
    inside (niches/genome.py), so that it never proposes a value the method cannot use
    (a slerp ``t`` of 1.3, a ``select_topk`` of 0); an integer parameter is searched in
    whole numbers. Plain recipes are not held to it: mergekit does not check them."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def contains(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        kind = "integers" if self.integer else "numbers"
        if math.isinf(self.low) and math.isinf(self.high):
            return f"any {kind[:-1]}"
        if math.isinf(self.high):
            return f"{kind} {'>' if self.low_open else '>='} {self.low:g}"
        interval = f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        return interval if not self.integer else f"{kind} in {interval}"


REAL = Domain()
UNIT = Domain(0.0, 1.0)
FRACTION = Domain(0.0, 1.0, low_open=True)
"""A share of entries to keep: (0, 1] (none kept is not a merge)."""
NON_NEGATIVE = Domain(0.0)
POSITIVE = Domain(0.0, low_open=True)
COUNT = Domain(0.0, integer=True)


def kwarg_name(param: str) -> str:
    """Recipe parameter name -> Python keyword argument (``lambda`` -> ``lambda_``)."""
    return param + "_" if keyword.iskeyword(param) else param


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64 (test references), else float32."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


@dataclass(frozen=True)
class MergeMethod:
    """A named merge method: its function and the parameters a recipe may set.

    ``model_params`` are set per source model (mergekit's ``models[].parameters``),
    ``global_params`` once per merge (mergekit's top-level ``parameters``); both map a
    name to its default or ``REQUIRED``. ``needs_base``: a base model is mandatory
    (task-vector methods, slerp); ``optional_base``: one is used when the recipe names it
    (nuslerp's and multislerp's task-vector mode). Either way the base arrives as ``base``,
    not among ``tensors``. ``random``: the method draws random numbers and is given a
    seeded ``torch.Generator``. ``domains``: every numeric parameter with the values it
    takes (what a search may make free); the others are switches (true/false), which a
    search leaves alone. ``check_model_params``: given one model's resolved
    per-model parameters for one tensor, says why they cannot be merged (or None), so
    that the plan refuses them before any tensor is computed. ``rowwise``: each row of
    the output depends only on the same rows of the inputs, so the engine may merge a
    large tensor a few rows at a time (merging/rowwise.py), bit for bit as whole; a
    rowwise method with a ``trim`` (the sparsifying task-vector methods) first needs, per
    model, what it keeps of the whole delta (``model_trim``), and is then given the rows'
    ``trims``.
    """

    name: str
    function: Callable[..., torch.Tensor]
    needs_base: bool
    model_params: Mapping[str, Any] = field(default_factory=dict)
    global_params: Mapping[str, Any] = field(default_factory=dict)
    random: bool = False
    optional_base: bool = False
    min_models: int = 1
    max_models: int | None = None
    check_model_params: Callable[[dict[str, Any]], str | None] | None = None
    domains: Mapping[str, Domain] = field(default_factory=dict)
    rowwise: bool = False
    trim: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        unknown = set(self.domains) - set(self.model_params) - set(self.global_params)
        if unknown:
            raise ValueError(f"{self.name}: domains name parameters it does not take: {sorted(unknown)}")

    @property
    def takes_base(self) -> bool:
        """Whether a base model the recipe names is passed apart, as ``base``."""
        return self.needs_base or self.optional_base

    def model_trim(self, magnitudes: torch.Tensor, index: int, params: Mapping[str, Any],
                   generator: torch.Generator | None, *, overwrite: bool = False) -> Any:
        """Model ``index``'s trim of one tensor from its ``|delta|`` (``overwrite``: which
        the trim may use as scratch space), given the tensor's resolved ``params``."""
        kwargs = {kwarg_name(k): (v[index] if k in self.model_params else v) for k, v in params.items()}
        return self.trim(magnitudes, generator=generator, overwrite=overwrite, **kwargs)

    def merge(
        self,
        *,
        base: torch.Tensor | None,
        tensors: Sequence[torch.Tensor],
        generator: torch.Generator | None = None,
        **params: Any,
    ) -> torch.Tensor:
        kwargs = {kwarg_name(k): v for k, v in params.items()}
        if self.random:
            kwargs["generator"] = generator
        return self.function(base=base, tensors=list(tensors), **kwargs)
