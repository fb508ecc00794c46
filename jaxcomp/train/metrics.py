"""Metrics of a run: one JSON object a line in ``metrics.jsonl``, and TensorBoard when installed."""

from __future__ import annotations

import json
import os
from typing import Any

from absl import logging


class MetricWriter:
  """Appends ``{"step": s, **metrics}`` lines to ``<workdir>/metrics.jsonl``.

  A resumed run first drops the lines after its start step (written by the killed run after
  its last checkpoint; the line of the checkpoint's own step is written before the save), so
  the file reads as one uninterrupted run; a torn last line (a kill mid-write) is dropped with
  a warning, and a row already there is never written again. If ``tensorboardX``
  is importable the same scalars also go to ``<workdir>/tb``.

  Example:
    >>> w = MetricWriter("/tmp/run", start_step=0)
    >>> w.write(10, {"loss": 0.5})
  """

  def __init__(self, workdir: str, *, start_step: int):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._seen: set[tuple[int, tuple[str, ...]]] = set()  # (step, keys) of the rows kept
    if os.path.exists(self.path):
      kept = [row for row in read_metrics(self.path) if row["step"] <= start_step]
      self._seen = {(r["step"], tuple(sorted(r))) for r in kept}
      with open(self.path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
      os.replace(self.path + ".tmp", self.path)
    self._file = open(self.path, "a")
    try:
      import tensorboardX  # pylint: disable=import-outside-toplevel
      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tb"))
    except ImportError:
      self._tb = None

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    """Appends one row; a row of the same step and keys already in the file (a resumed or
    rerun finished run logging it again) is not written twice."""
    row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    key = (row["step"], tuple(sorted(row)))
    if key in self._seen:
      return
    self._seen.add(key)
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in row.items():
        if k != "step":
          self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()


def read_metrics(path: str) -> list[dict[str, Any]]:
  """The rows of a ``metrics.jsonl``. A torn last line (the process killed mid-write) is
  dropped with a one-line warning; an unreadable line elsewhere raises a one-line
  ``ValueError`` naming the file and line.

  Example::

    [r["loss"] for r in read_metrics("runs/a/metrics.jsonl") if "loss" in r]
  """
  with open(path) as f:
    lines = f.read().split("\n")
  rows = []
  last = max((i for i, l in enumerate(lines) if l.strip()), default=-1)
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
      if not isinstance(row, dict) or not isinstance(row.get("step"), int):
        raise ValueError("not a {\"step\": ...} object")
    except ValueError as e:
      if i == last:
        logging.warning("%s: dropped a torn last line (%d bytes; the run was killed while "
                        "writing it)", path, len(line))
        continue
      raise ValueError(f"{path}, line {i + 1}: not a metrics row ({e}); fix or delete the "
                       "line") from None
    rows.append(row)
  return rows
