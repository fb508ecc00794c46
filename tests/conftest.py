"""Session-wide test setup.

Forces 8 host (CPU) devices so that sharding tests can build a fake mesh, e.g.
``jax.make_mesh((2, 4), ("data", "model"))``. XLA reads ``XLA_FLAGS`` once,
when jax first initialises its backends, so this must run before any test
module imports jax; pytest imports this file first (also in each xdist worker,
which inherits the environment). Every other test keeps running on device 0.
An existing ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS`` wins.

``JAX_PLATFORMS=cpu`` (unless set): the suite runs on the host, and with the TPU / CUDA
plugins of the ``aot`` extra installed, jax would otherwise try (and fail, loudly on stderr)
to initialise them in every process; `jaxcomp.aot` still compiles for both.

A persistent XLA compilation cache shared by every process of the run (the xdist workers and
the CLI processes tests start inherit ``JAX_COMPILATION_CACHE_DIR``): resume and rerun tests
compile the same programs several times (tests/distill/test_resume.py: 100 s -> 67 s alone).
It starts empty each run (a fresh temporary directory, removed at exit), so no test depends
on an earlier run.

XLA:CPU compiles with LLVM at -O0, without its expensive passes and with its older elemental
emitters instead of the MLIR fusion emitters (``_FAST_COMPILE_FLAGS``, also in
``JAXCOMP_TEST_XLA_FLAGS`` for the CLI processes tests start): the suite mostly compiles small
programs once each (eager NNX code compiles one per primitive and shape). An ``XLA_FLAGS``
that sets the optimization level wins.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the controller; workers inherit it
  _CACHE = tempfile.mkdtemp(prefix="jaxcomp-tests-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  atexit.register(shutil.rmtree, _CACHE, True)

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count=8"
# The suite's time is mostly XLA:CPU compiling small programs once each (tests/serve/
# test_convert.py: 1894 compiles, 68 s of its 140 s in backend_compile). LLVM at -O0 without
# its expensive passes compiles them ~20% faster (that file and tests/rewrite/
# test_stacked_nnx.py: 100 s -> 79 s on 2 cores); the elemental emitters instead of the fusion
# emitters halve a one-op program's compile (33 -> 17 ms) and take test_convert.py from 117 s
# to 84 s. Numerics are IEEE either way (no fast-math); benchmarks and users keep XLA's
# defaults.
_FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
                       " --xla_cpu_use_fusion_emitters=false")

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = " ".join(
      f for f in (os.environ.get("XLA_FLAGS", ""), _DEVICE_COUNT_FLAG) if f
  )
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " " + _FAST_COMPILE_FLAGS
  # for the CLI processes tests start with XLA_FLAGS of their own (one host device)
  os.environ.setdefault("JAXCOMP_TEST_XLA_FLAGS", _FAST_COMPILE_FLAGS)


import random  # noqa: E402

import hypothesis  # noqa: E402
import pytest  # noqa: E402

# Property tests draw the same examples every run (a CI run passes or fails on the code alone,
# and never spends minutes shrinking a draw no earlier run saw); `HYPOTHESIS_PROFILE=explore`
# draws fresh ones, as hypothesis does by default. The tests' own settings keep their counts.
hypothesis.settings.register_profile("suite", derandomize=True, database=None)
hypothesis.settings.register_profile("explore")
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite"))

_WORDS = "the a of to and in that it was her she he had be not for his as with".split()


def write_text_files(directory):
  """Three small text files (doc0..doc2.txt) in ``directory``: doc0 and doc1 to train, doc2 to
  evaluate (text-LM and distillation runs)."""
  rng = random.Random(0)
  paths = []
  for i in range(3):
    path = directory / f"doc{i}.txt"
    path.write_text(" ".join(rng.choice(_WORDS) for _ in range(2000)))
    paths.append(path)
  return paths


@pytest.fixture
def text_files(tmp_path):
  """`write_text_files` in the test's ``tmp_path``."""
  return write_text_files(tmp_path)


@pytest.fixture(scope="module")
def module_text_files(tmp_path_factory):
  """`write_text_files` once per test module (for fixtures shared by its tests)."""
  return write_text_files(tmp_path_factory.mktemp("text"))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A small fake Fashion-MNIST (idx files -> the real tfds builder), learnable in a few
  steps: its tfds data directory."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jaxcomp.data import fashion_mnist as fm  # pylint: disable=import-outside-toplevel
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
