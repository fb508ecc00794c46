"""Scanned vs unrolled SmolLM2-135M: the same PTQ job on both forms of the model, side by side.

Each form runs ``python -m jaxcomp --config configs/smollm2_ptq.py:VARIANT`` as its own process
(``--config.model.scan_layers`` False, then True), so that its peak host memory (the child's
maximum resident set size, from ``os.wait4``) is its own. Printed: perplexity of each form on
the README slice of WikiText-2 test, their relative difference (target: within 0.5%), PTQ wall
time and peak RSS after each phase (target: the scanned form's no higher than the unrolled one's).

    python bench/scan_ptq.py                          # gptq_w4g128, 32768 test tokens
    python bench/scan_ptq.py --variant rtn_w4g128 --max_tokens 0
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaxcomp.experiments.compress import summary  # noqa: E402  pylint: disable=wrong-import-position


def _run(args: argparse.Namespace, scan: bool) -> dict:
  work = pathlib.Path(args.root) / f"{args.variant}-{'scan' if scan else 'unrolled'}"
  rss_file = work / "process_peak_rss_mb.json"
  if rss_file.exists():
    return {**summary(work), **json.loads(rss_file.read_text())}
  cmd = [sys.executable, "-m", "jaxcomp", f"--config={ROOT}/configs/smollm2_ptq.py:{args.variant}",
         f"--workdir={work}", f"--config.model.scan_layers={scan}",
         f"--config.eval.max_tokens={args.max_tokens}"]
  proc = subprocess.Popen(cmd, cwd=ROOT)
  _, status, usage = os.wait4(proc.pid, 0)
  if os.waitstatus_to_exitcode(status) != 0:
    raise SystemExit(f"{' '.join(cmd)} failed with exit code {os.waitstatus_to_exitcode(status)}")
  rss = {"process_peak_rss_mb": usage.ru_maxrss / 1024}  # Linux reports kilobytes
  rss_file.write_text(json.dumps(rss))
  return {**summary(work), **rss}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--root", default="runs/scan_ptq")
  parser.add_argument("--variant", default="gptq_w4g128")
  parser.add_argument("--max_tokens", type=int, default=32768)
  args = parser.parse_args()
  unrolled, scanned = _run(args, scan=False), _run(args, scan=True)
  print(f"\nSmolLM2-135M {args.variant}, {scanned['eval_text']}: {scanned['eval_tokens']} "
        "scored tokens\n")
  print("| form | ppl | PTQ s | peak RSS MB: after PTQ | after convert+save | "
        "after eval (= process) |")
  print("|---|---:|---:|---:|---:|---:|")
  for name, r in (("unrolled", unrolled), ("scan_layers", scanned)):
    rss = r["peak_rss_mb"]
    print(f"| {name} | {r['ppl']:.4f} | {r['ptq_s']} | {rss['ptq']:.0f} | "
          f"{rss['convert']:.0f} | {r['process_peak_rss_mb']:.0f} |")
  diff = 100 * (scanned["ppl"] - unrolled["ppl"]) / unrolled["ppl"]
  print(f"\nscanned - unrolled perplexity: {diff:+.4f}% (target within 0.5%); peak RSS "
        f"scanned / unrolled: {scanned['process_peak_rss_mb'] / unrolled['process_peak_rss_mb']:.3f}"
        f", until the end of PTQ {scanned['peak_rss_mb']['ptq'] / unrolled['peak_rss_mb']['ptq']:.3f}"
        " (target <= 1)")


if __name__ == "__main__":
  main()
