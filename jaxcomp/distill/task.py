"""The distillation task of the training loop: a frozen teacher, a compressed student.

``config.task = "distill"`` (see ``configs/smollm2_distill.py``):

* **teacher**: ``config.model`` (SmolLM2-135M from its GGUF, or a tiny random Llama for
  tests), frozen: its weights are the loop's ``frozen`` pytree -- an argument of the jitted
  step, sharded by the same rules as the student, never trained or checkpointed (it is
  rebuilt from its source on resume); ``teacher.dtype="bfloat16"`` halves its memory.
* **student**: a copy of the same model compressed in order by ``config.student``:
  ``keep_layers`` (depth pruning: every other block dropped evenly down to that many),
  ``prune`` (a one-shot `jc.Sparsity` on the projections, calibrated on training rows),
  ``factorize`` (a `jc.LowRank` on the projections); the loop then applies ``config.recipe``
  (QAT: `jc.quantize`; sparsity rules keep the pruned pattern with `sparsify`). Rules address
  the student as ``student/layers/...``.
* **loss** (``config.distill``): ``alpha * T^2 KL + (1 - alpha) * CE`` on the logits
  (``top_k > 0``: KL over the teacher's top k), ``+ hidden_weight *`` hidden-state matching
  through learned projections (``hidden_kind`` mse / cosine, student layers mapped evenly
  onto teacher layers), ``+ attention_weight *`` KL of the last layer's attention maps.
  ``alpha = 0`` with both weights 0 is plain fine-tuning (the baseline distillation must beat).
* **data**: `jaxcomp.data.text` packed rows of ``data.seq_len + 1`` tokens from
  ``data.corpus`` (each process reads only its rows), or a mix (``data.sources``,
  "name:weight,...": ``wikitext2``, ``austen``, ``files`` (``data.files``) and ``self``,
  sequences sampled from the teacher with ``data.generation``, as LLM-QAT trains on; the
  weights split ``data.mix_rows`` rows exactly, `jaxcomp.data.calibration.mix_counts`);
  evaluation: perplexity on the first
  ``eval.max_tokens`` tokens of WikiText-2 *valid* (or ``eval.text_path``), student and teacher.
"""

from __future__ import annotations

import pathlib
from typing import Any

import einops
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jaxcomp.distill import losses
from jaxcomp.eval import perplexity as ppl_lib
from jaxcomp.models.partitioning import axes
from jaxcomp.models.llama import Llama, apply_rope


class Distiller(nnx.Module):
  """What distillation trains: the student and one projection per hidden-matched layer.

  Example::

    d = Distiller(student, teacher_dim=576, n_projections=30, rngs=nnx.Rngs(0))
  """

  def __init__(self, student: Llama, *, teacher_dim: int, n_projections: int, rngs: nnx.Rngs):
    self.student = student
    d = student.config.dim
    init = (nnx.initializers.constant(jnp.eye(d)) if d == teacher_dim
            else nnx.initializers.lecun_normal())
    self.projections = nnx.List([
        nnx.Linear(d, teacher_dim, use_bias=False, kernel_init=init, rngs=rngs,
                   kernel_metadata=axes("embed", None)) for _ in range(n_projections)])


def layer_map(n_student: int, n_teacher: int) -> list[int]:
  """The teacher layer each student layer matches: evenly spaced, last onto last.

  Example:
    >>> layer_map(3, 6)
    [1, 3, 5]
  """
  return [round((i + 1) * n_teacher / n_student) - 1 for i in range(n_student)]


def attention_probs(model: Llama, hidden_in: jax.Array, layer: int) -> jax.Array:
  """Causal attention distributions ``[B, H, T, T]`` of block ``layer`` given its input."""
  block = model.layers[layer]
  attn = block.attn
  x = block.attn_norm(hidden_in)
  b, t, _ = x.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  hd = attn.head_dim
  q = apply_rope(einops.rearrange(attn.q_proj(x), "b t (h d) -> b h t d", d=hd).swapaxes(1, 2),
                 positions, theta=attn.rope_theta, style=attn.rope_style).swapaxes(1, 2)
  k = apply_rope(einops.rearrange(attn.k_proj(x), "b t (h d) -> b h t d", d=hd).swapaxes(1, 2),
                 positions, theta=attn.rope_theta, style=attn.rope_style).swapaxes(1, 2)
  k = jnp.repeat(k, q.shape[1] // k.shape[1], axis=1)  # query head h reads kv head h // g
  scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * hd**-0.5
  causal = jnp.tril(jnp.ones((t, t), bool))
  return jax.nn.softmax(jnp.where(causal, scores, jnp.finfo(jnp.float32).min), axis=-1)


def _corpus(cfg: ml_collections.ConfigDict, name: str, field: str) -> Any:
  """``data.corpus`` (or a ``data.sources`` name) as a `jaxcomp.data.text` corpus."""
  from jaxcomp.data import text  # pylint: disable=import-outside-toplevel
  if name == "files":
    paths = [p for p in cfg.files.split(",") if p]
    return text.files_config(cfg.files_name or "files", {"train": paths})
  if name not in text.CORPORA:
    raise ValueError(f"{field} must be one of {', '.join(text.CORPORA)} or 'files', got {name!r}")
  return name


def _mixed_rows(config: ml_collections.ConfigDict, tokenizer: Any, teacher: Any) -> np.ndarray:
  """``data.mix_rows`` training rows of ``data.seq_len + 1`` tokens mixed from
  ``data.sources``: a text source gives a seeded sample of its packed rows (without
  repetition), ``self`` sequences sampled from the teacher (`calibration.self_generated`,
  cached under ``data.data_dir``). Every process builds the same rows (deterministic; process
  0 first, `_process0_first`, so that the caches are written once)."""
  from jaxcomp.data import calibration, text  # pylint: disable=import-outside-toplevel
  cfg = config.data
  weights = calibration.parse_sources(cfg.sources, "data.sources")
  n = cfg.get("mix_rows", 0)
  if isinstance(n, bool) or not isinstance(n, int) or n < 1:
    raise ValueError(f"data.sources needs data.mix_rows, the training rows of the mix (an int "
                     f">= 1); got {n!r}")
  parts = []
  for i, (name, count) in enumerate(calibration.mix_counts(weights, n).items()):
    if count == 0:
      continue
    if name == calibration.SELF:
      if teacher is None:
        raise ValueError("data.sources 'self' samples the teacher, which this task does not have")
      gen = calibration.Generation(**cfg.get("generation", {}))
      parts.append(calibration.self_generated(
          teacher, count, cfg.seq_len + 1, seed=config.seed + i, generation=gen,
          suppress=gen.suppressed(tokenizer),
          cache_dir=pathlib.Path(cfg.data_dir) / "jaxcomp_self"))
      continue
    rows = text.packed_tokens(cfg.data_dir, _corpus(cfg, name, "data.sources names"), "train",
                              tokenizer, seq_len=cfg.seq_len).tokens
    if len(rows) < count:
      raise ValueError(f"data.sources: {name!r} has {len(rows)} training rows of "
                       f"{cfg.seq_len + 1} tokens, fewer than the {count} of the mix")
    pick = np.sort(np.random.default_rng(config.seed + i).choice(len(rows), count,
                                                                 replace=False))
    parts.append(np.asarray(rows[pick]))
  return np.concatenate(parts).astype(np.int32)


def _process0_first(build: Any) -> Any:
  """``build()`` on process 0, then on the others once it is done (process 0 keeps its result):
  what it writes to shared caches (tfds datasets, packed tokens, sampled rows) is written once
  and read everywhere else."""
  if jax.process_count() == 1:
    return build()
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  out = build() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices("jaxcomp training rows")
  return out if jax.process_index() == 0 else build()


class _TextData:
  """Packed training rows by step (this process's slice) and the evaluation token stream."""

  def __init__(self, config: ml_collections.ConfigDict, tokenizer: Any, teacher: Any = None):
    from jaxcomp.data import sampler, text  # pylint: disable=import-outside-toplevel
    cfg = config.data
    if cfg.get("sources", ""):
      self.rows = text.PackedTokens(_process0_first(
          lambda: _mixed_rows(config, tokenizer, teacher)))
    else:
      corpus = _corpus(cfg, cfg.corpus, "data.corpus")
      self.rows = _process0_first(lambda: text.packed_tokens(
          cfg.data_dir, corpus, "train", tokenizer, seq_len=cfg.seq_len))
    self._train = sampler.TrainSampler(
        self.rows, batch_size=cfg.batch_size, seed=config.seed,
        process_slice=(jax.process_index(), jax.process_count()))
    self.steps_per_epoch = self._train.steps_per_epoch
    path = config.eval.text_path or str(ppl_lib.WIKITEXT2_DIR / "valid.txt")
    ids = np.asarray(tokenizer.encode(ppl_lib.read_text(path)).ids, np.int32)
    self.eval_ids = ids[:config.eval.max_tokens] if config.eval.max_tokens else ids
    self.eval_name = path

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    return self._train.batch_at(step)

  def calib(self, n: int) -> np.ndarray:
    """The first ``n`` training rows (inputs only), for one-shot compression stages."""
    return np.asarray(self.rows.tokens[:n, :-1])


class DistillTask:
  """Teacher -> student distillation (module docstring). One instance per run."""

  def __init__(self):
    self._base = None
    self._tokenizer = None
    self._data = None
    self._teacher_graphdef = None
    self._distill = None

  def _load(self, config, abstract=False):
    self._distill = config.distill
    if self._base is None:
      from jaxcomp.models import zoo  # pylint: disable=import-outside-toplevel
      if abstract:
        self._base = zoo.abstract_model(config)
      else:
        self._base, self._tokenizer = zoo.load_model(config)
        self._base = nnx.clone(self._base)
    return self._base

  def data(self, config: ml_collections.ConfigDict) -> _TextData:
    self._load(config)
    if self._data is None:
      self._data = _TextData(config, self._tokenizer, self._base)
    return self._data

  def model(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs,
            abstract: bool = False) -> Distiller:
    base = self._load(config, abstract)
    if abstract:
      student = build_student(base, config.student, calib=None, abstract=True)
      n = student.config.n_layers if config.distill.hidden_weight else 0
      return nnx.eval_shape(lambda s: Distiller(s, teacher_dim=base.config.dim, n_projections=n,
                                                rngs=nnx.Rngs(config.seed)), student)
    student = build_student(base, config.student, self.data(config).calib)
    n = student.config.n_layers if config.distill.hidden_weight else 0
    return Distiller(student, teacher_dim=base.config.dim, n_projections=n, rngs=rngs)

  def batch_spec(self, config: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
    return {"tokens": jax.ShapeDtypeStruct((config.data.batch_size, config.data.seq_len + 1),
                                           jnp.int32)}

  def frozen(self, config: ml_collections.ConfigDict, abstract: bool = False) -> nnx.State:
    teacher = self._load(config, abstract)
    if config.teacher.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"teacher.dtype must be 'float32' or 'bfloat16', got "
                       f"{config.teacher.dtype!r}")
    graphdef, state = nnx.split(teacher)
    dtype = jnp.bfloat16 if config.teacher.dtype == "bfloat16" else None
    if abstract:
      self._teacher_graphdef = graphdef
      return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype if jnp.issubdtype(
          x.dtype, jnp.floating) and dtype else x.dtype), state)
    # Own buffers: the student shares its untouched arrays with the teacher, and the step
    # donates the student's.
    state = jax.tree.map(lambda x: jnp.array(x, dtype=dtype if jnp.issubdtype(
        x.dtype, jnp.floating) else None, copy=True), state)
    self._teacher_graphdef = graphdef
    return state

  def loss(self, model: Distiller, batch, rng, frozen):
    del rng
    cfg = self._distill
    tokens = batch["tokens"]
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    teacher = nnx.merge(self._teacher_graphdef, frozen)
    t_logits, t_hidden = teacher(inputs, return_hidden=True)
    t_logits = jax.lax.stop_gradient(t_logits)
    s_logits, s_hidden = model.student(inputs, return_hidden=True)
    if cfg.top_k:
      kd = losses.topk_logit_kd(s_logits, t_logits, k=cfg.top_k, temperature=cfg.temperature)
    else:
      kd = losses.logit_kd(s_logits, t_logits, temperature=cfg.temperature)
    ce = losses.cross_entropy(s_logits, labels)
    total = cfg.alpha * kd + (1.0 - cfg.alpha) * ce
    metrics = {"kd": kd, "ce": ce}
    if cfg.hidden_weight:
      tmap = layer_map(len(s_hidden), len(t_hidden))
      hidden = sum(losses.hidden_loss(h, t_hidden[j], proj.kernel[...], kind=cfg.hidden_kind)
                   for h, j, proj in zip(s_hidden, tmap, model.projections)) / len(s_hidden)
      total = total + cfg.hidden_weight * hidden
      metrics["hidden"] = hidden
    if cfg.attention_weight:
      s_in = s_hidden[-2] if len(s_hidden) > 1 else model.student.embed(inputs)
      t_in = t_hidden[-2] if len(t_hidden) > 1 else teacher.embed(inputs)
      attn = losses.attention_loss(
          attention_probs(model.student, s_in, len(s_hidden) - 1),
          attention_probs(teacher, jax.lax.stop_gradient(t_in), len(t_hidden) - 1))
      total = total + cfg.attention_weight * attn
      metrics["attention"] = attn
    return total, metrics

  def evaluate(self, model: Distiller, data: _TextData, frozen) -> dict[str, Any]:
    teacher = nnx.merge(self._teacher_graphdef, frozen)
    seq = min(512, model.student.config.max_seq_len, len(data.eval_ids) - 1)
    student = ppl_lib.perplexity(model.student, data.eval_ids, seq_len=seq, batch_size=4)
    teacher_ppl = ppl_lib.perplexity(teacher, data.eval_ids, seq_len=seq, batch_size=4)
    return {"eval_ppl": student["ppl"], "teacher_eval_ppl": teacher_ppl["ppl"],
            "eval_tokens": student["tokens"], "eval_text": data.eval_name}


def build_student(base: Llama, cfg: ml_collections.ConfigDict, calib: Any, *,
                  abstract: bool = False) -> Llama:
  """``base`` compressed by ``cfg`` (keep_layers, prune, factorize, in that order); ``base`` is
  untouched. ``calib(n)`` gives ``n`` calibration rows for the one-shot stages.

  ``abstract``: ``base`` has shapes only (`jaxcomp.models.zoo.abstract_model`) and so has the
  student: depth pruning applies, one-shot pruning keeps every shape (its zeros need weights:
  skipped), factorize is refused (its ranks depend on the weights for ``energy`` and on
  calibration for SVD-LLM).

  Example::

    student = build_student(teacher, ml_collections.ConfigDict(dict(
        keep_layers=15, prune=jc.Sparsity("2:4", method="wanda").to_dict(), factorize=None,
        calib_rows=64)), calib=data.calib)
  """
  from jaxcomp.lowrank.spec import LowRank  # pylint: disable=import-outside-toplevel
  from jaxcomp.oneshot import factorize, prune  # pylint: disable=import-outside-toplevel
  from jaxcomp.recipe import Recipe, Rule  # pylint: disable=import-outside-toplevel
  from jaxcomp.models.llama_surgery import drop_blocks  # pylint: disable=import-outside-toplevel
  from jaxcomp.sparse.spec import Sparsity  # pylint: disable=import-outside-toplevel

  student = nnx.clone(base)
  n = base.config.n_layers
  if cfg.keep_layers:
    if not 0 < cfg.keep_layers <= n:
      raise ValueError(f"student.keep_layers must be in [1, {n}], got {cfg.keep_layers}")
    keep = set(layer_map(cfg.keep_layers, n))
    student = drop_blocks(student, [i for i in range(n) if i not in keep])
  if abstract:
    if cfg.factorize:
      raise ValueError("student.factorize cannot be compiled without weights (--compile_only): "
                       "its ranks come from the weights")
    return student
  proj = r"layers/(\d+/)?(attn|mlp)/\w+_proj"
  rows = calib(cfg.calib_rows) if (cfg.prune or cfg.factorize) else None
  if cfg.prune:
    spec = Sparsity.from_dict(dict(cfg.prune))
    student = prune(student, Recipe([Rule(proj, sparsity=spec)]), rows, progress=False)
  if cfg.factorize:
    spec = LowRank.from_dict(dict(cfg.factorize))
    student = factorize(student, Recipe([Rule(proj, lowrank=spec)]), rows, progress=False)
  return student

