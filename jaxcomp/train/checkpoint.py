"""Checkpoints of a training run: orbax CheckpointManager plus the run's config guard.

A workdir holds ``config.json`` (the config that made it) and ``checkpoints/<step>/``. Orbax
writes each checkpoint into a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoint as the latest one. Starting a run in a workdir made by
a different config is refused before anything is written.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

# Config keys that may change between a run and its resumption (they do not change the math).
RESUMABLE_KEYS = ("train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                  "train.progress")


class CheckpointError(RuntimeError):
  """A workdir or checkpoint cannot be used; the message says which and why."""


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flat(v, key + "."))
    else:
      out[key] = v
  return out


def check_workdir_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes ``config.json`` in a fresh workdir; refuses one made by a different config.

  Raises:
    CheckpointError: naming the first differing key, e.g.
      ``workdir runs/a holds a run of a different config (train.lr: 0.001 != 0.002)``.
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  current = json.loads(config.to_json_best_effort(sort_keys=True))
  if jax.process_count() > 1:  # process 0 decides and writes; the others then check
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    error = None
    if jax.process_index() == 0:
      try:
        _check_or_write(workdir, path, current)
      except CheckpointError as e:
        error = e
    multihost_utils.sync_global_devices("jaxcomp config.json")
    if error is not None:
      raise error
  _check_or_write(workdir, path, current)


def _check_or_write(workdir: str, path: str, current: dict[str, Any]) -> None:
  if os.path.exists(path):
    with open(path) as f:
      try:
        saved = json.load(f)
      except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); use a new --workdir") from None
    a, b = _flat(saved), _flat(current)
    for key in sorted(set(a) | set(b)):
      if key in RESUMABLE_KEYS:
        continue
      if a.get(key, "<absent>") != b.get(key, "<absent>"):
        raise CheckpointError(
            f"workdir {workdir} holds a run of a different config ({key}: "
            f"{a.get(key, '<absent>')!r} != {b.get(key, '<absent>')!r}); use a new --workdir")
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(current, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


class Checkpointer:
  """Saves and restores a train-state pytree every ``every`` steps, keeping the last ``keep``.

  Example:
    >>> ckpt = Checkpointer("/tmp/run/checkpoints", every=100, keep=3)
    >>> state = ckpt.restore_latest(state)     # unchanged when there is none
    >>> ckpt.save(int(state.step), state)
  """

  def __init__(self, directory: str, *, every: int, keep: int):
    self.directory = os.path.abspath(directory)
    self.every = every
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                             create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def restore_latest(self, state: Any) -> Any:
    """The latest checkpoint restored into ``state``'s structure, shapes and shardings."""
    step = self._manager.latest_step()
    if step is None:
      return state
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    try:
      restored = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # orbax raises many types for unreadable or mismatched data
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise CheckpointError(
          f"checkpoint {self.directory}/{step} cannot be restored ({type(e).__name__}: "
          f"{first[:200]}); delete that step directory to fall back to an earlier one, or use "
          "a new --workdir") from None
    return restored

  def save(self, step: int, state: Any, *, force: bool = False) -> bool:
    """Saves asynchronously when ``step`` is a multiple of ``every`` (or ``force``)."""
    if not force and step % self.every:
      return False
    if step in (self._manager.all_steps() or []):
      return False
    return self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
