"""Pure model rewrites: `quantize`, `report`, `convert` for NNX and Linen; structured Llama
pruning that shrinks arrays (`structured`)."""

from jaxcomp.rewrite.api import quantize
from jaxcomp.rewrite.api import report
from jaxcomp.rewrite.convert import convert
from jaxcomp.rewrite.lora import add_lora
from jaxcomp.rewrite.lora import merge_lora
from jaxcomp.rewrite.structured import drop_blocks
from jaxcomp.rewrite.structured import llama_structured_keep
from jaxcomp.rewrite.structured import mask_llama
from jaxcomp.rewrite.structured import shrink_llama

__all__ = [
    "add_lora",
    "convert",
    "drop_blocks",
    "llama_structured_keep",
    "mask_llama",
    "merge_lora",
    "quantize",
    "report",
    "shrink_llama",
]
