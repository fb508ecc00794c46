"""The PTQ experiment behind ``python -m jaxcomp --config configs/smollm2_ptq.py:VARIANT``.

``run_ptq(config, workdir)``: load the model and tokenizer, cut calibration windows from a
training text, `jaxcomp.ptq` with the config's recipe, `jaxcomp.convert` to packed weights,
save them with Orbax (``workdir/packed``), and evaluate perplexity on WikiText-2 (or any text).
Returns the report (the CLI writes it as ``report.json`` / ``report.md``).
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

from absl import logging
from flax import nnx
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxcomp.eval import perplexity as ppl_lib
from jaxcomp.packed_io import save_packed
from jaxcomp.ptq.api import LayerResult, ptq
from jaxcomp.ptq.calibrate import calib_tokens
from jaxcomp.recipe import Recipe
from jaxcomp.rewrite.convert import convert


class ByteTokenizer:
  """UTF-8 bytes as token ids (vocabulary 256): the tokenizer of the ``tiny`` test model."""

  class _Encoding:
    def __init__(self, ids):
      self.ids = ids

  def encode(self, text: str) -> "ByteTokenizer._Encoding":
    return self._Encoding(list(text.encode("utf-8")))


def _load(config: ml_collections.ConfigDict) -> tuple[nnx.Module, Any]:
  name = config.model.name
  if name == "smollm2_135m":
    from jaxcomp.models import io  # pylint: disable=import-outside-toplevel
    path = io.fetch_smollm2(config.model.cache_dir or None)
    return io.load_gguf(path, attn_batch_chunk=1), io.gguf_tokenizer(path)
  if name == "tiny":
    from jaxcomp.models.llama import Llama, LlamaConfig  # pylint: disable=import-outside-toplevel
    return Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(config.seed)), ByteTokenizer()
  raise ValueError(f"config.model.name must be 'smollm2_135m' or 'tiny', got {name!r}")


def _eval_text(config: ml_collections.ConfigDict) -> tuple[str, str]:
  if config.eval.text_path:
    return ppl_lib.read_text(config.eval.text_path), str(config.eval.text_path)
  return ppl_lib.wikitext2(config.eval.split), f"wikitext-2 {config.eval.split}"


def _calib_path(config: ml_collections.ConfigDict) -> str | None:
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
  text, text_name = _eval_text(config)  # fail on a missing file before the long part
  calib_path = _calib_path(config) if recipe is not None else None
  work.mkdir(parents=True, exist_ok=True)
  (work / "config.json").write_text(config.to_json(indent=2))

  t_start = t0 = time.perf_counter()
  model, tokenizer = _load(config)
  ids = np.asarray(tokenizer.encode(text).ids, np.int32)
  n_split = len(ids)
  if config.eval.max_tokens:
    ids = ids[:config.eval.max_tokens]
  t_load = time.perf_counter() - t0

  report: dict[str, Any] = {"model": config.model.name, "eval_text": text_name,
                            "eval_split_tokens": n_split, "load_s": round(t_load, 1)}
  results: list[LayerResult] = []
  if recipe is not None:
    t0 = time.perf_counter()
    calib = calib_tokens(tokenizer, n_seq=config.calib.n_seq, seq_len=config.calib.seq_len,
                         text_path=calib_path, seed=config.calib.seed)
    model = ptq(model, recipe, calib, batch_size=config.calib.batch_size,
                calib_dtype=calib_dtype, results=results)
    report["ptq_s"] = round(time.perf_counter() - t0, 1)
    report["calib_tokens"] = int(calib.size)
    report["quantized_layers"] = len(results)
    errors = [r.error for r in results if np.isfinite(r.error)]
    if errors:
      report["mean_layer_rel_error"] = float(np.mean(errors))
    t0 = time.perf_counter()
    model = convert(model)
    if config.save_packed:
      size = save_packed(model, work / "packed")
      report.update({k: (round(v, 4) if isinstance(v, float) else v)
                     for k, v in size.to_dict().items()})
    report["convert_save_s"] = round(time.perf_counter() - t0, 1)
  t0 = time.perf_counter()
  r = ppl_lib.perplexity(model, ids, seq_len=config.eval.seq_len,
                         batch_size=config.eval.batch_size)
  report.update({"ppl": r["ppl"], "nll": r["nll"], "eval_tokens": r["tokens"],
                 "eval_s": round(time.perf_counter() - t0, 1),
                 "wall_s": round(time.perf_counter() - t_start, 1)})
  (work / "layers.json").write_text(json.dumps([vars(x) for x in results], indent=1))
  logging.info("ptq report: %s", report)
  return report
