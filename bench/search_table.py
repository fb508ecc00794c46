"""Budgeted mixed precision on SmolLM2-135M against uniform GPTQ recipes (issue 18's table).

Runs configs/smollm2_search.py:mixed at each ``--budgets`` value (bits per weight, packed)
into ``--root/mixed_<budget>``: the first budget's search stage scores every projection under
every candidate (and, ``--kl_n_seq``, the direct KL score of ``w3g128`` for the Spearman
correlation); the other budgets allocate again on its ``sensitivity.json`` (no second
scoring). The uniform recipes (``--uniform``, configs/smollm2_ptq.py variants) run beside
them (a finished run is reused). Prints one markdown table: budget, bits per weight achieved
(the packed arrays), perplexity, increase over float, and the search's wall time.

    python bench/search_table.py --max_tokens 0 --budgets 3.5,4.25,3.0
    python bench/search_table.py --max_tokens 32768 --budgets 3.5 --uniform gptq_w4g128
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
import smollm2_ptq  # noqa: E402  pylint: disable=wrong-import-position
import smollm2_search  # noqa: E402  pylint: disable=wrong-import-position


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--root", default="runs/search")
  parser.add_argument("--max_tokens", type=int, default=32768)
  parser.add_argument("--budgets", default="3.5,4.25,3.0")
  parser.add_argument("--estimator", default="hessian", choices=("hessian", "kl"))
  parser.add_argument("--kl_n_seq", type=int, default=2)
  parser.add_argument("--uniform", default="gptq_w4g128,gptq_w3g128",
                      help="configs/smollm2_ptq.py variants run beside ('' for none)")
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  root = pathlib.Path(args.root)
  tokens = args.max_tokens or "all"

  rows, scores = {}, ""
  for budget in [float(b) for b in args.budgets.split(",") if b]:
    work = root / f"mixed_{budget:g}-{tokens}"
    config = smollm2_search.get_config("mixed")
    config.eval.max_tokens = args.max_tokens
    config.stage.search.budget = budget
    config.stage.search.estimator = args.estimator
    config.stage.search.kl_n_seq = args.kl_n_seq if not scores else 0
    config.stage.search.scores = scores
    report = ptq_table.run_variant(config, work, root)
    search = json.loads((work / "stages" / "0_search" / "report.json").read_text())
    scores = scores or str((work / "stages" / "0_search" / "sensitivity.json").absolute())
    report["search"] = search
    rows[f"mixed {budget:g}"] = report
    print(f"mixed {budget:g}: ppl {report['ppl']:.3f}, {search['bits_per_param']:.3f} bits "
          f"searched", flush=True)
  for variant in [v for v in args.uniform.split(",") if v]:
    config = smollm2_ptq.get_config(variant)
    config.eval.max_tokens = args.max_tokens
    work = root / f"{variant}-{tokens}"
    rows[variant] = ptq_table.run_variant(config, work, root)
    print(f"{variant}: ppl {rows[variant]['ppl']:.3f}", flush=True)
  for r in rows.values():
    r["raw_bits_per_param"] = ptq_table._raw_bits(  # pylint: disable=protected-access
        pathlib.Path(r["packed_dir"]) / "packed", r["saved"]["packed_params"])

  base = json.loads(next(root.glob("*/baseline/report.json")).read_text())["quality"]["ppl"]
  first = next(iter(rows.values()))
  print(f"\nSmolLM2-135M-Instruct, {first['eval_text']}: {first['eval_tokens']} scored tokens; "
        f"float ppl {base:.3f}\n")
  print("| recipe | bits/weight: searched | bits/weight: packed arrays | ppl | increase | "
        "search s | GPTQ s |")
  print("|---|---:|---:|---:|---:|---:|---:|")
  for name, r in rows.items():
    s = r.get("search", {})
    target = f"{s['bits_per_param']:.3f}" if s else ""
    secs = f"{s['seconds_scoring'] + s['seconds_allocation']:.0f}" if s else ""
    print(f"| {name} | {target} | {r['raw_bits_per_param']:.3f} | {r['ppl']:.3f} | "
          f"{r['ppl'] - base:+.3f} | {secs} | {r.get('ptq_s', '')} |")
  spear = next((r["search"].get("spearman") for r in rows.values()
                if r.get("search", {}).get("spearman")), None)
  if spear:
    layers = next(r["search"]["layers"] for r in rows.values() if r.get("search"))
    print(f"\nSpearman(Hessian score, direct KL) over {layers} projections: " +
          ", ".join(f"{k} {v:.3f}" for k, v in spear.items()))
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
  main()
