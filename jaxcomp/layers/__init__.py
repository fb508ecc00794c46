"""Flax NNX modules that rewrites put in place of (or into) the original layers."""

from jaxcomp.layers.quant import AmaxHistory
from jaxcomp.layers.quant import QuantConv
from jaxcomp.layers.quant import QuantDot
from jaxcomp.layers.quant import QuantEinsum
from jaxcomp.layers.quant import QuantEmbed
from jaxcomp.layers.quant import QuantScale

__all__ = [
    "AmaxHistory",
    "QuantConv",
    "QuantDot",
    "QuantEinsum",
    "QuantEmbed",
    "QuantScale",
]
