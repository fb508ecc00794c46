"""Cost of the integrity manifests: save and restore wall time with and without, side by side.

Training checkpoints: a random train-state-like pytree of ``--params`` float32 values in all
(a third params, a third each Adam moment, as 1024 x 4096 matrices plus a few vectors), saved
and restored by

* without: orbax's `CheckpointManager` with one `StandardSave` item (jaxcomp before the
  manifests; the same options as `Checkpointer`: async saves), restored with `StandardRestore`;
* with: `jaxcomp.train.checkpoint.Checkpointer` (SHA-256 of every shard at save, computed before
  orbax takes the state; hashed again and compared at restore).

Packed models (``--packed_params`` weights, `jc.Quant(w_bits=4, group=128)` on Linear layers
of 2048 x 2048): `jc.save_packed` / `jc.restore_packed` against the same orbax calls without the
manifest item.

"save (call)" is the time `save` blocks the training loop (the manifest is computed in it),
"save (on disk)" until the checkpoint is committed. Variants alternate in each round (order
flipped every round), each round writes fresh directories, the table gives the median of
``--repeats`` rounds (restores read what the round just wrote: from the page cache).

    JAX_PLATFORMS=cpu python bench/checkpoint_integrity.py     # 100M + 100M params, 5 rounds
    python bench/checkpoint_integrity.py --params 20e6 --packed_params 20e6 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

import jaxcomp as jc
from jaxcomp.train.checkpoint import Checkpointer, state_manifest

SHAPE = (1024, 4096)


def _train_state(n_params: float):
  per = int(np.prod(SHAPE))
  n = max(1, round(n_params / 3 / per))
  key = jax.random.key(0)

  def tree(offset):
    return {f"layer_{i}": {"kernel": jax.random.normal(jax.random.fold_in(key, offset + i), SHAPE),
                           "scale": jnp.ones((SHAPE[1],))} for i in range(n)}

  return {"step": jnp.int32(100), "params": tree(0),
          "opt_state": {"mu": tree(1000), "nu": tree(2000)}}


RECIPE = jc.Recipe([jc.Rule(".*", quant=jc.Quant(w_bits=4, group=128))])


def _float_model(n_params: float):
  n = max(1, round(n_params / (2048 * 2048)))
  return nnx.Sequential(*[nnx.Linear(2048, 2048, rngs=nnx.Rngs(i)) for i in range(n)])


def _packed_model(n_params: float):
  """(the packed model, an abstract one of its structure for restore_packed)."""
  like = nnx.eval_shape(lambda: jc.packed_skeleton(_float_model(n_params), RECIPE))
  return jc.convert(jc.quantize(_float_model(n_params), RECIPE)), like


def _count(tree) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def _timed(fn):
  t0 = time.perf_counter()
  out = fn()
  jax.block_until_ready(out)
  return time.perf_counter() - t0, out


def _train_round(state, root, with_manifest: bool) -> dict[str, float]:
  directory = os.path.join(root, "with" if with_manifest else "without")
  shutil.rmtree(directory, ignore_errors=True)
  if with_manifest:
    ckpt = Checkpointer(directory, every=1, keep=1)
    t0 = time.perf_counter()
    ckpt.save(1, state)
    call = time.perf_counter() - t0
    ckpt.wait()
    disk = time.perf_counter() - t0
    ckpt.close()
    ckpt = Checkpointer(directory, every=1, keep=1)
    restore, _ = _timed(lambda: ckpt.restore_latest(state))
    ckpt.close()
  else:
    options = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=True,
                                           create=True)
    with ocp.CheckpointManager(directory, options=options) as manager:
      t0 = time.perf_counter()
      manager.save(1, args=ocp.args.StandardSave(state))
      call = time.perf_counter() - t0
      manager.wait_until_finished()
      disk = time.perf_counter() - t0
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    with ocp.CheckpointManager(directory, options=options) as manager:
      restore, _ = _timed(lambda: manager.restore(1, args=ocp.args.StandardRestore(abstract)))
  return {"save (call)": call, "save (on disk)": disk, "restore": restore}


def _packed_parts(model):
  graphdef, packed, other = nnx.split(model, lambda _, v: isinstance(
      v, nnx.Variable) and isinstance(v.get_value(), jc.QArray), ...)
  del graphdef
  return nnx.to_pure_dict(packed), nnx.to_pure_dict(other)


def _packed_round(model, like, root, with_manifest: bool) -> dict[str, float]:
  directory = os.path.join(root, "packed_with" if with_manifest else "packed_without")
  shutil.rmtree(directory, ignore_errors=True)
  if with_manifest:
    save, _ = _timed(lambda: jc.save_packed(model, directory))
    restore, _ = _timed(lambda: nnx.state(jc.restore_packed(directory, like)))
  else:  # save_packed / restore_packed's orbax calls, without the manifest item
    packed, other = _packed_parts(model)

    def save_fn():
      with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
        ckpt.save(directory, ocp.args.Composite(packed=ocp.args.StandardSave(packed),
                                                float=ocp.args.StandardSave(other)))

    abstract = [jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t)
                for t in _packed_parts(like)]

    def restore_fn():
      with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
        return dict(ckpt.restore(directory, ocp.args.Composite(
            packed=ocp.args.StandardRestore(abstract[0]),
            float=ocp.args.StandardRestore(abstract[1]))))

    save, _ = _timed(save_fn)
    restore, _ = _timed(restore_fn)
  return {"save": save, "restore": restore}


def _table(title: str, rounds: dict[bool, list[dict[str, float]]]) -> str:
  keys = list(rounds[False][0])
  lines = [f"| {title} | without manifest (s) | with manifest (s) | overhead |",
           "|---|---:|---:|---:|"]
  for key in keys:
    a = statistics.median(r[key] for r in rounds[False])
    b = statistics.median(r[key] for r in rounds[True])
    lines.append(f"| {key} | {a:.3f} | {b:.3f} | {b - a:+.3f} s ({100 * (b / a - 1):+.0f}%) |")
  return "\n".join(lines)


def main() -> None:
  """Runs the rounds and prints the two markdown tables.

  Example::

    python bench/checkpoint_integrity.py --params 100e6 --repeats 5
  """
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--params", type=float, default=100e6,
                      help="float32 values in the train state (params + 2 Adam moments)")
  parser.add_argument("--packed_params", type=float, default=100e6,
                      help="weights of the packed model (0: skip)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--dir", default=None, help="where to write (default: a temporary dir)")
  args = parser.parse_args()
  root = args.dir or tempfile.mkdtemp(prefix="ckpt_integrity_")
  os.makedirs(root, exist_ok=True)
  print(f"jax {jax.__version__}, orbax {ocp.__version__ if hasattr(ocp, '__version__') else '?'}"
        f", {jax.devices()[0].platform} x{jax.device_count()}, {os.cpu_count()} CPUs, in {root}")

  state = _train_state(args.params)
  n = _count(state)
  state_manifest(state)  # warm-up: thread pool, first touch of the arrays
  t_hash = statistics.median(_timed(lambda: state_manifest(state))[0] for _ in range(3))
  print(f"train state: {n / 1e6:.1f}M float32 values ({4 * n / 1e9:.2f} GB); "
        f"state_manifest alone (median of 3): {t_hash:.3f} s ({4 * n / 1e9 / t_hash:.2f} GB/s)")
  rounds: dict[bool, list[dict[str, float]]] = {False: [], True: []}
  for r in range(args.repeats):
    for with_manifest in ((False, True) if r % 2 == 0 else (True, False)):
      rounds[with_manifest].append(_train_round(state, root, with_manifest))
  print()
  print(_table(f"training checkpoint, {n / 1e6:.0f}M values, median of {args.repeats}", rounds))
  del state

  if args.packed_params:
    model, like = _packed_model(args.packed_params)
    np_ = _count(nnx.state(model))
    rounds = {False: [], True: []}
    for r in range(args.repeats):
      for with_manifest in ((False, True) if r % 2 == 0 else (True, False)):
        rounds[with_manifest].append(_packed_round(model, like, root, with_manifest))
    print()
    print(_table(f"packed model (w4 g128), {args.packed_params / 1e6:.0f}M weights "
                 f"({np_ / 1e6:.0f}M stored elements), median of {args.repeats}", rounds))
  if not args.dir:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
