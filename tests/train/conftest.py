"""Fixtures shared by the training tests."""

import os
import subprocess
import sys
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


_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def finished_fmnist_run(data_dir, tmp_path_factory):
  """A finished run of the tiny Fashion-MNIST config (``configs/fmnist_qat.py:w4a8_lsq,tiny``
  with its defaults: 24 steps) through the CLI, shared by the tests of tests/train/test_cli.py
  and test_workdir.py. Tests that change it work on a copy."""
  work = tmp_path_factory.mktemp("finished") / "w"
  env = {**os.environ, "JAX_PLATFORMS": "cpu",  # one host device
         "XLA_FLAGS": os.environ.get("JAXCOMP_TEST_XLA_FLAGS", "")}
  env.pop("JAXCOMP_TRACEBACK", None)
  r = subprocess.run([sys.executable, "-m", "jaxcomp", "--config=configs/fmnist_qat.py:w4a8_lsq,tiny",
                      f"--workdir={work}", f"--config.data.data_dir={data_dir}"],
                     cwd=_ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  return work
