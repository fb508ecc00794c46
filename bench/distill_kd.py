"""Distillation vs plain fine-tuning of a compressed SmolLM2-135M student, same steps and tokens.

Runs ``configs/smollm2_distill.py:<variant>`` (logit KD, alpha 0.9, T = 2) and
``<variant>,ce`` (cross-entropy only) through the CLI into ``--root`` with the same
``--steps`` x ``data.batch_size`` x ``data.seq_len`` training tokens (Jane Austen), and
measures, on the first ``eval.max_tokens`` tokens of WikiText-2 *valid*: the teacher, the
student before training (one-shot compression + QAT initialisation, what both runs start
from) and both trained students. The fraction of the gap recovered is
``(ppl_before - ppl_after) / (ppl_before - ppl_teacher)``.

    python bench/distill_kd.py --variant w4_2of4 --steps 150
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from flax import nnx  # noqa: E402  pylint: disable=wrong-import-position

import smollm2_distill  # noqa: E402  pylint: disable=wrong-import-position
from cli_runs import run_variant  # noqa: E402  pylint: disable=wrong-import-position
from jaxcomp.distill.task import DistillTask  # noqa: E402  pylint: disable=wrong-import-position
from jaxcomp.recipe import Recipe  # noqa: E402  pylint: disable=wrong-import-position
from jaxcomp.rewrite import quantize  # noqa: E402  pylint: disable=wrong-import-position


def _start_ppl(variant: str) -> dict:
  """Teacher and untrained-student perplexity, built exactly as the training run builds them."""
  config = smollm2_distill.get_config(variant)
  task = DistillTask()
  data = task.data(config)
  model = task.model(config, rngs=nnx.Rngs(config.seed))
  if config.recipe is not None:
    model = quantize(model, Recipe.from_config(config.recipe), strict=True)
  report = task.evaluate(model, data, task.frozen(config))  # the runs' own evaluation
  return {"before": report["eval_ppl"], "teacher": report["teacher_eval_ppl"]}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variant", default="w4_2of4", choices=smollm2_distill.VARIANTS)
  parser.add_argument("--steps", type=int, default=150)
  parser.add_argument("--root", default="runs/distill")
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  extra = [f"--config.train.steps={args.steps}"]
  root = os.path.abspath(args.root)
  start_file = os.path.join(root, f"{args.variant}-start.json")
  if os.path.exists(start_file):
    with open(start_file) as f:
      start = json.load(f)
  else:
    start = _start_ppl(args.variant)
    os.makedirs(root, exist_ok=True)
    with open(start_file, "w") as f:
      json.dump(start, f)
  kd = run_variant("smollm2_distill", args.variant, root, extra)
  ce = run_variant("smollm2_distill", f"{args.variant},ce", root, extra)
  cfg = smollm2_distill.get_config(args.variant)
  tokens = args.steps * cfg.data.batch_size * cfg.data.seq_len
  gap = start["before"] - start["teacher"]
  rows = {"teacher (float SmolLM2-135M)": start["teacher"],
          "student before training": start["before"],
          "student, CE-only fine-tuning": ce["eval_ppl"],
          "student, KD (logit KL, alpha 0.9, T 2)": kd["eval_ppl"]}
  print(f"\n{args.variant}: {args.steps} steps x {cfg.data.batch_size} x {cfg.data.seq_len} = "
        f"{tokens} training tokens (Jane Austen); WikiText-2 valid, first "
        f"{cfg.eval.max_tokens} tokens\n")
  print("| model | ppl | gap to teacher recovered |")
  print("|---|---:|---:|")
  for name, ppl in rows.items():
    recovered = "" if name.startswith(("teacher", "student before")) else \
        f"{100 * (start['before'] - ppl) / gap:.1f}%"
    print(f"| {name} | {ppl:.3f} | {recovered} |")
  ok = kd["eval_ppl"] < ce["eval_ppl"]
  print(f"\nKD below CE-only: {'PASS' if ok else 'FAIL'}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"rows": rows, "tokens": tokens, "steps": args.steps, "kd_beats_ce": ok}, f,
                indent=2)


if __name__ == "__main__":
  main()
