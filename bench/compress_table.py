"""SmolLM2-135M pruning and low-rank tables: every variant of a config, plus the float model.

``--suite sparse`` runs configs/smollm2_sparse.py (magnitude / Wanda / SparseGPT at 50%
unstructured and 2:4, and block sparsity); ``--suite lowrank`` runs configs/smollm2_lowrank.py
(SVD / ASVD / SVD-LLM at 20% and 40% fewer parameters in the projections). Each variant runs
as ``python -m jaxcomp --config configs/smollm2_<suite>.py:VARIANT`` would (same job, same
report) into ``--root/VARIANT-<split>-<tokens>`` (a finished report is reused), then one
markdown table is printed with the acceptance ratios:

* sparse: perplexity increase of Wanda and of SparseGPT over the float model, divided by
  magnitude pruning's increase at the same pattern (target <= 0.5);
* lowrank: SVD-LLM perplexity below plain SVD perplexity at each budget.

    python bench/compress_table.py --suite sparse --max_tokens 32768
    python bench/compress_table.py --suite lowrank --variants svd_20,svd_llm_20
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))

import smollm2_lowrank  # noqa: E402  pylint: disable=wrong-import-position
import smollm2_sparse  # noqa: E402  pylint: disable=wrong-import-position

from jaxcomp.experiments.compress import oneshot_config  # noqa: E402  pylint: disable=wrong-import-position
from ptq_table import run_variant  # noqa: E402  pylint: disable=wrong-import-position

SUITES = {"sparse": smollm2_sparse, "lowrank": smollm2_lowrank}


def _run(config, work: pathlib.Path, args: argparse.Namespace) -> dict:
  config.eval.max_tokens = args.max_tokens
  config.eval.split = args.split
  config.calib.text = args.calib
  config.calib.sources = ""  # the one text --calib names (the tables' calibration)
  config.eval.ood_text = args.ood
  config.eval.ood_max_tokens = args.max_tokens
  return run_variant(config, work, pathlib.Path(args.root))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--suite", required=True, choices=tuple(SUITES))
  parser.add_argument("--root", default="runs/compress")
  parser.add_argument("--max_tokens", type=int, default=32768)
  parser.add_argument("--split", default="test", choices=("valid", "test"))
  parser.add_argument("--variants", default=None, help="comma-separated; default: all")
  parser.add_argument("--calib", default="wikitext2_valid",
                      help="calibration text: wikitext2_valid, austen or a file path")
  parser.add_argument("--ood", default="fortunes",
                      help="out-of-domain text scored too: fortunes, a file path, or '' for none")
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  suite = SUITES[args.suite]
  variants = args.variants.split(",") if args.variants else list(suite.VARIANTS)
  tag = f"{args.split}-{args.max_tokens or 'all'}"

  reports = {"float": _run(oneshot_config(None), pathlib.Path(args.root) / f"float-{tag}", args)}
  print(f"float: ppl {reports['float']['ppl']:.3f}", flush=True)
  for variant in variants:
    work = pathlib.Path(args.root) / f"{variant}-{tag}-calib_{pathlib.Path(args.calib).stem}"
    reports[variant] = _run(suite.get_config(variant), work, args)
    print(f"{variant}: ppl {reports[variant]['ppl']:.3f}", flush=True)

  base = reports["float"]["ppl"]
  first = reports["float"]
  ood = "ood_ppl" in first
  ood_head = "ppl out of domain | increase | " if ood else ""
  ood_rule = "---:|---:|" if ood else ""

  def ood_cells(v, r):
    if not ood:
      return ""
    inc = "" if v == "float" else f"{r['ood_ppl'] - first['ood_ppl']:+.3f}"
    return f" | {r['ood_ppl']:.3f} | {inc}"

  print(f"\nSmolLM2-135M-Instruct (Q4_1 GGUF, dequantized), {first['eval_text']}: "
        f"{first['eval_tokens']} scored tokens, non-overlapping 512-token windows; calibration 128 x 512 tokens of {args.calib}"
        + (f"; out of domain: {first['ood_text']}, {first['ood_tokens']} scored tokens" if ood
           else "") + "\n")
  if args.suite == "sparse":
    print(f"| variant | ppl | increase | {ood_head}sparsity | prune s |")
    print(f"|---|---:|---:|{ood_rule}---:|---:|")
    for v, r in reports.items():
      inc = ("" if v == "float" else f"{r['ppl'] - base:+.3f}") + ood_cells(v, r)
      sp = f"{r['layer_sparsity']:.4f}" if "layer_sparsity" in r else "0"
      print(f"| {v} | {r['ppl']:.3f} | {inc} | {sp} | {r.get('prune_s', '')} |")
    print()
    for pattern in ("50", "2of4"):
      mag = reports.get(f"magnitude_{pattern}")
      if mag is None:
        continue
      for method in ("wanda", "sparsegpt"):
        r = reports.get(f"{method}_{pattern}")
        if r is not None:
          ratio = (r["ppl"] - base) / (mag["ppl"] - base)
          print(f"{method}_{pattern} / magnitude_{pattern} increase: {ratio:.3f} "
                "(target <= 0.5)")
  else:
    print(f"| variant | ppl | increase | {ood_head}params (projections + rest) | vs float "
          "params | factorize s |")
    print(f"|---|---:|---:|{ood_rule}---:|---:|---:|")
    for v, r in reports.items():
      inc = ("" if v == "float" else f"{r['ppl'] - base:+.3f}") + ood_cells(v, r)
      params = r.get("params")
      before = r.get("params_before", first.get("params"))  # the float row has none
      frac = f"{params / before:.4f}" if params and before else "1"
      print(f"| {v} | {r['ppl']:.3f} | {inc} | {params or ''} | {frac} | "
            f"{r.get('factorize_s', '')} |")
    print()
    for pct in (20, 40):
      svd, llm = reports.get(f"svd_{pct}"), reports.get(f"svd_llm_{pct}")
      if svd and llm:
        verdict = "met" if llm["ppl"] < svd["ppl"] else "NOT met"
        print(f"{pct}%: svd_llm {llm['ppl']:.3f} vs svd {svd['ppl']:.3f} "
              f"(target svd_llm < svd: {verdict})")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(reports, indent=2))


if __name__ == "__main__":
  main()
