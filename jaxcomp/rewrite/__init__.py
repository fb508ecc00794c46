"""Pure model rewrites: `quantize` and `report` for NNX and Linen, LoRA adapters; the engine
(`jaxcomp.rewrite.engine`) that every transform shares."""

from jaxcomp.rewrite.api import quantize
from jaxcomp.rewrite.delayed import amax_overwrite
from jaxcomp.rewrite.delayed import calibrate_amax
from jaxcomp.rewrite.api import report
from jaxcomp.rewrite.lora import add_lora
from jaxcomp.rewrite.lora import merge_lora

__all__ = ["add_lora", "amax_overwrite", "calibrate_amax", "merge_lora", "quantize", "report"]
