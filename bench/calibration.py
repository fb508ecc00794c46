"""Calibration ablation on SmolLM2-135M (issue 21): which calibration text, and how much of it.

For each one-shot method (``--methods``: GPTQ w4 per channel and w4g128, AWQ w4g128, Wanda 50%,
SVD-LLM 40%), calibration source (``--sources``) and number of 512-token sequences
(``--n_seq``), runs the method's pipeline (configs/smollm2_{ptq,sparse,lowrank}.py) into
``--root/<method>-<source>-<n>`` and reports perplexity on the first ``--max_tokens`` tokens of
WikiText-2 *test* (in domain) and of the out-of-domain text (``--ood``, default the Debian
fortune cookies, `jaxcomp.data.fortunes`, which no calibration source comes from), their
increase over the float model, and the calibration stage's wall time (self-generation
included). RTN w4 (no calibration) runs once as the reference of GPTQ's ratio. Sources:

* ``wikitext2``: WikiText-2 *valid*; ``austen``: the six Austen novels;
* ``mixed``: both, equal weights (``calib.sources = "wikitext2_valid:1,austen:1"``);
* ``self``: sampled from the float model itself (temperature 1, top-p 1, a random first
  token, the tokenizer's control tokens never sampled; cached under ``~/.cache/jaxcomp/calib``):
  no external text at all; ``self_raw``: the same with control tokens allowed (as the
  sampling first ran); ``self_t08``: that at temperature 0.8, top-p 0.95; ``self_sched``:
  ``self`` with self-calibration's temperature schedule (Williams et al., 2025), from 2.0
  down to 1.0 over the first 16 sampled tokens; ``self_llmqat``: ``self`` with LLM-QAT's start,
  the 4 tokens after the random first one taken greedily (Liu et al., 2023).

Acceptance lines printed: GPTQ w4 per channel increase / RTN's (target <= 0.6, in and out of
domain, at the default calibration); self-generated vs the best external source, GPTQ w4g128
and Wanda 50% (target: within 10% of its increase, in and out of domain). A finished run is
reused.

    python bench/calibration.py                                   # the full grid (hours)
    python bench/calibration.py --methods gptq_w4 --sources wikitext2 --n_seq 128
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))
sys.path.insert(0, str(ROOT / "bench"))

import ptq_table  # noqa: E402  pylint: disable=wrong-import-position
import smollm2_lowrank  # noqa: E402  pylint: disable=wrong-import-position
import smollm2_ptq  # noqa: E402  pylint: disable=wrong-import-position
import smollm2_sparse  # noqa: E402  pylint: disable=wrong-import-position

METHODS = {"gptq_w4": smollm2_ptq, "gptq_w4g128": smollm2_ptq, "awq_w4g128": smollm2_ptq,
           "wanda_50": smollm2_sparse, "svd_llm_40": smollm2_lowrank}
SOURCES = {"wikitext2": "wikitext2_valid:1", "austen": "austen:1",
           "mixed": "wikitext2_valid:1,austen:1", "self": "self:1", "self_raw": "self:1",
           "self_t08": "self:1", "self_sched": "self:1", "self_llmqat": "self:1"}
# Sampling of the self-generated sources other than the configs' default (temperature 1,
# top-p 1, a random first token, control tokens suppressed).
GENERATION = {"self_raw": dict(suppress_special=False),
              "self_t08": dict(temperature=0.8, top_p=0.95, suppress_special=False),
              "self_sched": dict(temperature_start=2.0, schedule_tokens=16),
              "self_llmqat": dict(greedy_tokens=4)}
DEFAULT_SOURCE = "mixed"  # the one-shot configs' default (`compress.DEFAULT_SOURCES`)


def _run(method: str, source: str | None, n_seq: int, args: argparse.Namespace) -> dict:
  module = smollm2_ptq if method == "rtn_w4" else METHODS[method]
  config = module.get_config(method)
  config.eval.max_tokens = args.max_tokens
  config.eval.ood_text = args.ood
  config.eval.ood_max_tokens = args.max_tokens
  tag = "none" if source is None else f"{source}-{n_seq}"
  config.calib.sources = ""  # RTN reads no calibration: the one text, as it always ran
  if source is not None:
    config.calib.sources = SOURCES[source]
    config.calib.n_seq = n_seq
    config.calib.generation.update(GENERATION.get(source, {}))
  work = pathlib.Path(args.root) / f"{method}-{tag}"
  report = ptq_table.run_variant(config, work, pathlib.Path(args.root))
  stage = next(k for k in report if k in ("ptq_s", "prune_s", "factorize_s")) if source else None
  report["calib_s"] = report.get(stage) if stage else 0.0
  return report


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--root", default="runs/calibration")
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--sources", default=",".join(SOURCES))
  parser.add_argument("--n_seq", default="16,64,128,256")
  parser.add_argument("--max_tokens", type=int, default=32768)
  parser.add_argument("--ood", default="fortunes", help="out-of-domain text: fortunes or a path")
  parser.add_argument("--json", default=None)
  args = parser.parse_args()

  rows = {("rtn_w4", "none", 0): _run("rtn_w4", None, 0, args)}
  for method in args.methods.split(","):
    for source in args.sources.split(","):
      for n in [int(x) for x in args.n_seq.split(",")]:
        rows[(method, source, n)] = r = _run(method, source, n, args)
        print(f"{method} {source} {n}: ppl {r['ppl']:.3f} ood {r['ood_ppl']:.3f}", flush=True)

  base = json.loads(next(pathlib.Path(args.root).glob("*/baseline/report.json")).read_text())
  f_in, f_ood = base["quality"]["ppl"], base["ood"]["ppl"]
  first = next(iter(rows.values()))
  print(f"\nSmolLM2-135M-Instruct; in domain: {first['eval_text']}, {first['eval_tokens']} scored "
        f"tokens, float ppl {f_in:.3f}; out of domain: {first['ood_text']}, "
        f"{first['ood_tokens']} scored tokens, float ppl {f_ood:.3f}\n")
  print("| method | calibration | sequences | ppl in domain | increase | ppl out of domain | "
        "increase | calibration s |")
  print("|---|---|---:|---:|---:|---:|---:|---:|")
  for (method, source, n), r in rows.items():
    print(f"| {method} | {source} | {n or ''} | {r['ppl']:.3f} | {r['ppl'] - f_in:+.3f} | "
          f"{r['ood_ppl']:.3f} | {r['ood_ppl'] - f_ood:+.3f} | {r['calib_s']:.0f} |")

  inc = lambda r, ood: (r["ood_ppl"] - f_ood) if ood else (r["ppl"] - f_in)
  rtn = rows[("rtn_w4", "none", 0)]
  for key in [k for k in rows if k[0] == "gptq_w4" and k[1] == DEFAULT_SOURCE]:
    print(f"\nGPTQ w4 / RTN w4 increase ({key[1]}, {key[2]} sequences): in domain "
          f"{inc(rows[key], False) / inc(rtn, False):.3f}, out of domain "
          f"{inc(rows[key], True) / inc(rtn, True):.3f} (target <= 0.6)")
  for method in ("gptq_w4g128", "wanda_50"):
    for n in sorted({k[2] for k in rows if k[0] == method}):
      external = [r for (m, s, k), r in rows.items()
                  if m == method and k == n and not s.startswith("self")]
      for (m, s, k), own in rows.items():
        if m != method or k != n or not s.startswith("self") or not external:
          continue
        for ood in (False, True):
          best = min(inc(r, ood) for r in external)
          print(f"{method}, {n} sequences, {'out of' if ood else 'in'} domain: {s} increase "
                f"{inc(own, ood):+.3f} vs best external {best:+.3f}: "
                f"{inc(own, ood) / best:.2f}x (target <= 1.10)")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(
        {"|".join(map(str, k)): v for k, v in rows.items()}, indent=2, default=str))


if __name__ == "__main__":
  main()
