"""Bad input through the CLI: one stderr line, exit 1, the workdir untouched; the workdir lock;
a finished run rerun; a torn metrics line; the quiet console. Tiny Fashion-MNIST config."""

import errno
import json
import os
import subprocess
import sys

import ml_collections
import pytest

from jaxcomp.train import metrics as metrics_lib
from jaxcomp.train import workdir as wd

CONFIG = "configs/fmnist_qat.py:w4a8_lsq,tiny"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu",  # one host device
       "XLA_FLAGS": os.environ.get("JAXCOMP_TEST_XLA_FLAGS", "")}
ENV.pop("JAXCOMP_TRACEBACK", None)


def _run(workdir, data_dir, *extra, config=CONFIG, module=("jaxcomp",)):
  cmd = [sys.executable, "-m", *module, f"--config={config}", f"--workdir={workdir}",
         f"--config.data.data_dir={data_dir}", *extra]
  return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def _stderr_lines(r):
  """stderr without the TPU runtime's start-up lines (libtpu is installed for jaxcomp.aot)."""
  return [l for l in r.stderr.splitlines()
          if l.strip() and not l.startswith(("I1", "W1", "E0", "WARNING: Logging before"))
          and "libtpu" not in l and "TPU" not in l and "Source Location" not in l]



@pytest.fixture
def finished(finished_fmnist_run):
  """A finished tiny run (24 steps; tests/train/conftest.py, shared with test_cli.py): the
  tests below leave its bytes as they found them."""
  return finished_fmnist_run


def _config_file(tmp_path, text):
  path = tmp_path / "exp.py"
  path.write_text(text)
  return str(path)


BAD_FILES = {
    "syntax": ("def get_config(:\n", "line 1: invalid syntax"),
    "name": ("import ml_collections\nX = undefined_name\ndef get_config():\n  return None\n",
             "line 2: NameError: name 'undefined_name' is not defined"),
    "raises": ("def get_config():\n  return 1 / 0\n", "line 2: ZeroDivisionError"),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_config_file_errors_name_the_file_and_line(kind, data_dir, tmp_path):
  text, message = BAD_FILES[kind]
  path = _config_file(tmp_path, text)
  r = _run(tmp_path / "w", data_dir, "--config.train.lr=0.1", config=path)
  assert r.returncode == 1
  lines = _stderr_lines(r)
  assert len(lines) == 1, lines
  assert lines[0].startswith(f"jaxcomp: error: config file {path}, ") and message in lines[0]
  assert not (tmp_path / "w").exists()


def test_missing_config_file_with_an_override_is_one_line(data_dir, tmp_path):
  r = _run(tmp_path / "w", data_dir, "--config.train.lr=0.1", config=str(tmp_path / "no.py"))
  assert r.returncode == 1
  assert _stderr_lines(r) == [f"jaxcomp: error: config file {tmp_path / 'no.py'} does not exist"]
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("args,message,fix", [
    (("--config.data.batch_size=0",), "data.batch_size must be a positive integer, got 0", False),
    (("--config.train.epochs=0",), "train.steps and train.epochs are both 0", False),
    (("--config.recipe.rules.all.pattern=nothing_is_called_this",),
     "strict: rule 'all' matched no layer", True),
])
def test_invalid_config_creates_no_workdir_and_the_fix_runs_there(args, message, fix, data_dir,
                                                                  tmp_path):
  work = tmp_path / "w"
  r = _run(work, data_dir, *args)
  assert r.returncode == 1
  lines = _stderr_lines(r)
  assert len(lines) == 1 and lines[0].startswith("jaxcomp: error:") and message in lines[0], lines
  assert not work.exists()  # validated before the workdir is created
  if fix:  # with no workdir left, the fixed run is the same whichever check refused: run it once
    fixed = _run(work, data_dir, "--config.train.epochs=1")
    assert fixed.returncode == 0, fixed.stderr[-2000:]


def test_bad_input_on_an_existing_workdir_leaves_its_bytes(finished, data_dir, snapshot):
  before = snapshot(finished)
  for args in (("--config.data.batch_size=0",), ("--config.train.lr=0.5",),
               ("--config.recipe.rules.all.pattern=nothing_is_called_this",)):
    r = _run(finished, data_dir, *args)
    assert r.returncode == 1 and len(_stderr_lines(r)) == 1, _stderr_lines(r)
    assert snapshot(finished) == before, args


def test_unwritable_workdir_is_one_line(data_dir, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  r = _run(blocker / "w", data_dir)
  assert r.returncode == 1
  assert _stderr_lines(r) == [f"jaxcomp: error: workdir {blocker / 'w'} cannot be written "
                              "(Not a directory)"]


def test_a_corrupt_cached_model_file_is_one_line_before_the_workdir(tmp_path):
  cache = tmp_path / "cache"
  cache.mkdir()
  (cache / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF" + bytes(4096))  # cut short
  r = subprocess.run([sys.executable, "-m", "jaxcomp", "--config=configs/smollm2_ptq.py:rtn_w4",
                      f"--workdir={tmp_path / 'w'}", f"--config.model.cache_dir={cache}"],
                     cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
  assert r.returncode == 1
  (line,) = _stderr_lines(r)
  assert line.startswith(f"jaxcomp: error: {cache}/SmolLM2-135M-Instruct.Q4_1.gguf: sha256 ")
  assert "truncated or corrupt" in line
  assert not (tmp_path / "w").exists()


def test_a_live_run_holds_the_workdir(finished, data_dir, snapshot):
  with wd.WorkdirLock(str(finished)):  # as a run in another process would hold it
    before = snapshot(finished)  # .lock holds this process's pid now
    os.remove(finished / "report.json")  # not finished: the rerun would train / evaluate
    try:
      r = _run(finished, data_dir)
    finally:
      (finished / "report.json").write_bytes(before["report.json"])
    after = snapshot(finished)
  assert r.returncode == 1
  lines = _stderr_lines(r)
  assert len(lines) == 1 and f"workdir {finished} is in use by another run (pid {os.getpid()})" \
      in lines[0], lines
  assert after == before


def test_rerun_of_a_finished_run_is_a_no_op_that_says_so(finished, data_dir, snapshot):
  before = snapshot(finished)
  r = _run(finished, data_dir)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "holds a finished run of this config: nothing to do" in r.stderr
  assert "test_accuracy" in r.stdout  # the report, printed again
  assert snapshot(finished) == before


def test_torn_last_metrics_line_is_dropped_and_the_run_completes(finished, data_dir, tmp_path,
                                                                 snapshot):
  work = tmp_path / "w"
  os.makedirs(work)
  for name, data in snapshot(finished).items():
    if name != "report.json":  # evaluate again: the final metrics row is rewritten
      os.makedirs(os.path.dirname(work / name), exist_ok=True)
      (work / name).write_bytes(data)
  rows = (work / "metrics.jsonl").read_text()
  (work / "metrics.jsonl").write_text(rows[:-25])  # killed while writing the final row
  r = _run(work, data_dir)
  assert r.returncode == 0, r.stderr[-2000:]
  assert any("dropped a torn last line" in l for l in _stderr_lines(r))
  got = [json.loads(l) for l in (work / "metrics.jsonl").read_text().splitlines()]
  want = [json.loads(l) for l in rows.splitlines()]
  strip = lambda rs: [{k: v for k, v in r.items() if "time" not in k} for r in rs]
  assert strip(got) == strip(want)  # every row once, none duplicated


def test_metric_writer_never_duplicates_and_names_a_bad_middle_line(tmp_path):
  w = metrics_lib.MetricWriter(str(tmp_path), start_step=0)
  w.write(1, {"loss": 1.0})
  w.write(2, {"loss": 0.5})
  w.close()
  w = metrics_lib.MetricWriter(str(tmp_path), start_step=2)  # a resumed run logs step 2 again
  w.write(2, {"loss": 0.5})
  w.write(3, {"loss": 0.25})
  w.close()
  assert [r["step"] for r in metrics_lib.read_metrics(str(tmp_path / "metrics.jsonl"))] == [1, 2, 3]
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  (tmp_path / "metrics.jsonl").write_text("\n".join([lines[0], "{oops", lines[2]]) + "\n")
  with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not a metrics row"):
    metrics_lib.read_metrics(str(tmp_path / "metrics.jsonl"))


def test_full_disk_leaves_no_half_written_file(tmp_path, monkeypatch):
  real_open = open

  def full(path, mode="r", *a, **k):
    f = real_open(path, mode, *a, **k)
    if "w" in mode:
      def write(_):
        raise OSError(errno.ENOSPC, "No space left on device")
      f.write = write
    return f

  (tmp_path / "config.json").write_text("{}")
  monkeypatch.setattr("builtins.open", full)
  with pytest.raises(wd.WorkdirError, match=r"cannot write .*config.json \(No space left"):
    wd.write_json_atomic(str(tmp_path / "config.json"), {"a": 1})
  monkeypatch.undo()
  assert sorted(os.listdir(tmp_path)) == ["config.json"]
  assert (tmp_path / "config.json").read_text() == "{}"


def test_sanity_warnings_for_legal_but_wrong_learning_rates():
  c = ml_collections.ConfigDict({"train": {"lr": -0.01}, "stage": {"kd": {"lr": 3.0}}})
  got = wd.sanity_warnings(c)
  assert any(w.startswith("train.lr=-0.01 is negative") for w in got)
  assert any(w.startswith("stage.kd.lr=3 is above 1") for w in got)
  assert wd.sanity_warnings(ml_collections.ConfigDict({"train": {"lr": 1e-3}})) == []


def test_negative_lr_warns_on_the_console_and_libraries_stay_in_the_log(data_dir, tmp_path):
  work = tmp_path / "w"
  r = _run(work, data_dir, "--config.train.lr=-0.01")
  assert r.returncode == 0, r.stderr[-2000:]
  lines = _stderr_lines(r)
  assert "jaxcomp: warning: train.lr=-0.01 is negative: each step climbs the loss" in lines
  assert all(l.startswith("jaxcomp: ") for l in lines), lines  # no orbax / tfds lines
  log = (work / "jaxcomp.log").read_text()
  assert "checkpoint_manager.py" in log and "train.lr=-0.01 is negative" in log


def test_fashion_mnist_module_runs_without_an_import_cycle_warning():
  r = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m",
                      "jaxcomp.data.fashion_mnist", "--help"], cwd=ROOT, env=ENV,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "found in sys.modules" not in r.stderr
