"""Fixtures shared by the training tests."""

import os
from typing import Callable

import pytest


def _snapshot(path, exclude: tuple[str, ...] = ()) -> dict[str, bytes]:
  out = {}
  for base, _, files in os.walk(path):
    for name in files:
      p = os.path.join(base, name)
      rel = os.path.relpath(p, path)
      if rel not in exclude:
        with open(p, "rb") as f:
          out[rel] = f.read()
  return out


@pytest.fixture
def snapshot() -> Callable[..., dict[str, bytes]]:
  """`snapshot(dir, exclude=())`: every file's bytes under `dir` by relative path."""
  return _snapshot
