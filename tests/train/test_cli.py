"""The CLI on the tiny Fashion-MNIST config: resume after SIGKILL, and one-line bad-input errors.

The dataset is a small fake one written by the test (idx files -> the real tfds builder).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest


CONFIG = "configs/fmnist_qat.py:w4a8_lsq,tiny"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}


def _cmd(workdir, data_dir, *extra, config=CONFIG):
  return [sys.executable, "-m", "jaxcomp", f"--config={config}", f"--workdir={workdir}",
          f"--config.data.data_dir={data_dir}", *extra]


def _run(*args, **kwargs):
  return subprocess.run(_cmd(*args, **kwargs), cwd=ROOT, env=ENV, capture_output=True,
                        text=True, timeout=600)


def _metric_rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [{k: v for k, v in r.items() if "time" not in k} for r in rows]



def test_sigkill_then_rerun_matches_uninterrupted_run(data_dir, tmp_path):
  extra = ("--config.train.epochs=12",)  # 96 steps, checkpoints every 4
  clean = _run(tmp_path / "clean", data_dir, *extra)
  assert clean.returncode == 0, clean.stderr[-2000:]

  killed = tmp_path / "killed"
  proc = subprocess.Popen(_cmd(killed, data_dir, *extra), cwd=ROOT, env=ENV,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not os.path.isdir(killed / "checkpoints" / "24") and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL
  assert not (killed / "report.json").exists()  # it really died mid-run
  resumed = _run(killed, data_dir, *extra)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resumed from" in resumed.stderr

  a = json.loads((tmp_path / "clean" / "report.json").read_text())
  b = json.loads((killed / "report.json").read_text())
  for key in ("test_accuracy", "test_loss", "steps", "model_bytes"):
    assert a[key] == b[key], key
  assert _metric_rows(tmp_path / "clean") == _metric_rows(killed)


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


def test_workdir_of_another_config_and_corrupt_checkpoint(data_dir, tmp_path, snapshot):
  work = tmp_path / "w"
  assert _run(work, data_dir).returncode == 0
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
