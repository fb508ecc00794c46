"""A small fake Fashion-MNIST (idx files -> the real tfds builder), learnable in a few steps."""

import numpy as np
import pytest

from jaxcomp.data import fashion_mnist as fm


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  src = tmp_path_factory.mktemp("fmnist_src")
  rng = np.random.default_rng(0)
  for split, n in (("train", 256), ("t10k", 96)):
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = (rng.random((n, 28, 28)) * 60).astype(np.uint8)
    for i, label in enumerate(labels):  # learnable: a bright bar at a label-dependent row
      images[i, 2 + 2 * label:4 + 2 * label, 4:24] = 250
    fm.write_idx(src / f"{split}-images-idx3-ubyte.gz", images)
    fm.write_idx(src / f"{split}-labels-idx1-ubyte.gz", labels)
  out = tmp_path_factory.mktemp("tfds")
  fm.prepare(str(out), str(src))
  return str(out)
