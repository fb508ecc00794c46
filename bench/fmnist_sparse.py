"""Fashion-MNIST gradual block sparsity: every variant of configs/fmnist_sparse.py, same seed.

Runs ``python -m jaxcomp --config configs/fmnist_sparse.py:<variant>`` for each variant into
``<root>/<variant>`` (a finished run is reused: the CLI resumes and reports), then prints a
markdown table of test accuracy, the difference to the dense run (target: within 1.0 point at
90% block sparsity), the measured sparsity of the pruned kernel and the step time.

    python bench/fmnist_sparse.py --root runs/fmnist_sparse     # 8 epochs x 3 variants
    python bench/fmnist_sparse.py --variants dense block16_90 --epochs 4
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import fmnist_sparse  # noqa: E402  pylint: disable=wrong-import-position
from cli_runs import run_variant  # noqa: E402  pylint: disable=wrong-import-position


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--root", default="runs/fmnist_sparse")
  parser.add_argument("--variants", nargs="+", default=list(fmnist_sparse.VARIANTS))
  parser.add_argument("--epochs", type=int, help="override train.epochs for every variant")
  parser.add_argument("--data_dir", help="override data.data_dir")
  args = parser.parse_args()
  extra = []
  if args.epochs:
    extra.append(f"--config.train.epochs={args.epochs}")
  if args.data_dir:
    extra.append(f"--config.data.data_dir={args.data_dir}")
  reports = {v: run_variant("fmnist_sparse", v, os.path.abspath(args.root), extra)
             for v in args.variants}
  base = reports.get("dense", {}).get("test_accuracy")
  print("\n| variant | test accuracy | vs dense (pt) | sparsity of fc1 | step ms |")
  print("|---|---:|---:|---:|---:|")
  for v, r in reports.items():
    delta = "" if base is None or v == "dense" else f"{100 * (r['test_accuracy'] - base):+.2f}"
    print(f"| {v} | {100 * r['test_accuracy']:.2f} | {delta} | {r.get('sparsity', 0):.4f} | "
          f"{r['step_time_ms']:.1f} |")


if __name__ == "__main__":
  main()
