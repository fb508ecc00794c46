"""Every docstring example in jaxcomp.data runs and prints what it says (Debian-only ones skip)."""

import doctest
import importlib

import numpy as np
import pytest


@pytest.mark.parametrize("name", ["jaxcomp.data.sampler", "jaxcomp.data.fashion_mnist",
                                  "jaxcomp.data.text", "jaxcomp.data.calibration"])
def test_docstring_examples(name):
  module = importlib.import_module(name)
  flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
  result = doctest.testmod(module, globs={**vars(module), "np": np}, optionflags=flags)
  assert result.attempted > 0 and result.failed == 0
