"""Datasets and batch orders for training and evaluation.

Datasets are tfds builders written as array_record and read by index (no TensorFlow);
`TrainSampler` and `eval_batches` turn any such random-access source into deterministic,
resumable batches (grain).
"""

from jaxcomp.data import fashion_mnist
from jaxcomp.data.fashion_mnist import FashionMnist
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
