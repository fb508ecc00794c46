"""Integrity of packed models: `save_packed` writes a manifest of array digests and
`restore_packed` checks it; bit flips and truncation are one-line ValueErrors naming the
directory (and the array or the item), never a silently different model or orbax's raw error."""

import functools
import gc
import json
import logging
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import jaxcomp as jc
import bitflip

RECIPE = jc.Recipe([jc.Rule(".*", quant=jc.Quant(w_bits=4, group=32))])
X = jax.random.normal(jax.random.key(0), (2, 256))

# A failed orbax restore leaves its other reads' coroutines to be collected once its event loop
# is closed ("Event loop is closed"): not this module's concern.
pytestmark = [pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
              pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")]


def _model():
  return nnx.Sequential(nnx.Linear(256, 256, use_bias=False, rngs=nnx.Rngs(0)),
                        nnx.Linear(256, 64, rngs=nnx.Rngs(1)))


@functools.cache
def _like():
  return nnx.eval_shape(lambda: jc.packed_skeleton(_model(), RECIPE))


@pytest.fixture(scope="module")
def packed():
  return jc.convert(jc.quantize(_model(), RECIPE))


@pytest.fixture
def saved(packed, tmp_path):
  jc.save_packed(packed, tmp_path / "m")
  yield tmp_path / "m"
  gc.collect()  # failed restores' abandoned coroutines: collected here, under pytestmark


def _same_model(restored, packed):
  pairs = zip(jax.tree.leaves(nnx.state(restored)), jax.tree.leaves(nnx.state(packed)))
  return all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in pairs)


def test_roundtrip_writes_and_checks_a_manifest(saved, packed):
  manifest = json.loads((saved / "manifest" / "metadata").read_text())
  assert manifest["hash"] == "sha256"
  assert {k.split("/")[0] for k in manifest["arrays"]} == {"packed", "float"}
  assert all(len(v["sha256"]) == 64 for v in manifest["arrays"].values())
  restored = jc.restore_packed(saved, _like())
  np.testing.assert_array_equal(np.asarray(restored(X)), np.asarray(packed(X)))


def test_bit_flips_in_the_data_files_are_one_line_errors(saved):
  """Flips at fractions of the largest data file (the quantized values' chunks) and of the
  top-level ocdbt's data file (the b-tree): each one a ValueError naming the directory."""
  files = bitflip.data_files(saved / "packed")
  top = bitflip.top_level(files, saved / "packed")
  positions = [(files[0], 0.1), (files[0], 0.3), (files[0], 0.5), (files[0], 0.7),
               (top[0], 0.3), (top[0], 0.6)]
  named = 0
  for path, fraction in positions:
    pos = int(fraction * os.path.getsize(path))
    with bitflip.flipped(path, pos), pytest.raises(ValueError) as e:
      jc.restore_packed(saved, _like())
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"restore_packed: {saved}"), message
    assert "is corrupt: packed/" in message or "item 'packed' cannot be read" in message, message
    named += "is corrupt: packed/layers/" in message
  assert named >= 2  # flips that decode to other values name the array


def test_a_changed_array_is_named(saved, packed, tmp_path):
  """The packed item swapped for valid files with one bit of one kernel changed: only the
  manifest can tell, and the error names that array."""
  with ocp.StandardCheckpointer() as ckpt:
    tree = ckpt.restore(saved / "packed")  # the kernels as saved: nested dicts of arrays
  scale = np.asarray(tree["layers"]["1"]["kernel"]["scale"]).copy()
  scale.reshape(-1).view(np.uint8)[3] ^= 1
  tree["layers"]["1"]["kernel"]["scale"] = scale
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "tampered", tree)
  shutil.rmtree(saved / "packed")
  shutil.move(tmp_path / "tampered", saved / "packed")
  with pytest.raises(ValueError) as e:
    jc.restore_packed(saved, _like())
  assert str(e.value) == (f"restore_packed: {saved} is corrupt: packed/layers/1/kernel/scale "
                          "differs from its manifest digest (the file was changed after the save)")


def test_a_sweep_of_flips_never_restores_another_model(saved, packed):
  """Every file of the checkpoint, flips ~every 1/6 of it: a one-line ValueError, or the same
  model bitwise (bytes nothing reads: the per-process b-tree merged into the top-level one,
  timestamps)."""
  outcomes = {"error": 0, "harmless": 0}
  for path in bitflip.files(saved):
    size = os.path.getsize(path)
    for pos in sorted({int(k * size / 6) for k in range(6)}):
      with bitflip.flipped(path, pos):
        try:
          restored = jc.restore_packed(saved, _like())
        except ValueError as e:
          assert "\n" not in str(e) and str(e).startswith(f"restore_packed: {saved}"), str(e)
          outcomes["error"] += 1
          continue
      assert _same_model(restored, packed), (path, pos)
      outcomes["harmless"] += 1
  assert outcomes["error"] >= 30, outcomes


def test_truncated_files_are_one_line_errors_naming_the_item(saved):
  """Each item's largest data file (the arrays' chunks) and its top-level b-tree file, emptied
  or cut in half."""
  for item in ("packed", "float"):
    files = bitflip.data_files(saved / item)
    for path in {files[0], *bitflip.top_level(files, saved / item)}:
      with open(path, "rb") as f:
        data = f.read()
      for keep in (0, len(data) // 2):
        with bitflip.rewritten(path, data[:keep]), pytest.raises(ValueError) as e:
          jc.restore_packed(saved, _like())
        message = str(e.value)
        assert "\n" not in message, message
        assert message.startswith(f"restore_packed: {saved}: item {item!r} cannot be read "
                                  "(truncated or corrupt: "), message
  path = saved / "manifest" / "metadata"
  data = path.read_bytes()
  bitflip.write(path, data[:len(data) // 2])
  with pytest.raises(ValueError, match=r"item 'manifest' cannot be read \(truncated or corrupt"):
    jc.restore_packed(saved, _like())


def test_a_model_saved_without_manifest_restores_with_a_warning(packed, tmp_path, caplog):
  jc.save_packed(packed, tmp_path / "m")
  shutil.rmtree(tmp_path / "m" / "manifest")  # the layout before manifests
  with caplog.at_level(logging.WARNING):
    restored = jc.restore_packed(tmp_path / "m", _like())
  assert _same_model(restored, packed)
  assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
      f"restore_packed: {tmp_path / 'm'} has no integrity manifest (saved before jaxcomp wrote "
      "them): restored unverified"]


def test_the_earlier_uint8_int4_layout_is_refused_by_name(packed, tmp_path):
  """Packed int4 bytes were uint8 two's-complement nibbles before `pack_int4` offset the low
  nibble (and became int8): such a checkpoint must not restore as different weights."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  from jaxcomp.quant.qarray import QArray  # pylint: disable=import-outside-toplevel
  state = jax.tree.map(
      lambda q: dataclasses.replace(q, values=jax.lax.bitcast_convert_type(q.values, np.uint8))
      if isinstance(q, QArray) else q, nnx.state(packed), is_leaf=lambda q: isinstance(q, QArray))
  old = nnx.merge(nnx.graphdef(packed), state)
  jc.save_packed(old, tmp_path / "m")
  with pytest.raises(ValueError, match=r"^restore_packed: .*packed/layers/0/kernel/values holds "
                     r"4-bit values in jaxcomp's earlier uint8 nibble layout .*convert and save "
                     r"the model again$"):
    jc.restore_packed(tmp_path / "m", _like())
