"""The CLI on the tiny Fashion-MNIST config: one-line bad-input errors, a workdir of another
config, every checkpoint corrupt, a NaN loss. (SIGKILL and resume: tests/train/test_integrity.py.)

The dataset is a small fake one written by the test (idx files -> the real tfds builder).
"""

import os
import shutil
import subprocess
import sys

import pytest


CONFIG = "configs/fmnist_qat.py:w4a8_lsq,tiny"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu",  # one host device
       "XLA_FLAGS": os.environ.get("JAXCOMP_TEST_XLA_FLAGS", "")}


def _cmd(workdir, data_dir, *extra, config=CONFIG):
  return [sys.executable, "-m", "jaxcomp", f"--config={config}", f"--workdir={workdir}",
          f"--config.data.data_dir={data_dir}", *extra]


def _run(*args, **kwargs):
  return subprocess.run(_cmd(*args, **kwargs), cwd=ROOT, env=ENV, capture_output=True,
                        text=True, timeout=600)



@pytest.mark.parametrize("args,message", [
    ((), "unknown variant 'w9'"),
    (("--config.train.lrr=1",), "bad config override (--config.train.lrr)"),
])
def test_bad_config_is_one_line(data_dir, tmp_path, args, message):
  config = "configs/fmnist_qat.py:w9" if not args else CONFIG
  r = _run(tmp_path / "w", data_dir, *args, config=config)
  assert r.returncode == 1
  lines = r.stderr.strip().splitlines()
  assert lines[-1].startswith("jaxcomp: error:") and message in lines[-1]
  assert len([l for l in lines if not l.startswith(("I1", "W1"))]) == 1
  assert not (tmp_path / "w").exists()


def test_missing_dataset_says_how_to_prepare(tmp_path):
  r = _run(tmp_path / "w", str(tmp_path / "nothing"))
  assert r.returncode == 1
  last = r.stderr.strip().splitlines()[-1]
  assert "is not prepared" in last and "python -m jaxcomp.data.fashion_mnist" in last


def test_workdir_of_another_config_and_corrupt_checkpoint(data_dir, tmp_path, snapshot,
                                                         finished_fmnist_run):
  work = tmp_path / "w"
  shutil.copytree(finished_fmnist_run, work)  # a finished run of CONFIG (tests/train/conftest.py)
  before = snapshot(work)

  other = _run(work, data_dir, "--config.train.lr=0.01")
  assert other.returncode == 1
  assert "holds a run of a different config (train.lr" in other.stderr.strip().splitlines()[-1]
  assert snapshot(work) == before

  steps = sorted(int(s) for s in os.listdir(work / "checkpoints") if s.isdigit())
  for step in steps:  # every one: a bad newest step alone falls back (tests/train/test_integrity)
    for base, _, files in os.walk(work / "checkpoints" / str(step)):
      for name in files:
        if name != "_CHECKPOINT_METADATA":
          with open(os.path.join(base, name), "r+b") as f:
            f.write(b"\0garbage" * 8)
  os.remove(work / "report.json")  # else the rerun of a finished run is a no-op
  bookkeeping = (".lock", "jaxcomp.log")  # a rerun takes the lock and logs to the workdir
  corrupted = snapshot(work, bookkeeping)
  r = _run(work, data_dir)
  assert r.returncode == 1
  for step in steps:  # one warning line each, newest first, then the error
    assert f"warning: checkpoint {work / 'checkpoints'}/{step} cannot be restored" in r.stderr
  assert r.stderr.strip().splitlines()[-1].startswith(
      f"jaxcomp: error: no good checkpoint in {work / 'checkpoints'} (step {steps[-1]} ")
  assert snapshot(work, bookkeeping) == corrupted


def test_nan_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
  work = tmp_path / "w"
  r = _run(work, data_dir, "--config.train.lr=1e30", "--config.train.grad_clip=1e30")
  assert r.returncode == 1
  assert "loss is not finite" in r.stderr.strip().splitlines()[-1]
  assert not (work / "report.json").exists()
  shutil.rmtree(work)
