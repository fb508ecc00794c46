"""Evaluation: model size (and, with later issues, perplexity, accuracy, latency, reports)."""

from jaxcomp.eval.size import model_bits

__all__ = [
    "model_bits",
]
