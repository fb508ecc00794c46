"""Pod dry runs: a config's real training step compiled for a TPU slice that is not here
(`jaxcomp.train.loop.compile_step`, ``python -m jaxcomp --compile_only --topology``), from the
model's shapes alone: no data, weights or checkpoints read."""

import json
import os
import subprocess
import sys

import pytest

from jaxcomp import aot
from jaxcomp.train.loop import compile_step

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
needs_libtpu = pytest.mark.skipif(bool(aot.missing("tpu")), reason=str(aot.missing("tpu")))


def _config(rules="fsdp", **mesh):
  sys.path.insert(0, os.path.join(ROOT, "configs"))
  try:
    from smollm2_distill import get_config  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  config = get_config("w4_2of4,tiny")
  config.data.files = "/nonexistent/never_read.txt"  # a dry run reads no data
  config.mesh.rules = rules
  config.mesh.shape.update(mesh)
  return config


@needs_libtpu
def test_distill_step_compiles_for_a_slice_from_shapes_alone(tmp_path):
  report = compile_step(_config(data=2, fsdp=2), str(tmp_path), "v5e:2x2")
  assert report["topology"] == "v5e:2x2" and report["devices"] == 4
  assert report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
  assert 0 < report["peak_gib"] < report["hbm_gib"] and report["fits"]
  assert report["alias_gib"] > 0  # the donated state is updated in place
  assert report["params"] > 100_000  # the student (the teacher is frozen, not a param)
  saved = json.loads((tmp_path / "compile_report.json").read_text())
  assert saved["target"] == "v5e:2x2" and saved["peak_bytes"] > 0
  assert not (tmp_path / "config.json").exists()  # the workdir stays free for the real run


@needs_libtpu
def test_bad_mesh_and_batch_are_one_line(tmp_path):
  with pytest.raises(ValueError, match=r"mesh.shape .* does not divide the 4 devices"):
    compile_step(_config(data=3, fsdp=-1), str(tmp_path), "v5e:2x2")
  config = _config(data=4)
  config.data.batch_size = 6
  with pytest.raises(ValueError, match=r"data.batch_size=6 does not divide over the 4 devices"):
    compile_step(config, str(tmp_path), "v5e:2x2")
  config = _config()
  config.student.factorize = {"reduction": 0.3, "method": "svd"}
  with pytest.raises(ValueError, match="factorize cannot be compiled without weights"):
    compile_step(config, str(tmp_path), "v5e:2x2")


def test_cli_says_what_is_wrong_in_one_line(tmp_path):
  base = [sys.executable, "-m", "jaxcomp", f"--config={ROOT}/configs/smollm2_distill.py:w4_2of4,tiny",
          f"--workdir={tmp_path}"]
  for extra, message in [(["--compile_only"], "--compile_only and --topology go together"),
                         (["--compile_only", "--topology=v9x"], "target must be one of")]:
    run = subprocess.run(base + extra, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 1, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("jaxcomp: error:") and message in last, last
