"""Integrity of training checkpoints: each step's manifest of array digests is checked at restore.

In-process (`Checkpointer` on a small pytree): a bit flipped in a step's data files is detected
and the restore falls back to the step before with a one-line warning naming the step (and the
array, when the flip reaches one); a sweep of flips over every file of a step never restores
different values silently; no good step left is one `CheckpointError` line.

Through the CLI (tiny Fashion-MNIST run, 96 steps, a checkpoint every 4): a corrupt newest
checkpoint is skipped and the rerun ends bitwise equal to an uninterrupted run; and the
fault-injection loop: SIGKILL at random times during checkpoint saves (3 tries, fixed seed),
then a resume to the end, gives final params bitwise equal to the uninterrupted run's.
"""

import gc
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxcomp.train.checkpoint import CheckpointError, Checkpointer
import bitflip

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu",  # one host device
       "XLA_FLAGS": os.environ.get("JAXCOMP_TEST_XLA_FLAGS", "")}
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax writes <step>.orbax-checkpoint-tmp, then renames

# A failed orbax restore leaves its other reads' coroutines to be collected once its event loop
# is closed ("Event loop is closed"); the CLI sends them to the workdir's log.
pytestmark = [pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
              pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")]


def _state(seed):
  r = np.random.default_rng(seed)
  return {"step": jnp.int32(seed),
          "params": {"w": jnp.asarray(r.standard_normal((128, 128), np.float32)),
                     "b": jnp.asarray(r.standard_normal((32,), np.float32)),
                     "e": jnp.asarray(r.standard_normal((64, 32)), jnp.bfloat16)},
          "rng": jnp.asarray([seed, 7], jnp.uint32)}


def _equal(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _restore(directory, caplog):
  """(restored state, the warning lines logged) of a fresh Checkpointer's restore_latest."""
  caplog.clear()
  ckpt = Checkpointer(str(directory), every=1, keep=5)
  try:
    with caplog.at_level(logging.WARNING):
      state = ckpt.restore_latest(_state(0))
  finally:
    ckpt.close()
  return state, [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.fixture
def two_steps(tmp_path):
  """Steps 1 and 2 of `_state` saved by a Checkpointer (with manifests)."""
  ckpt = Checkpointer(str(tmp_path / "ckpt"), every=1, keep=5)
  ckpt.save(1, _state(1))
  ckpt.save(2, _state(2))
  ckpt.close()
  yield tmp_path / "ckpt"
  gc.collect()  # failed restores' abandoned coroutines: collected here, under pytestmark


def test_a_good_checkpoint_restores_silently(two_steps, caplog):
  state, warnings = _restore(two_steps, caplog)
  assert _equal(state, _state(2)) and warnings == []
  manifest = json.loads((two_steps / "2" / "manifest" / "metadata").read_text())
  assert set(manifest["arrays"]) == {"step", "params/w", "params/b", "params/e", "rng"}


def test_bit_flips_in_the_data_files_fall_back_to_the_previous_step(two_steps, caplog):
  # The largest data file holds the arrays' (compressed) chunks, the data file of the
  # top-level ocdbt the merged b-tree with the small arrays inline: flips at fractions of both.
  files = bitflip.data_files(two_steps / "2" / "default")
  top = bitflip.top_level(files, two_steps / "2" / "default")
  positions = [(files[0], 0.1), (files[0], 0.3), (files[0], 0.5), (files[0], 0.7),
               (top[0], 0.3), (top[0], 0.6)]
  named = 0
  for path, fraction in positions:
    pos = int(fraction * os.path.getsize(path))
    with bitflip.flipped(path, pos):
      state, warnings = _restore(two_steps, caplog)
    where = f"{os.path.relpath(path, two_steps)}@{pos}"
    assert _equal(state, _state(1)), where  # fell back to step 1
    assert len(warnings) == 1 and "\n" not in warnings[0], (where, warnings)
    assert warnings[0].startswith(f"checkpoint {two_steps}/2 "), warnings
    assert "failed verification" in warnings[0] or "cannot be restored" in warnings[0]
    named += "failed verification: params/" in warnings[0]
  assert named >= 2  # flips that decode to other values are named by the array's tree path


def test_a_changed_array_is_named(two_steps, caplog):
  """Step 2's state item swapped for one whose params/w differs in one bit (valid files, so
  only the manifest can tell): the warning names params/w."""
  tampered = _state(2)
  w = np.asarray(tampered["params"]["w"]).copy()
  w.view(np.uint32)[5, 7] ^= 1 << 3
  tampered["params"]["w"] = jnp.asarray(w)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(two_steps / "tampered", tampered)
  shutil.rmtree(two_steps / "2" / "default")
  shutil.move(two_steps / "tampered", two_steps / "2" / "default")
  state, warnings = _restore(two_steps, caplog)
  assert _equal(state, _state(1))
  assert warnings == [f"checkpoint {two_steps}/2 failed verification: params/w differs from its "
                      "manifest digest (1 of 5 arrays); trying the one before"]


def test_a_sweep_of_flips_never_restores_other_values_silently(two_steps, caplog):
  """Every file of the step (metadata included), flips ~every 1/12 of it: each one falls back
  to step 1 with a warning, or restores step 2 bitwise (bytes nothing reads, e.g. the
  per-process b-tree merged into the top-level one, or timestamps)."""
  outcomes = {"fell back": 0, "harmless": 0}
  for path in bitflip.files(two_steps / "2"):
    size = os.path.getsize(path)
    for pos in sorted({int(k * size / 12) for k in range(12)}):
      with bitflip.flipped(path, pos):
        state, warnings = _restore(two_steps, caplog)
      if _equal(state, _state(2)):
        outcomes["harmless"] += 1
      else:
        assert _equal(state, _state(1)), (path, pos)
        assert len(warnings) == 1 and f"checkpoint {two_steps}/2 " in warnings[0], warnings
        outcomes["fell back"] += 1
  assert outcomes["fell back"] >= 40, outcomes


def test_no_good_step_left_is_one_line_and_nothing_is_deleted(two_steps, caplog):
  for step in (1, 2):
    path = bitflip.data_files(two_steps / str(step) / "default")[0]
    bitflip.flip(path, os.path.getsize(path) // 3)
  before = {f: open(f, "rb").read() for f in bitflip.files(two_steps)}
  with pytest.raises(CheckpointError) as e:
    _restore(two_steps, caplog)
  message = str(e.value)
  assert "\n" not in message and message.startswith(f"no good checkpoint in {two_steps} (step 2 ")
  assert "; step 1 " in message and "use a new --workdir" in message
  assert {f: open(f, "rb").read() for f in bitflip.files(two_steps)} == before


def test_the_next_save_replaces_a_bad_step(two_steps, caplog):
  path = bitflip.data_files(two_steps / "2" / "default")[0]
  bitflip.flip(path, os.path.getsize(path) // 2)
  ckpt = Checkpointer(str(two_steps), every=1, keep=5)
  with caplog.at_level(logging.WARNING):
    assert _equal(ckpt.restore_latest(_state(0)), _state(1))
  assert ckpt.save(2, _state(2))  # step 2 is on disk, but bad: replaced
  ckpt.close()
  state, warnings = _restore(two_steps, caplog)
  assert _equal(state, _state(2)) and warnings == []


def test_a_checkpoint_without_manifest_restores_with_a_warning(tmp_path, caplog):
  with ocp.CheckpointManager(tmp_path / "old") as manager:  # the layout before manifests
    manager.save(3, args=ocp.args.StandardSave(_state(3)))
  state, warnings = _restore(tmp_path / "old", caplog)
  assert _equal(state, _state(3))
  assert warnings == [f"checkpoint {tmp_path / 'old'}/3 has no integrity manifest (saved "
                      "before jaxcomp wrote them): restored unverified"]


# ------------------------------------------------------------------------------- the CLI

CONFIG = "configs/fmnist_qat.py:w4a8_lsq,tiny"
STEPS = 96  # 12 epochs of 8 steps; checkpoints every 4


def _cmd(workdir, data_dir):
  return [sys.executable, "-m", "jaxcomp", f"--config={CONFIG}", f"--workdir={workdir}",
          f"--config.data.data_dir={data_dir}", "--config.train.epochs=12"]


def _run(workdir, data_dir):
  return subprocess.run(_cmd(workdir, data_dir), cwd=ROOT, env=ENV, capture_output=True,
                        text=True, timeout=600)


def _final_state(workdir):
  return ocp.StandardCheckpointer().restore(
      os.path.join(workdir, "checkpoints", str(STEPS), "default"))


def _assert_same_final(a, b):
  for x, y in zip(jax.tree.leaves(_final_state(a)), jax.tree.leaves(_final_state(b)),
                  strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # bitwise
  ra, rb = (json.loads((w / "report.json").read_text()) for w in (a, b))
  for key in ("test_accuracy", "test_loss", "steps", "model_bytes"):
    assert ra[key] == rb[key], key
  assert _metric_rows(a) == _metric_rows(b)  # no row lost or duplicated by the kills


def _metric_rows(workdir):
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [{k: v for k, v in r.items() if "time" not in k} for r in rows]


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, data_dir):
  """One uninterrupted run, shared by the tests below."""
  workdir = tmp_path_factory.mktemp("integrity") / "clean"
  r = _run(workdir, data_dir)
  assert r.returncode == 0, r.stderr[-3000:]
  return workdir


@pytest.mark.slow
def test_cli_skips_a_corrupt_newest_checkpoint_and_ends_identically(clean_run, data_dir,
                                                                    tmp_path):
  work = tmp_path / "w"
  shutil.copytree(clean_run, work)
  os.remove(work / "report.json")  # else the rerun of a finished run is a no-op
  path = bitflip.data_files(work / "checkpoints" / str(STEPS) / "default")[0]
  bitflip.flip(path, os.path.getsize(path) // 2)
  r = _run(work, data_dir)
  assert r.returncode == 0, r.stderr[-3000:]
  warnings = [l for l in r.stderr.splitlines() if l.startswith("jaxcomp: warning:")]
  assert len(warnings) == 1, r.stderr[-3000:]
  assert warnings[0].startswith(f"jaxcomp: warning: checkpoint {work / 'checkpoints'}/{STEPS} ")
  assert warnings[0].endswith("trying the one before")
  assert f"at step {STEPS - 4}" in r.stderr  # "resumed from ... at step 92"
  _assert_same_final(clean_run, work)


def _tmp_dirs(checkpoints):
  """{name: inode} of orbax's in-progress checkpoint directories (a save in flight)."""
  out = {}
  for name in os.listdir(checkpoints) if os.path.isdir(checkpoints) else ():
    if name.endswith(TMP_SUFFIX):
      try:
        out[name] = os.stat(os.path.join(checkpoints, name)).st_ino
      except FileNotFoundError:  # renamed meanwhile
        pass
  return out


@pytest.mark.slow
def test_sigkill_at_random_times_during_saves_then_resume_is_bitwise_identical(
    clean_run, data_dir, tmp_path):
  rng = random.Random(19)
  work = tmp_path / "killed"
  checkpoints = work / "checkpoints"
  kills = []
  for _ in range(3):
    seen = set(_tmp_dirs(checkpoints).items())  # leftovers of earlier kills are not this save
    which = rng.randint(1, 3)  # kill during the which-th save this process starts ...
    delay = rng.uniform(0.0, 0.1)  # ... this long after its temporary directory appears
    proc = subprocess.Popen(_cmd(work, data_dir), cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started, deadline = [], time.time() + 300
    while len(started) < which:
      assert proc.poll() is None, f"the run ended before save {which}: {kills}"
      assert time.time() < deadline, "no save started"
      for item in _tmp_dirs(checkpoints).items():
        if item not in seen:
          seen.add(item)
          started.append(item[0])
      time.sleep(0.002)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    kills.append((started[-1], round(delay, 3), started[-1] in _tmp_dirs(checkpoints)))
  print("kills (the save in flight, delay in s, left uncommitted):", kills)
  assert not (work / "report.json").exists()
  # a kill left the save it interrupted uncommitted (its temporary directory) at least once
  assert any(mid_save for _, _, mid_save in kills), kills
  resumed = _run(work, data_dir)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "jaxcomp: warning:" not in resumed.stderr, resumed.stderr[-3000:]
  _assert_same_final(clean_run, work)
