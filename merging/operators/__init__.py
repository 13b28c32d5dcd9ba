"""The merge operators, by mergekit's method names.

Each operator is a pure tensor function wrapped in a ``MergeMethod`` (see ``base``) that
declares the recipe parameters it takes, with mergekit's defaults.
"""
from __future__ import annotations

from merging.errors import EvomergeError
from merging.operators.base import REQUIRED, MergeMethod, compute_dtype, kwarg_name
from merging.operators.arcee_fusion import ARCEE_FUSION
from merging.operators.karcher import KARCHER
from merging.operators.linear import LINEAR
from merging.operators.model_stock import MODEL_STOCK
from merging.operators.multislerp import MULTISLERP
from merging.operators.nearswap import NEARSWAP
from merging.operators.nuslerp import NUSLERP
from merging.operators.passthrough import PASSTHROUGH
from merging.operators.ram import RAM_METHODS
from merging.operators.sce import SCE
from merging.operators.slerp import SLERP  # the tensor helper: merging.operators.slerp.slerp
from merging.operators.task_arithmetic import TASK_ARITHMETIC_METHODS

METHODS: dict[str, MergeMethod] = {
    "linear": LINEAR,
    **TASK_ARITHMETIC_METHODS,
    "slerp": SLERP,
    "passthrough": PASSTHROUGH,
    **{m.name: m for m in (MODEL_STOCK, NUSLERP, MULTISLERP, KARCHER)},
    "nearswap": NEARSWAP,
    "arcee_fusion": ARCEE_FUSION,
    **RAM_METHODS,
    "sce": SCE,
}


class UnknownMethodError(EvomergeError, KeyError):
    """A merge method name that is not registered (both a KeyError and a user error)."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


def get_method(name: str) -> MergeMethod:
    """The registered method called ``name``; the error lists the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown merge method {name!r}; known: {', '.join(sorted(METHODS))}") from None


__all__ = ["METHODS", "REQUIRED", "MergeMethod", "UnknownMethodError", "compute_dtype",
           "get_method", "kwarg_name"]
