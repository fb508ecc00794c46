"""Checkpoints of a training run: an orbax CheckpointManager whose steps carry digests.

A workdir holds ``config.json`` (the config that made it, guarded by `jaxcomp.train.workdir`)
and ``checkpoints/<step>/``. Orbax writes each checkpoint into a temporary directory and renames
it when complete, so a run killed mid-save leaves the previous checkpoint as the latest one.

Each step directory holds two orbax items: ``default`` (the train state) and ``manifest`` (a
JSON item: the SHA-256 of every array's bytes, computed at save from the values handed to
orbax). Both are written by the same orbax commit, so a step has both or is not there. At
restore the arrays read back are hashed and compared with the manifest; a step that differs
or cannot be read is skipped with a one-line warning naming it and its first bad array, and
the step before it is tried. Steps saved before manifests existed restore with a warning.

Digests are per shard: the manifest maps each array's tree path (``params/conv1/kernel/value``)
to ``{global index of a shard: sha256}`` for the shards with ``replica_id == 0`` (one copy of
each distinct piece of the array), e.g. ``{"[0:4,0:64]": "ab12..."}``. In a multi-process run
each process hashes the shards it holds and the digests are gathered to every process before
the save (only process 0 writes the JSON); at restore each process checks the shards it
holds, and the processes agree on the verdict, so they all fall back together. A restore into
a different sharding is checked against the full array when this process holds all of it; an
array that is neither (a different sharding across processes) is restored unverified.
"""

from __future__ import annotations

from concurrent import futures
import hashlib
import json
import os
from typing import Any

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A workdir or checkpoint cannot be used; the message says which and why."""


MANIFEST_FORMAT = 1
_STATE_ITEM = "default"  # orbax's name for a single item: checkpoints before manifests used it
_MANIFEST_ITEM = "manifest"


def _index_key(index: tuple[slice, ...], shape: tuple[int, ...]) -> str:
  """``[0:4,0:64]``: a shard's place in the global array, every bound spelled out."""
  return "[" + ",".join("%d:%d" % s.indices(n)[:2] for s, n in zip(index, shape)) + "]"


def _sha256(x: Any) -> str:
  """SHA-256 of an array's bytes in C order (any dtype: bfloat16, int4, ...)."""
  a = np.ascontiguousarray(np.asarray(x)).reshape(-1)
  return hashlib.sha256(a.view(np.uint8)).hexdigest()


def _local_pieces(x: Any) -> dict[str, Any]:
  """``{index key: piece}``: the shards of ``x`` this process holds with ``replica_id == 0``
  (the whole value for a host array or scalar)."""
  if isinstance(x, jax.Array):
    out = {}
    for shard in x.addressable_shards:
      if shard.replica_id == 0:
        out[_index_key(shard.index, x.shape)] = shard.data
    return out
  x = np.asarray(x)
  return {_index_key(tuple(slice(None) for _ in x.shape), x.shape): x}


def _leaves(tree: Any) -> list[tuple[str, Any]]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(jax.tree_util.keystr(path, simple=True, separator="/"), x) for path, x in leaves]


def _hash_all(jobs: list[Any]) -> list[str]:
  """SHA-256 of each array, on a thread pool (hashlib releases the GIL on large buffers)."""
  if len(jobs) < 2:
    return [_sha256(x) for x in jobs]
  with futures.ThreadPoolExecutor(min(len(jobs), os.cpu_count() or 1, 16)) as pool:
    return list(pool.map(_sha256, jobs))


def _gather(obj: Any) -> list[Any]:
  """``obj`` (JSON-able) of every process, in process order; ``[obj]`` with one process."""
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  blob = np.frombuffer(json.dumps(obj, sort_keys=True).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([blob.size], np.int32)))
  size = 1 << max(int(sizes.max()) - 1, 0).bit_length()  # powers of two: few compilations
  padded = np.zeros(size, np.uint8)
  padded[:blob.size] = blob
  rows = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(bytes(row[:int(n)])) for row, n in zip(rows, sizes.reshape(-1))]


def state_manifest(state: Any) -> dict[str, Any]:
  """The integrity manifest of a pytree of arrays: per tree path, its dtype, shape and the
  SHA-256 of each distinct shard (see the module docstring). In a multi-process run every
  process must call it (the digests are gathered) and gets the same manifest.

  Example:
    >>> m = state_manifest({"w": jnp.zeros((2, 3))})
    >>> m["arrays"]["w"]["shards"]
    {'[0:2,0:3]': '9d908ecfb6b2...'}
  """
  leaves = _leaves(state)
  jobs = [(path, key, piece) for path, x in leaves for key, piece in _local_pieces(x).items()]
  digests = _hash_all([piece for _, _, piece in jobs])
  local: dict[str, dict[str, str]] = {}
  for (path, key, _), digest in zip(jobs, digests):
    local.setdefault(path, {})[key] = digest
  arrays = {path: {"dtype": str(np.dtype(x.dtype)), "shape": list(np.shape(x)), "shards": {}}
            for path, x in leaves}
  for part in _gather(local):
    for path, shards in part.items():
      arrays[path]["shards"].update(shards)
  return {"format": MANIFEST_FORMAT, "hash": "sha256", "arrays": arrays}


def verify_state(state: Any, manifest: dict[str, Any]) -> tuple[str | None, int]:
  """Checks this process's part of ``state`` (a restored pytree) against ``manifest``.

  Returns:
    ``(problem, unverified)``: the first bad array as one phrase naming its tree path (None
    when all agree), and how many arrays could not be checked here (restored with another
    sharding across processes).

  Example:
    >>> state = {"w": jnp.zeros((2, 3))}
    >>> verify_state(state, state_manifest(state))
    (None, 0)
    >>> verify_state({"w": jnp.ones((2, 3))}, state_manifest(state))
    ('w differs from its manifest digest (1 of 1 arrays)', 0)
  """
  if manifest.get("format") != MANIFEST_FORMAT or manifest.get("hash") != "sha256":
    return (f"its manifest has an unknown format ({manifest.get('format')!r}, "
            f"{manifest.get('hash')!r})"), 0
  entries = manifest.get("arrays", {})
  problems: dict[str, str] = {}
  jobs: list[tuple[str, str, Any]] = []  # (path, saved digest, piece to hash)
  unverified = 0
  for path, x in _leaves(state):
    entry = entries.get(path)
    if entry is None:
      problems[path] = f"{path} is not in its manifest"
      continue
    got = (str(np.dtype(x.dtype)), list(np.shape(x)))
    if got != (entry["dtype"], entry["shape"]):
      problems[path] = (f"{path} is {got[0]}{tuple(got[1])} but was saved as "
                        f"{entry['dtype']}{tuple(entry['shape'])}")
      continue
    saved = entry["shards"]
    pieces = _local_pieces(x)
    if all(key in saved for key in pieces):  # the sharding of the save (the usual case)
      jobs += [(path, saved[key], piece) for key, piece in pieces.items()]
    elif not isinstance(x, jax.Array) or x.is_fully_addressable:  # another sharding: slice
      full = np.asarray(x)
      for key, digest in saved.items():
        index = tuple(slice(*map(int, b.split(":"))) for b in key[1:-1].split(",") if b)
        jobs.append((path, digest, full[index]))
    else:
      unverified += 1
  for (path, digest, _), got_digest in zip(jobs, _hash_all([piece for _, _, piece in jobs])):
    if got_digest != digest:
      problems.setdefault(path, f"{path} differs from its manifest digest")
  if not problems:
    return None, unverified
  order = [path for path, _ in _leaves(state) if path in problems]
  return f"{problems[order[0]]} ({len(order)} of {len(entries)} arrays)", unverified


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}".rstrip(": ")


class Checkpointer:
  """Saves and restores a train-state pytree every ``every`` steps, keeping the last ``keep``;
  each checkpoint carries a manifest of its arrays' digests, checked at restore.

  Example:
    >>> ckpt = Checkpointer("/tmp/run/checkpoints", every=100, keep=3)
    >>> state = ckpt.restore_latest(state)     # unchanged when there is none
    >>> ckpt.save(int(state.step), state)
  """

  def __init__(self, directory: str, *, every: int, keep: int):
    self.directory = os.path.abspath(directory)
    self.every = every
    self._bad_steps: set[int] = set()  # steps that failed verification, above the restored one
    self._manager = ocp.CheckpointManager(
        self.directory, item_names=(_STATE_ITEM, _MANIFEST_ITEM),  # multi-item, also for old
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                             create=True))

  def latest_step(self) -> int | None:
    """The newest saved step (verified or not), None when there is none.

    Example:
      >>> Checkpointer("/tmp/empty/checkpoints", every=10, keep=1).latest_step() is None
      True
    """
    return self._manager.latest_step()

  def _restore_step(self, step: int, abstract: Any) -> tuple[Any, str | None]:
    """``(state, None)`` for a good step; ``(None, why)`` for a bad one; ``(state, "")`` for a
    step without a manifest."""
    has_manifest = os.path.isdir(os.path.join(self.directory, str(step), _MANIFEST_ITEM))
    items = {_STATE_ITEM: ocp.args.StandardRestore(abstract)}
    if has_manifest:
      items[_MANIFEST_ITEM] = ocp.args.JsonRestore()
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax raises many types for unreadable or mismatched data
      return None, f"cannot be restored ({_first_line(e)})"
    if not has_manifest:
      return restored[_STATE_ITEM], ""
    try:
      problem, unverified = verify_state(restored[_STATE_ITEM], restored[_MANIFEST_ITEM])
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # a damaged manifest
      return None, f"has an unreadable manifest ({_first_line(e)})"
    if unverified:
      logging.warning("checkpoint %s/%d: %d arrays restored into another sharding across "
                      "processes were not verified", self.directory, step, unverified)
    return (None, f"failed verification: {problem}") if problem else (restored[_STATE_ITEM],
                                                                      None)

  def restore_latest(self, state: Any) -> Any:
    """The newest good checkpoint restored into ``state``'s structure, shapes and shardings.

    Each step is checked against its manifest; a bad or unreadable step is skipped with a
    one-line warning (naming the step and its first bad array) and the step before it is
    tried. Steps that failed are replaced by the next saves of this run.

    Raises:
      CheckpointError: when there are checkpoints but none is good (one line).

    Example:
      >>> state = Checkpointer("/tmp/run/checkpoints", every=100, keep=3).restore_latest(state)
    """
    steps = sorted(self._manager.all_steps() or [], reverse=True)
    if not steps:
      return state
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    failures = []
    for step in steps:
      restored, problem = self._restore_step(step, abstract)
      problem = next((p for p in _gather(problem) if p), problem)  # every process agrees
      if restored is not None and not problem:
        if problem == "":
          logging.warning("checkpoint %s/%d has no integrity manifest (saved before jaxcomp "
                          "wrote them): restored unverified", self.directory, step)
        self._bad_steps = {s for s in steps if s > step}
        return restored
      failures.append(f"step {step} {problem}")
      logging.warning("checkpoint %s/%d %s; %s", self.directory, step, problem,
                      "trying the one before" if step != steps[-1] else "none is left")
    raise CheckpointError(
        f"no good checkpoint in {self.directory} ({'; '.join(failures)}); delete the bad step "
        "directories to start over, or use a new --workdir")

  def save(self, step: int, state: Any, *, force: bool = False) -> bool:
    """Saves asynchronously, with the manifest of ``state``, when ``step`` is a multiple of
    ``every`` (or ``force``). Returns whether a save started. The digests are computed here,
    before orbax takes the state, so the caller may donate its buffers right after.

    Example:
      >>> ckpt.save(100, state)     # True; ckpt.wait() blocks until it is on disk
    """
    if not force and step % self.every:
      return False
    if self._bad_steps:  # a bad step would shadow this run's new ones (it is newer)
      for bad in sorted(self._bad_steps):
        if bad in (self._manager.all_steps() or []):
          self._manager.delete(bad)
      self._bad_steps = set()
    if step in (self._manager.all_steps() or []):
      return False
    manifest = state_manifest(state)
    return self._manager.save(step, args=ocp.args.Composite(**{
        _STATE_ITEM: ocp.args.StandardSave(state),
        _MANIFEST_ITEM: ocp.args.JsonSave(manifest)}), force=True)

  def wait(self) -> None:
    """Blocks until the last save is on disk.

    Example:
      >>> ckpt.wait()
    """
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the last save and releases orbax's threads.

    Example:
      >>> ckpt.close()
    """
    self._manager.wait_until_finished()
    self._manager.close()
