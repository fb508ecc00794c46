"""The post-training compression experiment behind ``python -m jaxcomp --config
configs/smollm2_{ptq,sparse,lowrank}.py:VARIANT`` (``task = "ptq"``).

``run_ptq(config, workdir)``: load the model and tokenizer, cut calibration windows from a
training text, then apply the config's recipe in stages -- `jaxcomp.prune` (rules with
``sparsity``), `jaxcomp.factorize` (``lowrank``), `jaxcomp.ptq` (``quant``) followed by
`jaxcomp.convert` to packed weights saved with Orbax (``workdir/packed``) -- and evaluate
perplexity on WikiText-2 (or any text). Returns the report (the CLI writes it as
``report.json`` / ``report.md``).
"""

from __future__ import annotations

import json
import pathlib
import resource
import time
from typing import Any

from absl import logging
from flax import nnx
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxcomp.eval import perplexity as ppl_lib
from jaxcomp.eval.size import kernel_sparsity, param_count
from jaxcomp.models.zoo import load_model
from jaxcomp.oneshot import LayerResult, calib_tokens, factorize, prune, ptq
from jaxcomp.recipe import Recipe
from jaxcomp.serve import convert, save_packed


def job_config(recipe: Recipe | None, *, tiny: bool = False) -> ml_collections.ConfigDict:
  """The config of a `run_ptq` job on SmolLM2-135M (or, ``tiny``, a tiny random Llama with a
  byte tokenizer, for tests), compressing by ``recipe`` (None: the float baseline).

  Example::

    config = job_config(jc.Recipe([jc.Rule(PROJ, sparsity=jc.Sparsity("2:4"))]))
  """
  config = ml_collections.ConfigDict()
  config.task = "ptq"
  config.seed = 0
  config.model = dict(name="tiny" if tiny else "smollm2_135m", cache_dir="", scan_layers=False)
  config.calib = dict(text="wikitext2_valid", n_seq=8 if tiny else 128,
                      seq_len=64 if tiny else 512, batch_size=8, seed=0, dtype="bfloat16")
  config.eval = dict(split="test", text_path="", seq_len=64 if tiny else 512,
                     max_tokens=2048 if tiny else 32768, batch_size=4)
  config.save_packed = True
  config.recipe = None if recipe is None else recipe.to_config()
  return config


def eval_text(config: ml_collections.ConfigDict) -> tuple[str, str]:
  """``config.eval``'s text and its name: ``eval.text_path`` or WikiText-2 ``eval.split``."""
  if config.eval.text_path:
    return ppl_lib.read_text(config.eval.text_path), str(config.eval.text_path)
  return ppl_lib.wikitext2(config.eval.split), f"wikitext-2 {config.eval.split}"


def calib_path(config: ml_collections.ConfigDict) -> str | None:
  """``config.calib.text`` as a file path (None: the Austen novels)."""
  text = config.calib.text
  if text == "austen":
    return None
  path = ppl_lib.WIKITEXT2_DIR / "valid.txt" if text == "wikitext2_valid" else pathlib.Path(text)
  if not path.is_file():
    raise ValueError(f"config.calib.text={text!r}: no calibration text at {path} (use "
                     "'wikitext2_valid', 'austen' or a text file path)")
  return str(path)


def run_ptq(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs one PTQ variant into ``workdir`` and returns its report.

  Example::

    report = run_ptq(get_config("gptq_w4g128"), "runs/ptq/gptq_w4g128")
    report["ppl"], report["packed_bits_per_param"]
  """
  work = pathlib.Path(workdir)
  recipe = Recipe.from_config(config.recipe) if config.recipe is not None else None
  if (work / "report.json").exists():
    raise ValueError(f"{work} already holds a finished run (report.json); use a new --workdir")
  if (work / "packed").exists():
    raise ValueError(f"{work / 'packed'} exists from an earlier run; use a new --workdir")
  calib_dtype = {"bfloat16": jnp.bfloat16, "float32": None}.get(config.calib.dtype, "bad")
  if calib_dtype == "bad":
    raise ValueError(f"config.calib.dtype must be 'bfloat16' or 'float32', got "
                     f"{config.calib.dtype!r}")
  text, text_name = eval_text(config)  # fail on a missing file before the long part
  calib_file = calib_path(config) if recipe is not None else None
  work.mkdir(parents=True, exist_ok=True)
  (work / "config.json").write_text(config.to_json(indent=2))

  t_start = t0 = time.perf_counter()
  model, tokenizer = load_model(config)
  ids = np.asarray(tokenizer.encode(text).ids, np.int32)
  n_split = len(ids)
  if config.eval.max_tokens:
    ids = ids[:config.eval.max_tokens]
  t_load = time.perf_counter() - t0

  report: dict[str, Any] = {"model": config.model.name, "eval_text": text_name,
                            "eval_split_tokens": n_split, "load_s": round(t_load, 1),
                            "peak_rss_mb": {"load": _peak_rss_mb()}}
  results: list[LayerResult] = []
  if recipe is not None:
    calib = calib_tokens(tokenizer, n_seq=config.calib.n_seq, seq_len=config.calib.seq_len,
                         text_path=calib_file, seed=config.calib.seed)
    report["calib_tokens"] = int(calib.size)
    kwargs = dict(batch_size=config.calib.batch_size, calib_dtype=calib_dtype)
    if any(r.sparsity is not None for r in recipe.rules):
      model, pruned = _stage("prune", report, results, lambda: prune(
          model, recipe, calib, return_report=True, **kwargs))
      report["sparsity"] = kernel_sparsity(model, [r.path for r in pruned])
    if any(r.lowrank is not None for r in recipe.rules):
      report["params_before"] = param_count(model)
      model, _ = _stage("factorize", report, results, lambda: factorize(
          model, recipe, calib, return_report=True, **kwargs))
      report["params"] = param_count(model)
    if any(r.quant is not None for r in recipe.rules):
      model = _quantize_and_pack(model, recipe, calib, kwargs, config, work, report, results)
  t0 = time.perf_counter()
  r = ppl_lib.perplexity(model, ids, seq_len=config.eval.seq_len,
                         batch_size=config.eval.batch_size)
  report.update({"ppl": r["ppl"], "nll": r["nll"], "eval_tokens": r["tokens"],
                 "eval_s": round(time.perf_counter() - t0, 1),
                 "wall_s": round(time.perf_counter() - t_start, 1)})
  report["peak_rss_mb"]["eval"] = _peak_rss_mb()
  (work / "layers.json").write_text(json.dumps([vars(x) for x in results], indent=1))
  logging.info("ptq report: %s", report)
  return report


def _peak_rss_mb() -> float:
  """This process' peak resident memory so far (MB): the report records it after each phase."""
  return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _stage(name: str, report: dict[str, Any], results: list[LayerResult],
           run: Any) -> tuple[nnx.Module, list[LayerResult]]:
  """Runs one transform, timing it and recording its layers' mean relative output error."""
  t0 = time.perf_counter()
  model, mine = run()
  report[f"{name}_s"] = round(time.perf_counter() - t0, 1)
  report["peak_rss_mb"][name] = _peak_rss_mb()
  report[f"{name}_layers"] = len(mine)
  errors = [r.error for r in mine if np.isfinite(r.error)]
  if errors:
    report[f"{name}_mean_layer_rel_error"] = float(np.mean(errors))
  results.extend(mine)
  return model, mine


def _quantize_and_pack(model: nnx.Module, recipe: Recipe, calib: np.ndarray,
                       kwargs: dict[str, Any], config: ml_collections.ConfigDict,
                       work: pathlib.Path, report: dict[str, Any],
                       results: list[LayerResult]) -> nnx.Module:
  """`ptq`, then `convert` (and `save_packed` into ``work/packed``)."""
  model, _ = _stage("ptq", report, results, lambda: ptq(model, recipe, calib,
                                                         return_report=True, **kwargs))
  report["quantized_layers"] = report.pop("ptq_layers")
  if "ptq_mean_layer_rel_error" in report:
    report["mean_layer_rel_error"] = report.pop("ptq_mean_layer_rel_error")
  t0 = time.perf_counter()
  model = convert(model)
  if config.save_packed:
    size = save_packed(model, work / "packed")
    report.update({k: (round(v, 4) if isinstance(v, float) else v)
                   for k, v in size.to_dict().items()})
  report["convert_save_s"] = round(time.perf_counter() - t0, 1)
  report["peak_rss_mb"]["convert_save"] = _peak_rss_mb()
  return model
