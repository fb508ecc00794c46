"""Datasets and batch orders for training and evaluation.

Datasets are tfds builders written as array_record and read by index (no TensorFlow);
`TrainSampler` and `eval_batches` turn any such random-access source into deterministic,
resumable batches (grain).
"""

import importlib
from typing import Any

from jaxcomp.data.sampler import InMemorySource
from jaxcomp.data.sampler import RandomAccessSource
from jaxcomp.data.sampler import TrainSampler
from jaxcomp.data.sampler import eval_batches
from jaxcomp.data.sampler import read_batch

__all__ = [
    "FashionMnist",
    "InMemorySource",
    "RandomAccessSource",
    "TrainSampler",
    "eval_batches",
    "fashion_mnist",
    "read_batch",
]


def __getattr__(name: str) -> Any:
  """``fashion_mnist`` and ``FashionMnist`` load on first use, so that ``python -m
  jaxcomp.data.fashion_mnist`` runs the module once (no import of it by its package first)."""
  if name in ("fashion_mnist", "FashionMnist"):
    module = importlib.import_module("jaxcomp.data.fashion_mnist")
    return module if name == "fashion_mnist" else module.FashionMnist
  raise AttributeError(f"module 'jaxcomp.data' has no attribute {name!r}")
