"""Running one variant of a training config through the CLI, for the bench tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_variant(config: str, variant: str, root: str, extra: list[str]) -> dict:
  """Runs (or resumes and reports) ``configs/<config>.py:<variant>`` in ``root/variant``."""
  workdir = os.path.join(root, variant)
  cmd = [sys.executable, "-m", "jaxcomp", f"--config=configs/{config}.py:{variant}",
         f"--workdir={workdir}", "--config.train.progress=False", *extra]
  print("$", " ".join(cmd), flush=True)
  subprocess.run(cmd, cwd=ROOT, check=True)
  with open(os.path.join(workdir, "report.json")) as f:
    return json.load(f)
