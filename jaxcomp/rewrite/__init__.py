"""Pure model rewrites: `quantize(model, recipe)` and `report(model, recipe)` for NNX and Linen."""

from jaxcomp.rewrite.api import quantize
from jaxcomp.rewrite.convert import convert
from jaxcomp.rewrite.api import report

__all__ = [
    "convert",
    "quantize",
    "report",
]
