"""launch/local_multiprocess.sh: 2 processes x 4 CPU devices (gloo) train the same loss curve
as 1 process x 8 devices, FSDP-sharded, each process reading only its rows of the batch."""

import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _args(tmp_path, workdir):
  files = ",".join(str(tmp_path / f"doc{i}.txt") for i in range(2))
  return [f"--config={ROOT}/configs/smollm2_distill.py:w4_2of4,tiny",
          f"--config.data.files={files}", f"--config.data.data_dir={tmp_path / 'tfds'}",
          f"--config.eval.text_path={tmp_path / 'doc2.txt'}", "--config.mesh.shape.data=2",
          "--config.mesh.shape.fsdp=4", "--config.mesh.rules=fsdp", "--config.train.steps=4",
          f"--workdir={workdir}"]


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return ([r["step"] for r in rows if "loss" in r], [r["loss"] for r in rows if "loss" in r],
          [r["final/eval_ppl"] for r in rows if "final/eval_ppl" in r])


def test_two_processes_match_one_process_with_eight_devices(tmp_path, text_files):
  del text_files
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  fast = os.environ.get("JAXCOMP_TEST_XLA_FLAGS", "")  # the suite's compile flags (conftest)
  one = subprocess.run(
      [sys.executable, "-m", "jaxcomp", *_args(tmp_path, tmp_path / "one")], cwd=ROOT,
      env={**env, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {fast}"},
      capture_output=True, text=True, timeout=600)
  assert one.returncode == 0, one.stderr[-3000:]
  two = subprocess.run(
      ["bash", f"{ROOT}/launch/local_multiprocess.sh", "2", "4",
       *_args(tmp_path, tmp_path / "two")], cwd=ROOT,
      env={**env, "PYTHON": sys.executable, "LOG_DIR": str(tmp_path / "logs"),
           "EXTRA_XLA_FLAGS": fast},
      capture_output=True, text=True, timeout=600)
  logs = [(tmp_path / "logs" / f"process_{i}.log").read_text() for i in range(2)]
  assert two.returncode == 0, two.stderr[-1000:] + "".join(log[-2000:] for log in logs)
  assert "process 1 of 2, 4 local / 8 global devices" in logs[1]
  steps1, loss1, ppl1 = _losses(tmp_path / "one")
  steps2, loss2, ppl2 = _losses(tmp_path / "two")
  assert steps1 == steps2 == [2, 4]
  np.testing.assert_allclose(loss2, loss1, atol=1e-5, rtol=0)
  np.testing.assert_allclose(ppl2, ppl1, rtol=5e-5)  # float32 sums, another order
