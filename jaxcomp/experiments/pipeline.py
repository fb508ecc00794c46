"""Stage pipelines: ``config.task = "pipeline"``, an ordered list of stages over one model.

``config.stages`` is the order, a comma-separated list of names (any order, names may
repeat: ``"prune,gptq,convert,eval"``; override it with ``--config.stages=...``); each name is
a section ``config.stage.<name>`` whose ``kind`` says what it does:

* ``prune`` / ``factorize`` / ``ptq``: the one-shot transforms (`jaxcomp.prune`,
  `jaxcomp.factorize`, `jaxcomp.ptq`) with the section's ``recipe``, calibrated on
  ``config.calib``;
* ``structured``: a smaller Llama: ``keep_layers`` blocks (evenly spaced), then the
  lowest-magnitude ``ffn_sparsity`` of every block's FFN channels and ``head_sparsity`` of the
  query heads of each key/value group removed (`jaxcomp.models.llama_surgery`);
* ``rotate``: QuaRot's Hadamard rotations folded into a float Llama (`rotate_llama`: the same
  logits, outliers spread), ``seed`` / ``online`` / ``heads``, before a ``ptq`` / ``quantize``
  that quantizes activations (W4A8, W4A4);
* ``search``: a per-layer recipe chosen under a budget (mixed precision, rank allocation,
  OWL sparsity; `jaxcomp.experiments.search_stage`), written to the stage's ``recipe.json``
  for a later ``ptq`` / ``factorize`` / ``prune`` stage whose section says
  ``recipe_from = "<search stage name>"`` instead of giving a ``recipe``;
* ``quantize``: the QAT rewrite (`jaxcomp.quantize`) with the section's ``recipe``;
* ``convert``: packed serving weights (`jaxcomp.convert`);
* ``eval``: the evaluation harness (`jaxcomp.eval.harness.evaluate_lm`) on ``config.eval``,
  scored against the uncompressed model (evaluated once per workdir, ``baseline/``).

Each stage ``i`` writes ``workdir/stages/<i>_<name>/``: its output model (Orbax, ``model/``,
when the stage changed it), ``report.json`` and, last, ``done.json`` with the stage's
fingerprint (its config, the model, the calibration and every earlier stage's fingerprint). A
rerun skips the finished stages and restores the last output into the structure the earlier
stages give (`structure`); a stage whose fingerprint changed is refused with a one-line error
(``--config.redo=True`` deletes it and every later stage and runs them again). Everything is
checked before anything runs: unknown stages and kinds, missing recipes, calibrated methods
without calibration, ``convert`` before any quantization.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import re
import resource
import shutil
import time
from typing import Any

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from jaxcomp.data import calibration
from jaxcomp.data import fortunes
from jaxcomp.distill import losses
from jaxcomp.distill.task import Distiller, DistillTask, layer_map
from jaxcomp.eval import harness
from jaxcomp.eval import metrics
from jaxcomp.eval import perplexity as ppl_lib
from jaxcomp.eval.size import kernel_sparsity
from jaxcomp.experiments import image
from jaxcomp.experiments import search_stage
from jaxcomp.experiments.compress import calib_sources, eval_text
from jaxcomp.layers.lowrank import LowRankLinear
from jaxcomp.lowrank.spec import LowRank
from jaxcomp.models import io
from jaxcomp.models.llama import Llama
from jaxcomp.models.llama_surgery import (StructuredKeep, drop_blocks, llama_structured_keep,
                                          rotate_llama, shrink_llama)
from jaxcomp.models.zoo import load_model
from jaxcomp.oneshot import factorize, prune, ptq, ptq_skeleton, registry
from jaxcomp.quant.qarray import QArray
from jaxcomp.recipe import Recipe, Rule
from jaxcomp.rewrite import engine, quantize
from jaxcomp.serve import convert, save_packed
from jaxcomp.train import workdir as wd
from jaxcomp.train.loop import train, zero_masks
from jaxcomp.train.tasks import ImageClassification

KINDS = ("prune", "structured", "rotate", "search", "factorize", "ptq", "quantize", "train",
         "distill", "convert", "eval")
_TRAINS = ("train", "distill")
_PAYLOAD = {"prune": ("sparsity", "sparsity"), "factorize": ("lowrank", "lowrank"),
            "ptq": ("quant", "quant"), "quantize": ("quant", None)}
_CHANGES_MODEL = {"prune", "structured", "rotate", "factorize", "ptq", "quantize", "convert",
                  "train", "distill"}
_STRUCTURED = ("keep_layers", "ffn_sparsity", "head_sparsity")
_ROTATE = ("seed", "online", "heads")
# ``calib.dtype``: the weight-only matmuls' dtype while calibration data flows (`jaxcomp.ptq`).
_CALIB_DTYPES = {"bfloat16": jnp.bfloat16, "float32": None}


@dataclasses.dataclass(frozen=True)
class Stage:
  """One entry of ``config.stages``: its position, name, kind and section."""
  index: int
  name: str
  kind: str
  config: ml_collections.ConfigDict

  @property
  def dirname(self) -> str:
    return f"{self.index}_{self.name}"

  @property
  def recipe(self) -> Recipe | None:
    r = self.config.get("recipe")
    return None if r is None else Recipe.from_config(r)


def plan(config: ml_collections.ConfigDict) -> list[Stage]:
  """The config's stages, checked: one-line `ValueError` for an unknown stage or kind, a
  transform without a matching recipe, a calibrated method with no calibration configured, a
  ``convert`` with no quantization before it.

  Example::

    [s.kind for s in plan(get_config("p_q"))]        # ['prune', 'ptq', 'convert', 'eval']
  """
  names = [n.strip() for n in str(config.get("stages", "")).split(",") if n.strip()]
  if not names:
    raise ValueError("config.stages is empty: give the stage names in order, e.g. "
                     "'prune,ptq,convert,eval'")
  sections = config.get("stage") or {}
  if config.get("calib") and config.calib.get("dtype", "bfloat16") not in _CALIB_DTYPES:
    raise ValueError(f"config.calib.dtype must be 'bfloat16' or 'float32', got "
                     f"{config.calib.dtype!r}")
  stages, quantized, converted, rewritten = [], False, False, ""
  searches: dict[str, str] = {}  # search stage name -> its space
  for i, name in enumerate(names):
    if name not in sections:
      raise ValueError(f"stage {i} {name!r} has no section config.stage.{name} (sections: "
                       f"{', '.join(sections) or 'none'})")
    cfg = sections[name]
    kind = cfg.get("kind", name)
    if kind not in KINDS:
      raise ValueError(f"stage {i} {name!r}: unknown kind {kind!r} (kinds: {', '.join(KINDS)})")
    stage = Stage(i, name, kind, cfg)
    if kind == "search":
      _check_search_stage(config, stage, rewritten)
      searches[name] = cfg.get("space", "quant")
    if cfg.get("recipe_from"):
      _check_recipe_from(stage, searches)
    elif kind in _PAYLOAD:
      field, solver_kind = _PAYLOAD[kind]
      recipe = stage.recipe
      specs = [getattr(r, field) for r in (recipe.rules if recipe else ())
               if getattr(r, field) is not None]
      if not specs:
        raise ValueError(f"stage {i} {name!r} ({kind}) needs config.stage.{name}.recipe with "
                         f"at least one rule with {field}=")
      if solver_kind is not None and any(registry.get(solver_kind, s.method).calibrated
                                         for s in specs):
        if not config.get("calib") or not config.calib.get("n_seq"):
          raise ValueError(f"stage {i} {name!r} ({kind}) uses a calibrated method but "
                           "config.calib.n_seq is not set (calibration sequences)")
    if kind == "structured":
      _check_structured_stage(stage, rewritten)
    if kind == "rotate":
      _check_rotate_stage(stage, rewritten)
    if kind in _TRAINS:
      _check_training_stage(config, stage, names[:i], converted)
    if kind in ("factorize", "ptq", "quantize", "convert"):
      rewritten = rewritten or name
    quantized = quantized or kind in ("ptq", "quantize")
    if kind == "convert" and not quantized:
      raise ValueError(f"stage {i} {name!r}: convert needs a ptq or quantize stage before it")
    converted = converted or kind == "convert"
    stages.append(stage)
  _check_inputs(config, stages)
  return stages


def _check_inputs(config: ml_collections.ConfigDict, stages: list[Stage]) -> None:
  """The files the stages will read exist (a one-line error before anything runs)."""
  kinds = {s.kind for s in stages}
  baseline = config.get("eval", {}).get("baseline", "original")
  for s in stages:
    if s.kind == "eval" and baseline != "original" and baseline not in [
        t.name for t in stages[:s.index]]:
      raise ValueError(f"config.eval.baseline={baseline!r} is neither 'original' nor a stage "
                       f"before stage {s.index} ({s.name})")
  if image.is_image(config):
    if "structured" in kinds:
      raise ValueError("the structured stage shrinks a jaxcomp Llama; this pipeline's model is "
                       f"{config.model.name!r}")
    from jaxcomp.data import fashion_mnist  # pylint: disable=import-outside-toplevel
    fashion_mnist.load(config.data.data_dir, "test")  # not prepared: says how
    return
  if kinds & {"prune", "factorize", "ptq"} and config.get("calib") and config.calib.get("n_seq"):
    calib_sources(config)
  if kinds & {"eval", *_TRAINS}:
    path = config.eval.get("text_path", "")
    if path and not pathlib.Path(path).is_file():
      raise ValueError(f"config.eval.text_path={path!r}: no such file")
    ood = config.eval.get("ood_text", "")
    if ood and ood != "fortunes" and not pathlib.Path(ood).is_file():
      raise ValueError(f"config.eval.ood_text={ood!r}: no such file (use 'fortunes' or a path)")
    if not path and config.eval.get("split", "test") not in ("valid", "test"):
      raise ValueError(f"config.eval.split must be 'valid' or 'test', got "
                       f"{config.eval.get('split')!r}")


def _check_search_stage(config: ml_collections.ConfigDict, stage: Stage, rewritten: str) -> None:
  i, name = stage.index, stage.name
  search_stage.check(i, name, stage.config)
  if rewritten:
    raise ValueError(f"stage {i} {name!r} (search) must come before stage {rewritten!r}: it "
                     "scores the float layers")
  if not config.get("calib") or not config.calib.get("n_seq"):
    raise ValueError(f"stage {i} {name!r} (search) scores layers on calibration data but "
                     "config.calib.n_seq is not set (calibration sequences)")


def _check_recipe_from(stage: Stage, searches: dict[str, str]) -> None:
  i, name, source = stage.index, stage.name, stage.config.recipe_from
  if stage.config.get("recipe") is not None:
    raise ValueError(f"stage {i} {name!r} has both recipe and recipe_from={source!r}: give one")
  if source not in searches:
    raise ValueError(f"stage {i} {name!r}: recipe_from={source!r} is not a search stage before "
                     f"it (search stages: {', '.join(searches) or 'none'})")
  want = search_stage.SPACES[searches[source]]
  if stage.kind != want:
    raise ValueError(f"stage {i} {name!r} ({stage.kind}): search {source!r} chooses space "
                     f"{searches[source]!r}, whose recipe a {want} stage applies")


def _check_fields(stage: Stage, fields: tuple[str, ...]) -> None:
  """A one-line error for a field of ``stage``'s section that is not one of ``fields``."""
  unknown = sorted(set(stage.config) - {"kind", *fields})
  if unknown:
    raise ValueError(f"stage {stage.index} {stage.name!r} ({stage.kind}): unknown field "
                     f"{unknown[0]!r} (fields: {', '.join(fields)})")


def _check_structured_stage(stage: Stage, rewritten: str) -> None:
  i, name, cfg = stage.index, stage.name, stage.config
  _check_fields(stage, _STRUCTURED)
  if not any(cfg.get(k) for k in _STRUCTURED):
    raise ValueError(f"stage {i} {name!r} (structured) removes nothing: set keep_layers, "
                     "ffn_sparsity or head_sparsity")
  for k in ("ffn_sparsity", "head_sparsity"):
    v = cfg.get(k, 0.0)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
      raise ValueError(f"stage {i} {name!r} (structured): {k} must be in [0, 1), got {v!r}")
  k = cfg.get("keep_layers", 0)
  if isinstance(k, bool) or not isinstance(k, int) or k < 0:
    raise ValueError(f"stage {i} {name!r} (structured): keep_layers must be an int >= 0 "
                     f"(0: keep every block), got {k!r}")
  if rewritten:
    raise ValueError(f"stage {i} {name!r} (structured) must come before stage {rewritten!r}: "
                     "it removes whole channels, heads and blocks of the float Llama")


def _check_rotate_stage(stage: Stage, rewritten: str) -> None:
  i, name, cfg = stage.index, stage.name, stage.config
  _check_fields(stage, _ROTATE)
  for k in ("online", "heads"):
    if not isinstance(cfg.get(k, True), bool):
      raise ValueError(f"stage {i} {name!r} (rotate): {k} must be a bool, got {cfg.get(k)!r}")
  seed = cfg.get("seed", 0)
  if isinstance(seed, bool) or not isinstance(seed, int):
    raise ValueError(f"stage {i} {name!r} (rotate): seed must be an int, got {seed!r}")
  if rewritten:
    raise ValueError(f"stage {i} {name!r} (rotate) must come before stage {rewritten!r}: it "
                     "folds the rotations into the float Llama's weights")


def _check_training_stage(config: ml_collections.ConfigDict, stage: Stage, before: list[str],
                          converted: bool) -> None:
  i, name, cfg = stage.index, stage.name, stage.config
  if converted:
    raise ValueError(f"stage {i} {name!r} ({stage.kind}): a packed model (after convert) "
                     "cannot be trained")
  if not cfg.get("train"):
    raise ValueError(f"stage {i} {name!r} ({stage.kind}) needs config.stage.{name}.train "
                     "(steps, lr, ...)")
  if not config.get("data"):
    raise ValueError(f"stage {i} {name!r} ({stage.kind}) needs config.data (the training text)")
  if stage.kind == "distill":
    if not cfg.get("distill"):
      raise ValueError(f"stage {i} {name!r} (distill) needs config.stage.{name}.distill "
                       "(alpha, temperature, ...)")
    teacher = cfg.get("teacher")
    if not teacher:
      raise ValueError(f"stage {i} {name!r} (distill) has no teacher: set "
                       f"config.stage.{name}.teacher to 'original' or an earlier stage's name")
    if teacher != "original" and teacher not in before:
      raise ValueError(f"stage {i} {name!r} (distill): teacher {teacher!r} is neither "
                       f"'original' nor an earlier stage ({', '.join(before) or 'none'})")


def _calib_reads(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What the calibration set depends on: ``config.calib`` without its cache folder, without
  the generation settings unless a source is "self", and without an empty ``sources`` (so a
  run made before sources existed keeps its fingerprint)."""
  calib = config.calib.to_dict()
  calib.pop("cache_dir", None)
  sources = calib.pop("sources", "")
  if sources:
    calib["sources"] = sources
  if "self" not in [p.split(":")[0].strip() for p in str(sources).split(",")]:
    calib.pop("generation", None)
  elif not calib.get("generation", {}).get("schedule_tokens"):  # (runs made before it existed)
    calib["generation"].pop("schedule_tokens", None)
    calib["generation"].pop("temperature_start", None)
  return calib


def _eval_reads(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """``config.eval`` without the out-of-domain keys when no out-of-domain text is set (so a run
  made before they existed keeps its fingerprint)."""
  e = config.eval.to_dict()
  if not e.get("ood_text"):
    e.pop("ood_text", None)
    e.pop("ood_max_tokens", None)
  return e


def stage_fingerprints(config: ml_collections.ConfigDict, stages: list[Stage]) -> list[str]:
  """Stage i's fingerprint: its kind and section, what it reads of the global config, and
  stage i-1's fingerprint (so a change invalidates that stage and every later one). Two runs
  whose stage i has the same fingerprint made the same model there (bench/pareto.py copies it).

  Example::

    fps = stage_fingerprints(config, plan(config))   # one sha256 hex string per stage
  """
  out, prev = [], ""
  for s in stages:
    reads = {"model": config.model.to_dict(), "seed": config.seed, "kind": s.kind,
             "stage": s.config.to_dict(), "prev": prev}
    if s.kind in ("prune", "factorize", "ptq", "search"):
      reads["calib"] = _calib_reads(config)
    if s.kind == "search":
      reads.update(search_stage.fingerprint_inputs(s.config))
      if image.is_image(config):  # the calibration images come from the training data
        reads["data"] = config.data.to_dict()
    if s.kind == "eval":
      reads["eval"] = _eval_reads(config)
    if s.kind in _TRAINS:
      reads["data"] = config.data.to_dict()
      reads["mesh"] = config.mesh.to_dict()
      reads["eval"] = _eval_reads(config)
    prev = hashlib.sha256(json.dumps(reads, sort_keys=True, default=str).encode()).hexdigest()
    out.append(prev)
  return out


def structure(kind: str, model: nnx.Module, stage: Stage, info: dict[str, Any]) -> nnx.Module:
  """The structure stage ``kind`` gives ``model`` (values are placeholders): what its saved
  output restores into. Run under `nnx.eval_shape`.

  Example::

    like = nnx.eval_shape(lambda m: structure("ptq", m, stage, {}), model)
  """
  if kind in ("prune", "eval", "train", "distill", "search"):
    return model
  if kind == "quantize":
    return quantize(model, stage.recipe)
  if kind == "ptq":  # a searched recipe is recorded when the stage ran
    return ptq_skeleton(model, Recipe.from_config(info["recipe"]) if "recipe" in info
                        else stage.recipe)
  if kind == "convert":
    return convert(model)
  if kind == "structured":  # the blocks, channels and heads kept, recorded when it ran
    return _shrink(model, info["structure"])
  if kind == "rotate":  # untied head, online Hadamard as configured
    return Llama(dataclasses.replace(model.config, tie_embeddings=False,
                                     ffn_hadamard=stage.config.get("online", True)),
                 rngs=nnx.Rngs(0))
  if kind == "factorize":  # the ranks the weights gave, recorded when the stage ran
    rules = [Rule(re.escape(p), lowrank=LowRank(rank=r)) for p, r in info["ranks"].items()]
    return factorize(model, Recipe(rules), progress=False)
  raise ValueError(f"no structure for stage kind {kind!r}")


def _shrink(model: Llama, keep: dict[str, Any]) -> Llama:
  """``model`` without the blocks, FFN channels and query heads ``keep`` does not name."""
  n = model.config.n_layers
  if len(keep["layers"]) < n:
    model = drop_blocks(model, [i for i in range(n) if i not in set(keep["layers"])])
  cfg = model.config
  ffn, heads = np.asarray(keep["ffn"], np.int64), np.asarray(keep["heads"], np.int64)
  if ffn.shape[1] < cfg.ffn_dim or heads.shape[1] < cfg.n_heads:
    model = shrink_llama(model, StructuredKeep(ffn, heads))
  return model


def _structured(model: nnx.Module, stage: Stage) -> tuple[Llama, dict[str, Any]]:
  """Depth pruning (``keep_layers`` blocks, evenly spaced, the last kept), then the
  lowest-magnitude FFN channels and query heads of every block (`llama_structured_keep`)."""
  if not isinstance(model, Llama):
    raise ValueError(f"stage {stage.index} {stage.name!r} (structured) needs a jaxcomp Llama, "
                     f"got {type(model).__name__}")
  cfg = stage.config
  n = model.config.n_layers
  k = cfg.get("keep_layers", 0) or n
  if k > n:
    raise ValueError(f"stage {stage.index} {stage.name!r} (structured): keep_layers={k} but "
                     f"the model has {n} blocks")
  layers = sorted(set(layer_map(k, n)))
  if k < n:
    model = drop_blocks(model, [i for i in range(n) if i not in set(layers)])
  keep = llama_structured_keep(model, ffn_sparsity=float(cfg.get("ffn_sparsity", 0.0)),
                               head_sparsity=float(cfg.get("head_sparsity", 0.0)))
  info = {"layers": layers, "ffn": keep.ffn.tolist(), "heads": keep.heads.tolist()}
  return _shrink(model, {**info, "layers": list(range(k))}), info


def _peak_rss_mb() -> float:
  """This process' peak resident memory so far (MB), recorded after each stage."""
  return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _save(model: nnx.Module, path: pathlib.Path) -> None:
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path.absolute(), nnx.to_pure_dict(nnx.state(model)))


def _restore(path: pathlib.Path, like: nnx.Module) -> nnx.Module:
  graphdef, state = nnx.split(like)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          nnx.to_pure_dict(state))
  try:
    with ocp.StandardCheckpointer() as ckpt:
      restored = ckpt.restore(path.absolute(), abstract)
  except (ValueError, KeyError, FileNotFoundError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f"{path} does not restore into the model its stages give: {first}") from None
  nnx.replace_by_pure_dict(state, restored)
  return nnx.merge(graphdef, state)


def load_base(config: ml_collections.ConfigDict) -> tuple[nnx.Module, Any]:
  """The model a pipeline with ``config`` starts from and its tokenizer (None for an image
  model, which starts freshly initialised from ``config.seed``).

  Example::

    model, tokenizer = load_base(get_config("p_q,tiny"))
  """
  if image.is_image(config):
    return ImageClassification().model(config, rngs=nnx.Rngs(config.seed)), None
  return load_model(config)


class _Context:
  """What stages share: the config, the original model, tokenizer, calibration, workdir."""

  def __init__(self, config, work, base, tokenizer):
    self.config, self.work, self.base, self.tokenizer = config, work, base, tokenizer
    self.image = image.is_image(config)
    self._calib = None

  def calib(self) -> np.ndarray | None:
    if self._calib is None and self.image:  # the first n_seq training images (0: none)
      n = self.config.calib.get("n_seq", 0)
      return image.images(self.config, "train", n)[0] if n else None
    if self._calib is None:
      c = self.config.calib
      gen = calibration.Generation(**c.get("generation", {}))
      cache = c.get("cache_dir", "") or str(io.default_cache_dir() / "calib")
      self._calib = calibration.calibration_set(
          self.tokenizer, calib_sources(self.config), n_seq=c.n_seq, seq_len=c.seq_len,
          seed=c.seed, model=self.base, generation=gen, cache_dir=cache)
    return self._calib

  def kwargs(self) -> dict[str, Any]:
    dtype = _CALIB_DTYPES[self.config.calib.get("dtype", "bfloat16")]
    return dict(batch_size=self.config.calib.batch_size, progress=False, return_report=True,
                calib_dtype=dtype)


def _weight_errors(base: nnx.Module, packed: nnx.Module) -> list[dict[str, Any]]:
  """Eq. 2 per packed kernel: ``||W - W_q||_2`` (and the relative Frobenius error) between
  the original model's float kernel ``W`` at the same path and the effective dequantized
  ``W_q`` (an AWQ / SmoothQuant layer's ``in_scale`` divided back out of its input rows), so it
  also counts what earlier stages changed (pruned or distilled weights). A stacked kernel
  (scanned layers) gives one row per layer (``index``)."""
  originals = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(base))}
  flat = list(nnx.to_flat_state(nnx.state(packed)))
  scales = {p[:-1]: v.get_value() for p, v in flat if p and p[-1] == "in_scale"}
  out = []
  for path, var in flat:
    q = var.get_value()
    w = originals.get(path)
    if not isinstance(q, QArray) or w is None:
      continue
    smooth = [v for p, v in scales.items() if p[:len(path) - 1] == path[:-1]]
    name = "/".join(map(str, path))
    if tuple(w.shape) == tuple(q.shape):
      out.append({"path": name, **_layer_error(w, q.dequantize(), q.contracting, smooth)})
    elif tuple(w.shape[1:]) == tuple(q.shape):  # a stack: the QArray leaves carry axis 0
      wq = harness.dequantize_stacked(q)
      for i in range(w.shape[0]):
        s_i = [np.asarray(smooth[0])[i]] if smooth else []
        out.append({"path": name, "index": i,
                    **_layer_error(w[i], wq[i], q.contracting, s_i)})
  return out


def _layer_error(w: Any, wq: Any, contracting: tuple[int, ...], smooth: list[Any]
                 ) -> dict[str, float]:
  wq = np.asarray(wq, np.float32)
  if smooth:  # W_q holds diag(s) W: the layer divides its inputs by s
    c = list(contracting)
    moved = np.moveaxis(wq, c, list(range(len(c))))
    lead = moved.shape[:len(c)]
    moved = moved / np.asarray(smooth[0], np.float32).reshape(lead + (1,) * (wq.ndim - len(c)))
    wq = np.moveaxis(moved, list(range(len(c))), c)
  return metrics.weight_error(np.asarray(w, np.float32), wq)


def _layer_summary(results: list[Any]) -> dict[str, Any]:
  errors = [r.error for r in results if np.isfinite(r.error)]
  return {"layers": len(results),
          **({"mean_layer_rel_error": float(np.mean(errors))} if errors else {})}


def _run_stage(ctx: _Context, model: nnx.Module, stage: Stage, stages: list[Stage]
               ) -> tuple[nnx.Module, dict]:
  kind, recipe = stage.kind, stage.recipe
  searched = {}
  if stage.config.get("recipe_from"):  # the recipe a search stage before it wrote
    source = [s for s in stages[:stage.index] if s.name == stage.config.recipe_from][-1]
    recipe = search_stage.load_recipe(ctx.work / "stages" / source.dirname)
    searched = {"recipe": recipe.to_config().to_dict(), "recipe_from": source.name}
  if kind in _TRAINS:
    return _train_stage(ctx, model, stage, stages)
  if kind == "search":
    return model, search_stage.run(model, stage.index, stage.name, stage.config, ctx.calib(),
                                   ctx.work / "stages" / stage.dirname, **ctx.kwargs())
  if kind == "prune":
    model, res = prune(model, recipe, ctx.calib(), **ctx.kwargs())
    return model, {**_layer_summary(res), "layer_sparsity": kernel_sparsity(
        model, [r.path for r in res]), "size": harness.stored_size(model), **searched}
  if kind == "structured":
    before = harness.stored_size(model)
    model, keep = _structured(model, stage)
    c = model.config
    return model, {"structure": keep, "n_layers": c.n_layers, "ffn_dim": c.ffn_dim,
                   "n_heads": c.n_heads, "params_before": before["params"],
                   "size": harness.stored_size(model)}
  if kind == "rotate":
    if not isinstance(model, Llama):
      raise ValueError(f"stage {stage.index} {stage.name!r} (rotate) needs a jaxcomp Llama, "
                       f"got {type(model).__name__}")
    cfg = stage.config
    model = rotate_llama(model, jax.random.key(cfg.get("seed", 0)),
                         online=cfg.get("online", True), heads=cfg.get("heads", True))
    return model, {"seed": cfg.get("seed", 0), "online": cfg.get("online", True),
                   "heads": cfg.get("heads", True)}
  if kind == "factorize":
    model, res = factorize(model, recipe, ctx.calib(), **ctx.kwargs())
    ranks = {p: int(m.a[...].shape[-1]) for p, m in engine.iter_layers(model)
             if isinstance(m, LowRankLinear)}
    return model, {**_layer_summary(res), "ranks": ranks, "size": harness.stored_size(model),
                   **searched}
  if kind == "ptq":
    model, res = ptq(model, recipe, ctx.calib(), **ctx.kwargs())
    return model, {**_layer_summary(res), **searched}
  if kind == "quantize":
    return quantize(model, recipe), {}
  if kind == "convert":
    model = convert(model)
    rotated = [s.name for s in stages[:stage.index] if s.kind == "rotate"]
    # The float weights the packed ones approximate: the rotated model's, after a rotation.
    reference = (_named_model(ctx, stages, rotated[-1], stage.index) if rotated else ctx.base)
    per_layer = _weight_errors(reference, model)
    info = {"size": harness.stored_size(model), "per_layer": per_layer}
    if per_layer:
      info["weight_error"] = {
          "layers": len(per_layer),
          "mean_spectral": float(np.mean([r["spectral"] for r in per_layer])),
          "mean_rel_frobenius": float(np.mean([r["rel_frobenius"] for r in per_layer]))}
    if stage.config.get("save_packed", True):  # the serving artifact (`jaxcomp.restore_packed`)
      packed = ctx.work / "stages" / stage.dirname / "packed"
      shutil.rmtree(packed, ignore_errors=True)
      info["saved"] = {k: (round(v, 4) if isinstance(v, float) else v)
                       for k, v in save_packed(model, packed).to_dict().items()}
    return model, info
  return model, _evaluate(ctx, model, stages, stage.index)


class _StageTask(DistillTask):
  """The distillation task on a pipeline's current model (the student) and a given teacher;
  ``ce_only``: plain fine-tuning (cross-entropy, no teacher). Weights that are exactly zero
  when the stage starts stay zero (`update_mask`)."""

  def __init__(self, student: nnx.Module, teacher: nnx.Module, tokenizer: Any, ce_only: bool):
    super().__init__()
    self._student, self._base, self._tokenizer, self._ce_only = (student, teacher, tokenizer,
                                                                 ce_only)

  def _load(self, config, abstract=False):
    self._distill = config.distill
    return self._base

  def model(self, config, *, rngs, abstract=False):
    n = self._student.config.n_layers if config.distill.hidden_weight else 0
    student = nnx.clone(self._student)
    # Own buffers: the step donates them, and the student shares untouched arrays with the
    # earlier stages' models (the original one included).
    nnx.update(student, jax.tree.map(lambda x: jnp.array(x, copy=True), nnx.state(student)))
    return Distiller(student, teacher_dim=self._base.config.dim, n_projections=n, rngs=rngs)

  def frozen(self, config, abstract=False):
    self._distill = config.distill
    return None if self._ce_only else super().frozen(config, abstract)

  def loss(self, model, batch, rng, frozen):
    if not self._ce_only:
      return super().loss(model, batch, rng, frozen)
    tokens = batch["tokens"]
    ce = losses.cross_entropy(model.student(tokens[:, :-1]), tokens[:, 1:])
    return ce, {"ce": ce}

  def evaluate(self, model, data, frozen):
    if not self._ce_only:
      return super().evaluate(model, data, frozen)
    seq = min(512, model.student.config.max_seq_len, len(data.eval_ids) - 1)
    r = ppl_lib.perplexity(model.student, data.eval_ids, seq_len=seq, batch_size=4)
    return {"eval_ppl": r["ppl"], "eval_tokens": r["tokens"], "eval_text": data.eval_name}

  def update_mask(self, params: Any) -> Any:
    return zero_masks(params)


def _train_stage(ctx: _Context, model: nnx.Module, stage: Stage, stages: list[Stage]
                 ) -> tuple[nnx.Module, dict[str, Any]]:
  """A ``train`` / ``distill`` stage: the training loop in ``<stage dir>/train`` (resumable at
  its last checkpoint), the student's weights as the stage's output."""
  config, cfg = ctx.config, stage.config
  ce_only = stage.kind == "train"
  teacher = model if ce_only else _named_model(ctx, stages, cfg.teacher, stage.index)
  workdir = str(ctx.work / "stages" / stage.dirname / "train")
  if ctx.image:
    task = image.ImageStageTask(model, None if ce_only else teacher,
                                None if ce_only else cfg.distill)
    report, trained = train(image.train_config(config, cfg), workdir, task=task,
                            return_model=True)
    return _off_mesh(trained), {k: v for k, v in report.items() if k != "model_bytes"}
  c = ml_collections.ConfigDict()
  c.task = "distill"
  c.seed = config.seed
  c.model = config.model.to_dict()
  c.teacher = dict(dtype=cfg.get("teacher_dtype", "float32"))
  c.distill = (dict(alpha=0.0, temperature=1.0, top_k=0, hidden_weight=0.0, hidden_kind="mse",
                    attention_weight=0.0) if ce_only else cfg.distill.to_dict())
  c.data = config.data.to_dict()
  c.eval = dict(text_path=config.eval.text_path, max_tokens=config.eval.max_tokens)
  c.train = cfg.train.to_dict()
  c.mesh = config.mesh.to_dict()
  c.recipe = None
  task = _StageTask(model, teacher, ctx.tokenizer, ce_only)
  report, trained = train(c, workdir, task=task, return_model=True)
  return _off_mesh(trained.student), {k: v for k, v in report.items() if k != "model_bytes"}


def _off_mesh(model: nnx.Module) -> nnx.Module:
  """The trained model off the training mesh: the next stages run on the default device,
  without the loop's logical axis rules (single-process runs)."""
  nnx.update(model, jax.tree.map(lambda x: jnp.asarray(jax.device_get(x)), nnx.state(model)))
  return model


def _named_model(ctx: _Context, stages: list[Stage], name: str, before: int) -> nnx.Module:
  """``"original"`` (the model the pipeline started from) or the output of the last stage
  called ``name`` before stage ``before``, restored."""
  if name == "original":
    return ctx.base
  idx = max(s.index for s in stages[:before] if s.name == name)
  return restore_stage_output(ctx.base, stages, ctx.work / "stages", idx)


def _eval_ids(ctx: _Context) -> tuple[np.ndarray, str]:
  """The evaluation token stream (``eval.max_tokens`` of it) and the text's name."""
  text, name = eval_text(ctx.config)
  ids = np.asarray(ctx.tokenizer.encode(text).ids, np.int32)
  name = f"{name} ({len(ids)} tokens)"
  return (ids[:ctx.config.eval.max_tokens] if ctx.config.eval.max_tokens else ids), name


def _cloze(ctx: _Context) -> list[dict[str, Any]]:
  """Cloze items from WikiText-2 *valid* sentences (never the reported split)."""
  n = ctx.config.eval.get("cloze_items", 0)
  if not n:
    return []
  text = ppl_lib.wikitext2("valid")
  sentences = [s.strip() + "." for s in re.split(r"(?<=[a-z]) \. ", text) if len(s.split()) > 5]
  ids = [ctx.tokenizer.encode(" " + s).ids[:48] for s in sentences]
  return harness.cloze_items(ids, n_items=n, seed=ctx.config.seed)


def _evaluator(ctx: _Context) -> tuple[Any, str]:
  """``evaluate(model) -> harness report`` on ``config.eval``'s data, and the data's name."""
  e, seed = ctx.config.eval, ctx.config.seed
  if ctx.image:
    x, y = image.images(ctx.config, e.get("split", "test"), e.get("max_images", 0))
    kw = dict(batch_size=e.batch_size, noise=tuple(e.get("noise", harness.DEFAULT_IMAGE_NOISE)),
              shifts=tuple(e.get("shifts", (1, 2))), latency_repeats=e.get("latency_repeats", 5),
              seed=seed)
    return (lambda m: harness.evaluate_classifier(m, x, y, **kw)), (
        f"fashion_mnist {e.get('split', 'test')} ({len(y)} images)")
  kw = dict(seq_len=e.seq_len, batch_size=e.batch_size, cloze=_cloze(ctx),
            rates=tuple(e.get("rates", harness.DEFAULT_TEXT_RATES)),
            latency_repeats=e.get("latency_repeats", 5), seed=seed,
            vocab_size=ctx.base.config.vocab_size)
  ids, text_name = _eval_ids(ctx)
  ood = _ood_ids(ctx)
  if ood is None:
    return (lambda m: harness.evaluate_lm(m, ids, **kw)), text_name

  def evaluate(m):  # in domain, then the out-of-domain text (perplexity and accuracy)
    report = harness.evaluate_lm(m, ids, **kw)
    report["ood"] = {**ppl_lib.perplexity(harness.as_nnx(m), ood[0], seq_len=e.seq_len,
                                          batch_size=e.batch_size), "text": ood[1]}
    return report
  return evaluate, text_name


def _ood_ids(ctx: _Context) -> tuple[np.ndarray, str] | None:
  """``config.eval.ood_text``'s tokens (``ood_max_tokens`` of them, default ``max_tokens``)
  and its name, or None: "fortunes" (`jaxcomp.data.fortunes`, out of every calibration
  source's domain) or a text file."""
  e = ctx.config.eval
  name = e.get("ood_text", "")
  if not name:
    return None
  if name == "fortunes":
    text = fortunes.fortunes_text()
  else:
    text = ppl_lib.read_text(name)
  ids = np.asarray(ctx.tokenizer.encode(text).ids, np.int32)
  n = e.get("ood_max_tokens", 0) or e.max_tokens
  return (ids[:n] if n else ids), f"{name} ({len(ids)} tokens)"


def _evaluate(ctx: _Context, model: nnx.Module, stages: list[Stage], index: int
              ) -> dict[str, Any]:
  """The harness on ``model`` and on the baseline (``config.eval.baseline``: ``"original"`` or
  an earlier stage's name; evaluated once per workdir, ``baseline/``), with the derived scores."""
  evaluate, data_name = _evaluator(ctx)
  report = evaluate(model)
  report["eval_text" if not ctx.image else "eval_data"] = data_name
  name = ctx.config.eval.get("baseline", "original")
  fps = stage_fingerprints(ctx.config, stages)
  source = "original" if name == "original" else fps[max(
      s.index for s in stages[:index] if s.name == name)]
  base_path = ctx.work / "baseline" / "report.json"
  key = hashlib.sha256(json.dumps([ctx.config.model.to_dict(), _eval_reads(ctx.config),
                                   ctx.config.seed, source],
                                  sort_keys=True, default=str).encode()).hexdigest()
  base = json.loads(base_path.read_text()) if base_path.is_file() else None
  if base is None or base.get("fingerprint") != key:
    reference = _named_model(ctx, stages, name, index)
    # An eval before any change scores the baseline itself.
    base = {**(evaluate(reference) if model is not reference else report), "fingerprint": key}
    harness.write_report(base, base_path.parent, title=f"baseline ({name})")
  report["scores"] = harness.derived_scores(report, base)
  report["baseline"] = {"name": name, **{k: v for k, v in base["quality"].items()
                                          if k in ("ppl", "accuracy")},
                        "bytes": base["size"]["bytes"], "p50_ms": base["speed"]["p50_ms"]}
  return report


def restore_stage_output(base: nnx.Module, stages: list[Stage], root: pathlib.Path,
                         upto: int) -> nnx.Module:
  """The model after stage ``upto`` of a run whose stages are in ``root``: the last saved
  output at or before it, restored into the structure the stages give ``base``.

  Example::

    packed = restore_stage_output(base, plan(config), pathlib.Path("runs/p_q/stages"), 2)
  """
  saved = [i for i in range(upto + 1) if stages[i].kind in _CHANGES_MODEL]
  if not saved:
    return base
  last = saved[-1]
  infos = []
  for s in stages[:last + 1]:
    done = root / s.dirname / "done.json"
    if not done.is_file():
      raise ValueError(f"stage {s.index} ({s.name}) has not finished in {root}")
    infos.append(json.loads(done.read_text())["info"])

  def chain(m):
    for s, info in zip(stages[:last + 1], infos):
      m = structure(s.kind, m, s, info)
    return m
  return _restore(root / stages[last].dirname / "model", nnx.eval_shape(chain, base))


def _run_config(work: pathlib.Path) -> ml_collections.ConfigDict:
  """The config of the pipeline run in ``work`` (its ``config.json``), checked."""
  path = work / "config.json"
  if not path.is_file():
    raise ValueError(f"{work} holds no pipeline run (no config.json)")
  config = ml_collections.ConfigDict(json.loads(path.read_text()))
  if config.get("task") != "pipeline":
    raise ValueError(f"{work} is not a pipeline run (task={config.get('task')!r})")
  return config


def final_model(workdir: str | pathlib.Path, base: nnx.Module | None = None
                ) -> tuple[nnx.Module, ml_collections.ConfigDict]:
  """The final model of a finished pipeline run and the run's config (``DIR/config.json``);
  ``base``: the model the run started from, when the caller has it loaded already.

  Example::

    model, config = final_model("runs/pipeline/p_q")
  """
  work = pathlib.Path(workdir)
  config = _run_config(work)
  if base is None:
    base = load_base(config)[0]
  stages = plan(config)
  return restore_stage_output(base, stages, work / "stages", len(stages) - 1), config


def evaluate_workdir(workdir: str) -> dict[str, Any]:
  """``python -m jaxcomp eval --workdir DIR``: the harness on the final model of a finished
  pipeline run (its own ``config.json``: ``config.eval``), written to ``DIR/eval/report.json``.

  Example::

    evaluate_workdir("runs/pipeline/p_q")["quality"]["ppl"]
  """
  work = pathlib.Path(workdir)
  config = _run_config(work)
  stages = plan(config)
  base, tokenizer = load_base(config)
  model = final_model(work, base)[0]
  report = _evaluate(_Context(config, work, base, tokenizer), model, stages, len(stages))
  harness.write_report(report, work / "eval", title=f"{work.name}: final model")
  return report


def run_pipeline(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) ``config``'s stages in ``workdir`` and returns the final report: the
  last ``eval`` stage's harness report (or the last stage's) with every stage's summary.

  Example::

    report = run_pipeline(get_config("p_q,tiny"), "runs/pipeline/p_q")
    report["quality"]["ppl"], [s["name"] for s in report["stages"]]
  """
  stages = plan(config)
  fps = stage_fingerprints(config, stages)
  work = pathlib.Path(workdir)
  root = work / "stages"
  start = 0
  for s, fp in zip(stages, fps):
    done = root / s.dirname / "done.json"
    if not done.is_file():
      break
    if json.loads(done.read_text()).get("fingerprint") != fp:
      if not config.get("redo", False):
        raise ValueError(f"stage {s.index} ({s.name}) changed since it ran in {root / s.dirname}:"
                         f" rerun with --config.redo=True to redo stages {s.index}-"
                         f"{len(stages) - 1}, or use a new --workdir")
      break
    start += 1
  if config.get("model", {}).get("name") == "smollm2_135m":
    # downloaded once, its SHA-256 checked: a corrupt cache is one line, before the workdir
    from jaxcomp.models import io  # pylint: disable=import-outside-toplevel
    io.fetch_smollm2(config.model.cache_dir or None)
  lock = wd.claim(str(work), None)  # validated: take the workdir (released at the end)
  try:
    return _run_stages(config, work, stages, fps, start)
  finally:
    lock.release()


def _run_stages(config: ml_collections.ConfigDict, work: pathlib.Path, stages: list[Stage],
                fps: list[str], start: int) -> dict[str, Any]:
  """`run_pipeline` once the workdir is claimed, from stage ``start``."""
  root = work / "stages"
  if root.is_dir():  # what the rerun replaces: unfinished or changed stages, dropped ones
    keep = {s.dirname for s in stages[:start]}
    if start < len(stages) and stages[start].kind in _TRAINS:  # resumes at its checkpoint
      began = root / stages[start].dirname / "started.json"
      if began.is_file() and json.loads(began.read_text()).get("fingerprint") == fps[start]:
        keep.add(stages[start].dirname)
    for d in root.iterdir():
      if d.name not in keep:
        shutil.rmtree(d)
  root.mkdir(parents=True, exist_ok=True)
  wd.write_text_atomic(str(work / "config.json"), config.to_json_best_effort(indent=2))

  if start < len(stages):  # a finished run only gathers its reports
    base, tokenizer = load_base(config)
    ctx = _Context(config, work, base, tokenizer)
    model = base
  if 0 < start < len(stages):
    model = restore_stage_output(base, stages, root, start - 1)
    logging.info("resuming at stage %d (%s)", start, stages[start].name)
  for s, fp in zip(stages[start:], fps[start:]):
    d = root / s.dirname
    d.mkdir(exist_ok=True)
    (d / "started.json").write_text(json.dumps({"fingerprint": fp}))
    t0 = time.perf_counter()
    model, info = _run_stage(ctx, model, s, stages)
    seconds = round(time.perf_counter() - t0, 2)
    info["peak_rss_mb"] = _peak_rss_mb()
    if s.kind in _CHANGES_MODEL:
      _save(model, d / "model")
    # What `structure` needs to rebuild the stage's output shapes goes to done.json only.
    keep = {k: info.pop(k) for k in ("structure", "recipe") if k in info}
    if "per_layer" in info:  # one row per layer: beside the report, not in it
      (d / "layers.json").write_text(json.dumps(info.pop("per_layer"), indent=1))
    keep.update({"ranks": info["ranks"]} if "ranks" in info else {})
    harness.write_report({"stage": s.name, "stage_kind": s.kind, "seconds": seconds, **info}, d,
                         title=f"stage {s.index}: {s.name}")
    tmp = d / "done.json.tmp"
    tmp.write_text(json.dumps({"fingerprint": fp, "seconds": seconds, "info": keep}))
    tmp.replace(d / "done.json")
    logging.info("stage %d (%s) done in %.1f s", s.index, s.name, seconds)
  summaries = []
  final: dict[str, Any] = {}
  for s in stages:
    r = json.loads((root / s.dirname / "report.json").read_text())
    summaries.append({"name": s.name, "kind": s.kind, "seconds": r["seconds"],
                      "peak_rss_mb": r.get("peak_rss_mb")})
    if s.kind == "eval":
      final = {k: v for k, v in r.items() if k not in ("stage", "stage_kind", "seconds")}
  return {**final, "stages": summaries}
