"""Evaluation: model size (`model_bits`) and perplexity (`jaxcomp.eval.perplexity`).

`jaxcomp.eval.perplexity` is a module (``perplexity``, ``wikitext2``, ``read_text``,
``window_spans``); it is not re-exported here so that the module name is not shadowed.
"""

from jaxcomp.eval import perplexity
from jaxcomp.eval.size import model_bits

__all__ = [
    "model_bits",
    "perplexity",
]
