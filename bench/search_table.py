"""Budgeted per-layer search on SmolLM2-135M against the uniform recipes (issue 18's tables).

``--suite mixed``: configs/smollm2_search.py:mixed at each ``--budgets`` value (packed bits per
weight) into ``--root/mixed_<budget>-<tokens>``: the first budget's search stage scores every
projection under every candidate (and, ``--kl_n_seq``, the direct KL score of ``w3g128`` for
the Spearman correlation); the other budgets allocate again on its ``sensitivity.json`` (no
second scoring). Beside them: the uniform GPTQ recipes (``--uniform``, configs/smollm2_ptq.py).
``--suite mixed_full``: the same on the full signed grids (smollm2_search.py:mixed_full)
against gptq_w4g128_full and gptq_w3g128_full; ``--suite mixed_grids``: 2 and 4 bits on the
full signed grids, 3 bits symmetric (smollm2_search.py:mixed_grids); ``--suite mixed_full16``:
mixed_full with float16 scales, against w3g128 with float32 and float16 scales. ``--suite owl``: OWL's non-uniform 50% Wanda
against uniform 50% Wanda
(configs/smollm2_sparse.py:wanda_50). ``--suite ranks``: SVD-LLM ranks allocated at 80% and
60% of the float32 projection weights (``--budgets`` in bits per weight: 25.6, 19.2) against
uniform SVD-LLM at 20% and 40% fewer parameters (configs/smollm2_lowrank.py). A finished run
is reused. Prints one markdown table: budget, bits per weight achieved, perplexity, increase
over float, and the search's wall time.

    python bench/search_table.py --suite mixed --max_tokens 0 --budgets 3.5,4.25,3.0
    python bench/search_table.py --suite owl --max_tokens 32768
    python bench/search_table.py --suite ranks --max_tokens 32768 --budgets 25.6,19.2
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))
sys.path.insert(0, str(ROOT / "bench"))

import ptq_table  # noqa: E402  pylint: disable=wrong-import-position
import smollm2_lowrank  # noqa: E402  pylint: disable=wrong-import-position
import smollm2_ptq  # noqa: E402  pylint: disable=wrong-import-position
import smollm2_search  # noqa: E402  pylint: disable=wrong-import-position
import smollm2_sparse  # noqa: E402  pylint: disable=wrong-import-position

_UNIFORM = {"mixed": (smollm2_ptq, "gptq_w4g128,gptq_w3g128"),
            "mixed_full": (smollm2_ptq, "gptq_w4g128_full,gptq_w3g128_full"),
            "mixed_grids": (smollm2_ptq, "gptq_w3g128,gptq_w4g128_full"),
            "mixed_full16": (smollm2_ptq, "gptq_w3g128,gptq_w3g128_fp16,gptq_w3g128_full_fp16"),
            "owl": (smollm2_sparse, "wanda_50"),
            "ranks": (smollm2_lowrank, "svd_llm_20,svd_llm_40")}
_BUDGETS = {"mixed": "3.5,4.25,3.0", "mixed_full": "3.0,3.5,4.25", "mixed_grids": "3.0,3.5,4.25",
            "mixed_full16": "3.0,3.5,4.25",
            "owl": "0.5",
            "ranks": "25.6,19.2"}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--suite", default="mixed", choices=tuple(_UNIFORM))
  parser.add_argument("--root", default="runs/search")
  parser.add_argument("--max_tokens", type=int, default=32768)
  parser.add_argument("--budgets", default=None,
                      help="bits per weight (mixed, ranks) or the sparsity (owl)")
  parser.add_argument("--estimator", default="fisher", choices=("hessian", "fisher", "kl", "calibrated"))
  parser.add_argument("--kl_n_seq", type=int, default=2)
  parser.add_argument("--kl_candidates", default=None,
                      help="mixed: the candidates whose direct KL is measured (comma-separated; "
                           "default the config's)")
  parser.add_argument("--scores", default="",
                      help="an earlier search's sensitivity.json: allocate on it, no scoring")
  parser.add_argument("--owl_group", default=r"layers/\d+",
                      help="owl: the path prefix sharing one outlier ratio ('': per layer)")
  parser.add_argument("--uniform", default=None,
                      help="the uniform variants run beside ('' for none; default per suite)")
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  root = pathlib.Path(args.root)
  tokens = args.max_tokens or "all"

  module, uniform = _UNIFORM[args.suite]
  uniform = uniform if args.uniform is None else args.uniform
  rows, scores = {}, args.scores
  budgets = _BUDGETS[args.suite] if args.budgets is None else args.budgets  # "": none
  for budget in [float(b) for b in budgets.split(",") if b]:
    tag = "" if args.suite != "owl" or args.owl_group else "_per_layer"
    if args.suite != "owl" and args.estimator != "fisher":
      tag = f"_{args.estimator}"
    work = root / f"{args.suite}_{budget:g}{tag}-{tokens}"
    config = smollm2_search.get_config(args.suite)
    config.eval.max_tokens = args.max_tokens
    config.calib.sources = ""  # WikiText-2 valid alone (``calib.text``), as issue 18 measured
    search = config.stage.search
    if args.suite == "owl":
      search.sparsity = budget
      if args.owl_group:
        search.group = args.owl_group
      else:  # per layer: the section without a group
        del search["group"]
    else:
      search.budget = budget
      search.estimator = args.estimator
      search.kl_n_seq = args.kl_n_seq if not scores and args.suite.startswith("mixed") else 0
      search.scores = scores
      if args.kl_candidates:
        search.kl_candidates = args.kl_candidates.split(",")
    report = ptq_table.run_variant(config, work, root)
    found = json.loads((work / "stages" / "0_search" / "report.json").read_text())
    if args.suite != "owl":
      scores = scores or str((work / "stages" / "0_search" / "sensitivity.json").absolute())
    report["search"] = found
    rows[f"{args.suite} {budget:g}"] = report
    print(f"{args.suite} {budget:g}: ppl {report['ppl']:.3f}", flush=True)
  for variant in [v for v in uniform.split(",") if v]:
    config = module.get_config(variant)
    config.eval.max_tokens = args.max_tokens
    config.calib.sources = ""  # WikiText-2 valid alone (``calib.text``), as issue 18 measured
    work = root / f"{variant}-{tokens}"
    rows[variant] = ptq_table.run_variant(config, work, root)
    print(f"{variant}: ppl {rows[variant]['ppl']:.3f}", flush=True)
  for r in rows.values():
    if "packed_dir" in r:
      r["raw_bits_per_param"] = ptq_table._raw_bits(  # pylint: disable=protected-access
          pathlib.Path(r["packed_dir"]) / "packed", r["saved"]["packed_params"])
    elif "params_before" in r:  # factors in float32: bits per weight of the projections
      r["raw_bits_per_param"] = 32 * (1 - (r["params_before"] - r["params"]) /
                                      _proj_params(root))

  base = json.loads(next(root.glob(f"*-{tokens}/baseline/report.json")).read_text())
  base = base["quality"]["ppl"]
  first = next(iter(rows.values()))
  print(f"\nSmolLM2-135M-Instruct, {first['eval_text']}: {first['eval_tokens']} scored tokens; "
        f"float ppl {base:.3f}\n")
  what = {"mixed": "bits/weight (packed arrays)", "mixed_full": "bits/weight (packed arrays)",
          "mixed_grids": "bits/weight (packed arrays)", "mixed_full16": "bits/weight (packed arrays)",
          "ranks": "bits/weight (float32 factors)",
          "owl": "sparsity of the projections"}[args.suite]
  print(f"| recipe | {what} | ppl | increase | search s |")
  print("|---|---:|---:|---:|---:|")
  for name, r in rows.items():
    s = r.get("search", {})
    secs = f"{s['seconds_scoring'] + s.get('seconds_allocation', 0):.0f}" if s else ""
    size = r["layer_sparsity"] if args.suite == "owl" else r["raw_bits_per_param"]
    print(f"| {name} | {size:.4f} | {r['ppl']:.3f} | {r['ppl'] - base:+.3f} | {secs} |")
  spear = next((r["search"].get("spearman") for r in rows.values()
                if r.get("search", {}).get("spearman")), None)
  if spear:
    layers = next(r["search"]["layers"] for r in rows.values() if r.get("search"))
    for est, per in spear.items():
      print(f"\nSpearman({est} score, direct KL) over {layers} projections: " +
            ", ".join(f"{k} {v:.3f}" for k, v in per.items()))
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(rows, indent=2, default=str))


def _proj_params(root: pathlib.Path) -> int:
  """Weights of the 210 projections of SmolLM2-135M (from any run's sensitivity.json)."""
  path = next(root.glob("ranks_*/stages/0_search/sensitivity.json"), None) or next(
      root.glob("*/stages/0_search/sensitivity.json"))
  return sum(l["params"] for l in json.loads(path.read_text())["layers"].values())


if __name__ == "__main__":
  main()
