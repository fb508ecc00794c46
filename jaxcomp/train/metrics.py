"""Metrics of a run: one JSON object a line in ``metrics.jsonl``, and TensorBoard when installed."""

from __future__ import annotations

import json
import os
from typing import Any


class MetricWriter:
  """Appends ``{"step": s, **metrics}`` lines to ``<workdir>/metrics.jsonl``.

  A resumed run first drops the lines after its start step (written by the killed run after
  its last checkpoint; the line of the checkpoint's own step is written before the save), so
  the file reads as one uninterrupted run. If ``tensorboardX``
  is importable the same scalars also go to ``<workdir>/tb``.

  Example:
    >>> w = MetricWriter("/tmp/run", start_step=0)
    >>> w.write(10, {"loss": 0.5})
  """

  def __init__(self, workdir: str, *, start_step: int):
    self.path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(self.path):
      with open(self.path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= start_step]
      with open(self.path + ".tmp", "w") as f:
        f.writelines(kept)
      os.replace(self.path + ".tmp", self.path)
    self._file = open(self.path, "a")
    try:
      import tensorboardX  # pylint: disable=import-outside-toplevel
      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tb"))
    except ImportError:
      self._tb = None

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
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
