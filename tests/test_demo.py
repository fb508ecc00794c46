"""The main job (`make demo`) runs end to end on a few steps and reports every variant."""

import os
import subprocess
import sys

import jaxcomp.demo


def test_demo_runs_and_reports_every_variant():
  # one host device, as `make demo` runs
  env = {**os.environ, "XLA_FLAGS": os.environ.get("JAXCOMP_TEST_XLA_FLAGS", "")}
  out = subprocess.run(
      [sys.executable, "-m", "jaxcomp.demo", "--float_steps=4", "--qat_steps=2"],
      capture_output=True, text=True, env=env, timeout=600, check=True).stdout
  for name in ["float32 + fine-tune", *jaxcomp.demo.VARIANTS]:
    row = next(line for line in out.splitlines() if line.startswith(name))
    accuracy = float(row[len(name):].split()[-3])
    assert 0.0 <= accuracy <= 1.0


def test_fibonacci_task():
  import jax
  tokens = jaxcomp.demo.fibonacci_batch(jax.random.key(0), batch=3)
  assert tokens.shape == (3, jaxcomp.demo.SEQ)
  assert bool(((tokens[:, :-2] + tokens[:, 1:-1]) % jaxcomp.demo.VOCAB == tokens[:, 2:]).all())
