"""A run's workdir: its ``config.json`` guard, the lock held while a run uses it, and the
checks that happen before anything is written there.

The order a run follows (`jaxcomp.train.loop.train`, `jaxcomp.experiments.pipeline`):

1. `check_config`: read-only; a workdir made by a different config is refused;
2. everything that can fail on bad input is built (data, mesh, model, recipe, optimizer);
3. `claim`: creates the workdir, takes its lock (a second live run gets a one-line error) and
   writes ``config.json`` atomically.

So a run that fails validation leaves no workdir behind (or an existing one byte for byte as
it was), and the corrected command starts cleanly.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
from typing import Any

import jax
import ml_collections
from absl import logging

# Config keys that may change between a run and its resumption (they do not change the math).
RESUMABLE_KEYS = ("train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                  "train.progress")
LOCK_NAME = ".lock"
_CLAIMED: set[str] = set()  # workdirs this process has claimed (`claim`)


class WorkdirError(RuntimeError):
  """A workdir cannot be used (another config's run, a live run, unwritable); the message says
  which and why."""


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flat(v, key + "."))
    else:
      out[key] = v
  return out


def config_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """``config`` as the JSON object ``config.json`` holds (sorted keys)."""
  return json.loads(config.to_json_best_effort(sort_keys=True))


def check_config(workdir: str, config: ml_collections.ConfigDict) -> bool:
  """Read-only check of ``workdir`` against ``config``; True when it already holds a run of
  this config, False when it holds none (no ``config.json``). Writes nothing.

  Raises:
    WorkdirError: naming the first differing key, e.g. ``workdir runs/a holds a run of a
      different config (train.lr: 0.001 != 0.002); use a new --workdir``, or the unreadable
      ``config.json``.

  Example::

    resuming = check_config("runs/a", config)
  """
  path = os.path.join(workdir, "config.json")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f"workdir {workdir} exists and is not a directory")
  if not os.path.exists(path):
    return False
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise WorkdirError(f"{path} cannot be read ({e}); use a new --workdir") from None
  a, b = _flat(saved), _flat(config_json(config))
  for key in sorted(set(a) | set(b)):
    if key in RESUMABLE_KEYS:
      continue
    if a.get(key, "<absent>") != b.get(key, "<absent>"):
      raise WorkdirError(
          f"workdir {workdir} holds a run of a different config ({key}: "
          f"{a.get(key, '<absent>')!r} != {b.get(key, '<absent>')!r}); use a new --workdir")
  return True


class WorkdirLock:
  """An advisory lock (``flock`` on ``<workdir>/.lock``) held while a run uses ``workdir``.

  The kernel drops it when the process exits, SIGKILL included, so a killed run never leaves
  a stale lock. Only process 0 of a multi-process run takes it (all processes share the
  workdir).

  Example::

    with WorkdirLock("runs/a"):
      ...   # a second run on runs/a fails with WorkdirError meanwhile
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    self._fd: int | None = None

  def acquire(self) -> WorkdirLock:
    """Takes the lock; raises `WorkdirError` when another live run holds it."""
    if jax.process_index() != 0 or self._fd is not None:
      return self
    path = os.path.join(self.workdir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = os.read(fd, 64).decode(errors="replace").strip()
      os.close(fd)
      if e.errno in (errno.EAGAIN, errno.EACCES):
        raise WorkdirError(f"workdir {self.workdir} is in use by another run"
                           f"{f' (pid {holder})' if holder else ''}; wait for it or use a new "
                           "--workdir") from None
      raise
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # closing the descriptor drops the flock
      self._fd = None

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def claim(workdir: str, config: ml_collections.ConfigDict | None) -> WorkdirLock:
  """Creates ``workdir``, takes its lock and writes ``config.json`` (atomically; ``config``
  None: leaves it to the caller). Call after everything that validates the config.

  Raises:
    WorkdirError: another live run holds the workdir, or it cannot be written (read-only,
      full disk, a file in the way), naming the path; nothing half-written is left.

  Example::

    lock = claim("runs/a", config)
    try:
      ...
    finally:
      lock.release()
  """
  try:
    os.makedirs(workdir, exist_ok=True)
    lock = WorkdirLock(workdir).acquire()
  except OSError as e:
    raise WorkdirError(f"workdir {workdir} cannot be written ({_os_reason(e)})") from None
  _CLAIMED.add(os.path.abspath(workdir))
  if config is None:
    return lock
  try:
    if jax.process_count() > 1:  # process 0 writes; the others wait for it, then check
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      if jax.process_index() == 0:
        write_json_atomic(os.path.join(workdir, "config.json"), config_json(config))
      multihost_utils.sync_global_devices("jaxcomp config.json")
      check_config(workdir, config)
    else:
      write_json_atomic(os.path.join(workdir, "config.json"), config_json(config))
  except BaseException:
    lock.release()
    raise
  return lock


def claimed(workdir: str) -> bool:
  """Whether this process has claimed ``workdir`` (`claim`): from then on the run may write
  there (its log file included).

  Example::

    claimed("runs/a")   # False until the run's inputs are validated
  """
  return os.path.abspath(workdir) in _CLAIMED


def write_json_atomic(path: str, obj: Any, *, indent: int = 2) -> None:
  """Writes ``obj`` as JSON to ``path`` through ``path.tmp`` and a rename, so ``path`` is
  either the old file or the whole new one; an I/O error (full disk, read-only) removes the
  temporary file and raises `WorkdirError` naming the path.

  Example::

    write_json_atomic("runs/a/report.json", {"loss": 0.5})
  """
  write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=True))


def write_text_atomic(path: str, text: str) -> None:
  """`write_json_atomic` for text."""
  tmp = path + ".tmp"
  try:
    with open(tmp, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as e:
    try:
      os.remove(tmp)
    except OSError:
      pass
    raise WorkdirError(f"cannot write {path} ({_os_reason(e)})") from None


def _os_reason(e: OSError) -> str:
  return e.strerror or type(e).__name__


def sanity_warnings(config: ml_collections.ConfigDict) -> list[str]:
  """Values that are legal but almost surely wrong, as one-line warnings (also logged).

  Example::

    sanity_warnings(config)   # ["train.lr=-0.01 is negative: each step climbs the loss"]
  """
  out = []
  for key, lr in _flat(config_json(config)).items():
    if key.rsplit(".", 1)[-1] not in ("lr", "learning_rate") or isinstance(lr, bool):
      continue
    if not isinstance(lr, (int, float)):
      continue
    if not math.isfinite(lr):
      out.append(f"{key}={lr} is not finite")
    elif lr < 0:
      out.append(f"{key}={lr:g} is negative: each step climbs the loss")
    elif lr > 1:
      out.append(f"{key}={lr:g} is above 1: training will most likely diverge")
  for line in out:
    logging.warning("%s", line)
  return out
