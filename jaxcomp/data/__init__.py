"""Datasets and batch orders for training and evaluation.

Datasets are tfds builders written as array_record and read by index (no TensorFlow);
`TrainSampler` and `eval_batches` turn any such random-access source into deterministic,
resumable batches (grain).
"""

import importlib
import os
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
    "default_data_dir",
    "eval_batches",
    "fashion_mnist",
    "read_batch",
]


def default_data_dir() -> str:
  """Where tfds builders write: ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets`` (tfds's
  own default), for the configs' ``data.data_dir``.

  Example:
    >>> default_data_dir().endswith("tensorflow_datasets") or "TFDS_DATA_DIR" in os.environ
    True
  """
  return os.environ.get("TFDS_DATA_DIR",
                        os.path.join(os.path.expanduser("~"), "tensorflow_datasets"))


def __getattr__(name: str) -> Any:
  """``fashion_mnist`` and ``FashionMnist`` load on first use, so that ``python -m
  jaxcomp.data.fashion_mnist`` runs the module once (no import of it by its package first)."""
  if name in ("fashion_mnist", "FashionMnist"):
    module = importlib.import_module("jaxcomp.data.fashion_mnist")
    return module if name == "fashion_mnist" else module.FashionMnist
  raise AttributeError(f"module 'jaxcomp.data' has no attribute {name!r}")
