"""Preemption-safe distillation through the CLI: SIGKILL at a random step then rerun, and
SIGTERM (clean stop: checkpoint, exit status 75) then rerun, both end with params bitwise
identical to an uninterrupted run."""

import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu",  # this process's topology, the suite's compile flags
       "XLA_FLAGS": "--xla_force_host_platform_device_count=8 "
                    + os.environ.get("JAXCOMP_TEST_XLA_FLAGS", "")}
STEPS = 16  # checkpoints every 4: the kills below land after 4, 8 or 12


def _cmd(workdir, files, tmp):
  return [sys.executable, "-m", "jaxcomp",
          f"--config={ROOT}/configs/smollm2_distill.py:w4_2of4,tiny", f"--workdir={workdir}",
          f"--config.data.files={files[0]},{files[1]}", f"--config.data.data_dir={tmp}/tfds",
          f"--config.eval.text_path={files[2]}", f"--config.train.steps={STEPS}"]


def _final_params(workdir):
  state = ocp.StandardCheckpointer().restore(
      os.path.join(workdir, "checkpoints", str(STEPS), "default"))
  return state["params"], state["opt_state"]


def _wait_for(path, proc, timeout=300):
  deadline = time.time() + timeout
  while not os.path.isdir(path):
    assert proc.poll() is None, "the run ended before the checkpoint appeared"
    assert time.time() < deadline, f"no {path} after {timeout} s"
    time.sleep(0.05)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, module_text_files):
  """The text files and one uninterrupted run, shared by the tests of this module."""
  tmp = tmp_path_factory.mktemp("resume")
  files = module_text_files
  run = subprocess.run(_cmd(tmp / "clean", files, tmp), cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  return tmp, files, tmp / "clean"


def _assert_same_final(a, b):
  pa, oa = _final_params(a)
  pb, ob = _final_params(b)
  for x, y in zip(jax.tree.leaves((pa, oa)), jax.tree.leaves((pb, ob))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # bitwise


def test_sigkill_at_a_random_step_then_rerun_is_bitwise_identical(setup):
  tmp_path, text_files, clean_run = setup
  after = random.Random(os.getpid()).choice([4, 8, 12])  # checkpoints come every 4 steps
  killed = tmp_path / "killed"
  proc = subprocess.Popen(_cmd(killed, text_files, tmp_path), cwd=ROOT, env=ENV,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  _wait_for(killed / "checkpoints" / str(after), proc)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL
  rerun = subprocess.run(_cmd(killed, text_files, tmp_path), cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  _assert_same_final(clean_run, killed)


def test_sigterm_checkpoints_exits_75_and_resumes_identically(setup):
  tmp_path, text_files, clean_run = setup
  stopped = tmp_path / "stopped"
  proc = subprocess.Popen(_cmd(stopped, text_files, tmp_path), cwd=ROOT, env=ENV,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  _wait_for(stopped / "checkpoints" / "4", proc)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 75, err[-3000:]
  line = [l for l in err.splitlines() if "stopped by SIGTERM" in l]
  assert line, err[-3000:]
  step = int(line[0].split("after step ")[1].split(";")[0])
  assert os.path.isdir(stopped / "checkpoints" / str(step))  # the stop step was saved
  rerun = subprocess.run(_cmd(stopped, text_files, tmp_path), cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  _assert_same_final(clean_run, stopped)
