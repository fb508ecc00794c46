"""One-shot compression jobs as stage lists: ``configs/smollm2_{ptq,sparse,lowrank}.py``.

`oneshot_config(recipe)` is the pipeline config (``task = "pipeline"``,
`jaxcomp.experiments.pipeline`) that compresses SmolLM2-135M (or, ``tiny``, a tiny random Llama
with a byte tokenizer) by ``recipe`` one-shot and evaluates it: (``rotate``, when asked) ->
``prune`` (rules with
``sparsity``) -> ``factorize`` (``lowrank``) -> ``ptq`` -> ``convert`` (``quant``; packed
weights saved for serving) -> ``eval`` (perplexity, next-token accuracy, size, latency; no
robustness or cloze unless configured), each stage only when the recipe has its payload; the
float baseline is ``eval`` alone. `summary(workdir)` flattens a finished run's reports into the
numbers the benchmark tables print. The calibration and evaluation texts are read by
`calib_sources` / `eval_text` (shared with every pipeline).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import ml_collections

from jaxcomp.data import calibration
from jaxcomp.eval import perplexity as ppl_lib
from jaxcomp.recipe import Recipe


DEFAULT_SOURCES = "wikitext2_valid:1,austen:1"


def oneshot_config(recipe: Recipe | None, *, tiny: bool = False, rotate: bool = False
                   ) -> ml_collections.ConfigDict:
  """The pipeline config that compresses by ``recipe`` one-shot (None: the float baseline);
  ``rotate``: QuaRot's Hadamard rotations folded in first (a ``rotate`` stage, seed 0, online
  Hadamard before down_proj).

  Example::

    config = oneshot_config(jc.Recipe([jc.Rule(PROJ, sparsity=jc.Sparsity("2:4"))]))
    config.stages                                  # 'prune,eval'
  """
  config = ml_collections.ConfigDict()
  config.task = "pipeline"
  config.seed = 0
  config.model = dict(name="tiny" if tiny else "smollm2_135m", cache_dir="", scan_layers=False)
  # SmolLM2's default calibration mixes WikiText-2 valid and the Austen novels in equal parts:
  # GPTQ's gain over RTN then carries out of domain (issue 21, README); tiny runs read
  # ``calib.text`` alone (tests point it at a small file).
  config.calib = dict(text="wikitext2_valid", sources="" if tiny else DEFAULT_SOURCES,
                      n_seq=8 if tiny else 128,
                      seq_len=64 if tiny else 512, batch_size=8, seed=0, dtype="bfloat16",
                      generation=dict(temperature=1.0, top_p=1.0, first_token="random",
                                      greedy_tokens=0, suppress_special=True, batch_size=16,
                                      temperature_start=1.0, schedule_tokens=0),
                      cache_dir="")
  config.eval = dict(split="test", text_path="", seq_len=64 if tiny else 512,
                     max_tokens=2048 if tiny else 32768, batch_size=4, cloze_items=0, rates=(),
                     latency_repeats=2, ood_text="", ood_max_tokens=0)
  stages: dict[str, Any] = {}
  rules = recipe.rules if recipe is not None else ()
  if rotate:
    stages["rotate"] = dict(kind="rotate", seed=0, online=True, heads=True)
  for name, field in (("prune", "sparsity"), ("factorize", "lowrank"), ("ptq", "quant")):
    if any(getattr(r, field) is not None for r in rules):
      stages[name] = dict(kind=name, recipe=recipe.to_config())
  if "ptq" in stages:
    stages["convert"] = dict(kind="convert", save_packed=True)
  stages["eval"] = dict(kind="eval")
  config.stage = stages
  config.stages = ",".join(stages)
  config.redo = False
  return config


def summary(workdir: str | pathlib.Path) -> dict[str, Any]:
  """A finished one-shot run's numbers, flat: ``ppl``, ``nll``, ``eval_tokens``, ``eval_text``,
  ``params``, ``ood_ppl`` / ``ood_tokens`` / ``ood_text`` (with ``eval.ood_text``), ``sparsity`` (of the whole model), ``layer_sparsity`` (of the pruned kernels),
  ``bytes``, ``bits_per_param`` (as stored), ``saved`` (the packed
  checkpoint's sizes on disk, `jaxcomp.save_packed`) and ``packed_dir``, ``<stage>_s`` wall times, ``<stage>_rel_error`` (mean
  relative output error of the solved layers), ``params_before`` (before factorize) and
  ``peak_rss_mb`` per stage.

  Example::

    summary("runs/ptq/gptq_w4g128")["ppl"]
  """
  work = pathlib.Path(workdir)
  stages = sorted((work / "stages").glob("*_*/report.json"),
                  key=lambda p: int(p.parent.name.split("_", 1)[0]))
  if not stages:
    raise ValueError(f"{work} holds no finished stages (stages/<i>_<name>/report.json)")
  out: dict[str, Any] = {"peak_rss_mb": {}}
  for path in stages:
    r = json.loads(path.read_text())
    kind = r["stage_kind"]
    out[f"{kind}_s"] = r["seconds"]
    out["peak_rss_mb"][kind] = r.get("peak_rss_mb")
    if "layers" in r:
      out[f"{kind}_layers"] = r["layers"]
    if "mean_layer_rel_error" in r:
      out[f"{kind}_rel_error"] = r["mean_layer_rel_error"]
    if "layer_sparsity" in r:
      out["layer_sparsity"] = r["layer_sparsity"]
    if kind == "factorize":
      out["params_before"] = json.loads((work / "baseline" / "report.json").read_text()
                                        )["size"]["params"]
    if "saved" in r:
      out["saved"] = r["saved"]
      out["packed_dir"] = str(path.parent / "packed")
    if kind == "eval":
      q = r["quality"]
      out.update(ppl=q["ppl"], nll=q["nll"], accuracy=q["accuracy"], eval_tokens=q["tokens"],
                 eval_text=r["eval_text"], **{k: r["size"][k] for k in (
                     "params", "nonzero_params", "sparsity", "bytes", "bits_per_param")})
      if "ood" in r:  # the out-of-domain text (`config.eval.ood_text`)
        out.update(ood_ppl=r["ood"]["ppl"], ood_tokens=r["ood"]["tokens"],
                   ood_text=r["ood"]["text"])
  if "ppl" not in out:
    raise ValueError(f"{work} has no finished eval stage")
  return out


def eval_text(config: ml_collections.ConfigDict) -> tuple[str, str]:
  """``config.eval``'s text and its name: ``eval.text_path`` or WikiText-2 ``eval.split``."""
  if config.eval.text_path:
    return ppl_lib.read_text(config.eval.text_path), str(config.eval.text_path)
  return ppl_lib.wikitext2(config.eval.split), f"wikitext-2 {config.eval.split}"


def calib_sources(config: ml_collections.ConfigDict) -> dict[str, float]:
  """``config.calib``'s sources, name -> weight: ``calib.sources`` ("name:weight,...", e.g.
  "wikitext2_valid:1,austen:1,self:1"; a name without weight weighs 1), or else the one
  source ``calib.text``. Text files are checked here: a missing one is a one-line ValueError.

  Example::

    calib_sources(config)          # {'wikitext2_valid': 1.0}
  """
  out = calibration.parse_sources(config.calib.get("sources", "") or config.calib.text,
                                  "config.calib.sources")
  for name in out:
    if name in ("self", "austen"):  # the model itself; Austen is fetched when first used
      continue
    path = ppl_lib.WIKITEXT2_DIR / "valid.txt" if name == "wikitext2_valid" else pathlib.Path(name)
    if not path.is_file():
      raise ValueError(f"config.calib.sources: calibration source {name!r}: no text file at "
                       f"{path} (use 'wikitext2_valid', 'austen', 'self' or a text file path)")
  return out
