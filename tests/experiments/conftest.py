"""Shared fixtures of the experiment tests: small training / evaluation texts."""

import numpy as np
import pytest


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
  """A directory with ``train.txt`` (3000 words) and ``eval.txt`` (600 words)."""
  d = tmp_path_factory.mktemp("texts")
  rng = np.random.default_rng(0)
  words = "the of and a to in is was that for it with as his on be at by he".split()
  for name, n in (("train.txt", 3000), ("eval.txt", 600)):
    (d / name).write_text(" ".join(rng.choice(words, n)))
  return d
