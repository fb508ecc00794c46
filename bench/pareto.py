"""The SmolLM2-135M pipeline variants on one evaluation slice, compared: table + frontier plots.

  python bench/pareto.py                                   # every variant, runs/pareto/
  python bench/pareto.py --variants p_q,p_kd_q --root runs/pareto
  python bench/pareto.py --variants p_q,ptq:awq_w4g128,sparse:sparsegpt_2of4,lowrank:svd_llm_20

Each variant of ``configs/smollm2_pipeline.py`` (or ``FAMILY:NAME``: variant NAME of the
one-shot config ``configs/smollm2_FAMILY.py``, FAMILY one of ptq / sparse / lowrank) runs (or
resumes) in ``ROOT/<variant>`` with the same evaluation overrides (``--max_tokens`` tokens of
WikiText-2 *test*, robustness at ``--rates``, ``--cloze`` items, ``--latency_repeats``). A stage
whose fingerprint equals a finished stage of an earlier variant (the same model, calibration
and stage config at the same position, e.g. the 2:4 Wanda stage every ``p_*`` variant starts
with) is copied instead of run again. The final models and the float one are then timed again
side by side, interleaved (``--side_by_side`` rounds: each eval stage timed its model whenever
it ran, next to whatever else the machine was doing). Then `jaxcomp.eval.compare` over the
runs and the uncompressed model (``float``) writes ``ROOT/compare/comparison.md``,
``comparison.json`` and the quality-vs-size / quality-vs-latency PNGs with the frontier marked.
"""

from __future__ import annotations

import importlib
import json
import pathlib
import shutil
import sys
import time

from absl import app, flags, logging

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))

import smollm2_pipeline  # noqa: E402  pylint: disable=wrong-import-position
from jaxcomp.eval import compare  # noqa: E402  pylint: disable=wrong-import-position
from jaxcomp.eval.perplexity import WIKITEXT2_DIR  # noqa: E402  pylint: disable=wrong-import-position
from jaxcomp.experiments import pipeline  # noqa: E402  pylint: disable=wrong-import-position

_VARIANTS = flags.DEFINE_list("variants", list(smollm2_pipeline.VARIANTS),
                              "variants of configs/smollm2_pipeline.py, or FAMILY:NAME of "
                              "configs/smollm2_FAMILY.py (ptq, sparse, lowrank), in run order")
_ROOT = flags.DEFINE_string("root", "runs/pareto", "one workdir per variant under this")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 32768, "WikiText-2 test tokens evaluated")
_RATES = flags.DEFINE_list("rates", ["0.1"], "robustness perturbation rates")
_CLOZE = flags.DEFINE_integer("cloze", 100, "cloze items (WikiText-2 valid sentences)")
_LATENCY = flags.DEFINE_integer("latency_repeats", 3, "timed forwards per model")
_KD_STEPS = flags.DEFINE_integer("kd_steps", 0, "distillation steps (0: the config's)")
_TINY = flags.DEFINE_bool("tiny", False, "the tiny random model (smoke test)")
_SIDE_BY_SIDE = flags.DEFINE_integer(
    "side_by_side", 5, "after the runs, time every final model (and the float one) again in "
    "this many interleaved rounds, in one process, and compare on those latencies (0: use "
    "each eval stage's own, measured whenever it ran)")


ONESHOT_FAMILIES = ("ptq", "sparse", "lowrank")


def variant_config(variant: str):
  """The variant's config with this bench's evaluation overrides."""
  tiny = ",tiny" if _TINY.value else ""
  if ":" in variant:
    family, name = variant.split(":", 1)
    if family not in ONESHOT_FAMILIES:
      raise app.UsageError(f"--variants: {variant!r}: family must be one of {ONESHOT_FAMILIES}")
    config = importlib.import_module(f"smollm2_{family}").get_config(name + tiny)
  else:
    config = smollm2_pipeline.get_config(variant + tiny)
  config.eval.max_tokens = _MAX_TOKENS.value
  config.eval.rates = tuple(float(r) for r in _RATES.value)
  config.eval.cloze_items = _CLOZE.value
  config.eval.latency_repeats = _LATENCY.value
  if _TINY.value and "data" in config:
    config.data.files = str(WIKITEXT2_DIR / "valid.txt")
  if _KD_STEPS.value and "kd" in config.stage:
    config.stage.kd.train.steps = _KD_STEPS.value
  return config


def reuse_finished_stages(config, work: pathlib.Path, done_dirs: list[pathlib.Path]) -> int:
  """Copies the longest prefix of stages already finished, with equal fingerprints, by an
  earlier variant into ``work``; returns how many."""
  stages = pipeline.plan(config)
  fps = pipeline.stage_fingerprints(config, stages)
  best: tuple[int, pathlib.Path | None] = (0, None)
  for other in done_dirs:
    n = 0
    for s, fp in zip(stages, fps):
      done = other / "stages" / s.dirname / "done.json"
      if not done.is_file() or json.loads(done.read_text()).get("fingerprint") != fp:
        break
      n += 1
    best = max(best, (n, other), key=lambda t: t[0])
  n, other = best
  for s in stages[:n]:
    dst = work / "stages" / s.dirname
    if not (dst / "done.json").is_file():
      shutil.rmtree(dst, ignore_errors=True)
      shutil.copytree(other / "stages" / s.dirname, dst)
  return n


def side_by_side_latency(runs: list[pathlib.Path], rounds: int) -> dict[str, dict]:
  """p50 / p95 of one ``[eval.batch_size, eval.seq_len]`` forward of the float model and
  of each run's final model, timed in ``rounds`` interleaved rounds
  (`harness.measure_latency_side_by_side`)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from jaxcomp.eval import harness  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel
  config = ml_collections.ConfigDict(json.loads((runs[0] / "config.json").read_text()))
  base, tokenizer = pipeline.load_base(config)
  e = config.eval
  ids = np.asarray(tokenizer.encode(" the" * (e.batch_size * e.seq_len)).ids, np.int32)
  tokens = jax.numpy.asarray(np.resize(ids, (e.batch_size, e.seq_len)))
  models = {"float": base, **{w.name: pipeline.final_model(w, base)[0] for w in runs}}
  calls = {}
  for name, model in models.items():
    graphdef, state = nnx.split(model)
    calls[name] = (jax.jit(lambda s, t, g=graphdef: nnx.merge(g, s)(t)), (state, tokens))
  return harness.measure_latency_side_by_side(calls, items_per_call=tokens.size, repeats=rounds)


def main(argv):
  del argv
  root = pathlib.Path(_ROOT.value)
  runs: list[pathlib.Path] = []
  for variant in _VARIANTS.value:
    config = variant_config(variant)
    work = root / variant.replace(":", "_")
    copied = reuse_finished_stages(config, work, runs)
    t0 = time.perf_counter()
    report = pipeline.run_pipeline(config, str(work))
    logging.info("%s: %d stage(s) reused, %.0f s, ppl %.3f", variant, copied,
                 time.perf_counter() - t0, report.get("quality", {}).get("ppl", float("nan")))
    runs.append(work)
  out = root / "compare"
  reports = {"float": json.loads((runs[0] / "baseline" / "report.json").read_text())}
  reports.update({w.name: compare.find_report(w) for w in runs})
  if _SIDE_BY_SIDE.value:
    speeds = side_by_side_latency(runs, _SIDE_BY_SIDE.value)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latency_side_by_side.json").write_text(json.dumps(speeds, indent=2))
    reports = {n: {**r, "speed": speeds[n]} for n, r in reports.items()}
  compare.compare(reports, baseline="float", out_dir=out)
  if _SIDE_BY_SIDE.value:
    md = out / "comparison.md"
    md.write_text(md.read_text() + f"\nLatency: one forward of each final model, timed in "
                  f"{_SIDE_BY_SIDE.value} interleaved rounds in one process "
                  f"(latency_side_by_side.json); the eval stages' own timings are in their "
                  f"reports.\n")
  print((out / "comparison.md").read_text())


if __name__ == "__main__":
  app.run(main)
