"""Fashion-MNIST QAT table: every variant of configs/fmnist_qat.py, same seed and epochs.

Runs ``python -m jaxcomp --config configs/fmnist_qat.py:<variant>`` for each variant into
``<root>/<variant>`` (a finished run is reused: the CLI resumes and reports), then prints a
markdown table of test accuracy, the difference to float, step time and model size.

    python bench/fmnist_qat.py --root runs/fmnist            # 4 epochs x 7 variants, ~15 min
    python bench/fmnist_qat.py --variants float w8a8 --epochs 2
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import fmnist_qat  # noqa: E402  pylint: disable=wrong-import-position
from cli_runs import run_variant  # noqa: E402  pylint: disable=wrong-import-position


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--root", default="runs/fmnist")
  parser.add_argument("--variants", nargs="+", default=list(fmnist_qat.VARIANTS))
  parser.add_argument("--epochs", type=int, help="override train.epochs for every variant")
  parser.add_argument("--data_dir", help="override data.data_dir")
  args = parser.parse_args()
  extra = []
  if args.epochs:
    extra.append(f"--config.train.epochs={args.epochs}")
  if args.data_dir:
    extra.append(f"--config.data.data_dir={args.data_dir}")
  reports = {v: run_variant("fmnist_qat", v, os.path.abspath(args.root), extra)
             for v in args.variants}
  base = reports.get("float", {}).get("test_accuracy")
  print("\n| variant | test accuracy | vs float (pt) | step ms | model KiB |")
  print("|---|---:|---:|---:|---:|")
  for v, r in reports.items():
    delta = "" if base is None or v == "float" else f"{100 * (r['test_accuracy'] - base):+.2f}"
    print(f"| {v} | {100 * r['test_accuracy']:.2f} | {delta} | {r['step_time_ms']:.1f} | "
          f"{r['model_bytes'] / 1024:.1f} |")


if __name__ == "__main__":
  main()
