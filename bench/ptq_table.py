"""The SmolLM2-135M PTQ table: every variant of configs/smollm2_ptq.py, one after another.

Each variant runs as ``python -m jaxcomp --config configs/smollm2_ptq.py:VARIANT`` would (same
job, same report) into ``--root/VARIANT`` (a finished variant's report is reused), then one
markdown table is printed: perplexity, increase over the float baseline, bits per parameter of
the quantized matrices as saved, size on disk, PTQ and eval wall time, and the acceptance
ratios (GPTQ w4 increase / RTN w4 increase; SmoothQuant W8A8 increase in %).

    python bench/ptq_table.py --max_tokens 32768           # a stated prefix of the test split
    python bench/ptq_table.py --max_tokens 0               # the whole test split
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))

import smollm2_ptq  # noqa: E402  pylint: disable=wrong-import-position

from jaxcomp.ptq.job import run_ptq  # noqa: E402  pylint: disable=wrong-import-position


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--root", default="runs/ptq")
  parser.add_argument("--max_tokens", type=int, default=32768)
  parser.add_argument("--split", default="test", choices=("valid", "test"))
  parser.add_argument("--variants", default=",".join(smollm2_ptq.VARIANTS))
  parser.add_argument("--json", default=None)
  args = parser.parse_args()

  reports = {}
  for variant in args.variants.split(","):
    work = pathlib.Path(args.root) / f"{variant}-{args.split}-{args.max_tokens or 'all'}"
    if (work / "report.json").exists():
      reports[variant] = json.loads((work / "report.json").read_text())
      continue
    config = smollm2_ptq.get_config(variant)
    config.eval.max_tokens = args.max_tokens
    config.eval.split = args.split
    report = run_ptq(config, str(work))
    (work / "report.json").write_text(json.dumps(report, indent=2))
    reports[variant] = report
    print(f"{variant}: ppl {report['ppl']:.3f}", flush=True)

  base = reports.get("float", {}).get("ppl")
  first = next(iter(reports.values()))
  print(f"\nSmolLM2-135M-Instruct (Q4_1 GGUF, dequantized), {first['eval_text']}: "
        f"{first['eval_tokens']} scored tokens of {first['eval_split_tokens']}, "
        f"non-overlapping 512-token windows\n")
  print("| variant | ppl | increase | bits/param (quantized matrices, on disk) | "
        "size MB | PTQ s | eval s |")
  print("|---|---:|---:|---:|---:|---:|---:|")
  for variant, r in reports.items():
    inc = "" if base is None or variant == "float" else f"{r['ppl'] - base:+.3f}"
    bits = f"{r['packed_bits_per_param']:.2f}" if "packed_bits_per_param" in r else "32"
    size = f"{r['size_mb']:.1f}" if "size_mb" in r else ""
    print(f"| {variant} | {r['ppl']:.3f} | {inc} | {bits} | {size} | {r.get('ptq_s', '')} | "
          f"{r['eval_s']} |")
  if base is not None:
    inc = lambda v: reports[v]["ppl"] - base if v in reports else None
    if inc("gptq_w4") is not None and inc("rtn_w4"):
      print(f"\nGPTQ w4 / RTN w4 increase: {inc('gptq_w4') / inc('rtn_w4'):.3f} (target <= 0.6)")
    if inc("smoothquant_w8a8") is not None:
      print(f"SmoothQuant W8A8 increase: {100 * inc('smoothquant_w8a8') / base:.2f}% "
            "(target <= 1.5%)")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(reports, indent=2))


if __name__ == "__main__":
  main()
