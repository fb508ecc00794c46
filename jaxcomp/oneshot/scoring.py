"""Per-layer sensitivity of an NNX model to each candidate quantization, and the mixed-precision
recipe a budget allows (`jaxcomp.search.allocate` on the scores).

`sensitivity` runs the sequential calibration pipeline once over the *uncompressed* model (every
layer is left as it is, so each layer sees the float model's inputs) and, for every matched
layer and every candidate `Quant`, solves the layer with the candidate's solver (GPTQ, AWQ,
RTN, ...) and scores it by the Hessian-weighted output error

    score = tr(dW^T H dW),  dW = W_candidate - W,  H = 2 X^T X / n,

i.e. twice the mean squared output error per token the candidate adds to that layer (the
quantity GPTQ minimises, now compared across layers). With ``kl_tokens`` it also measures the
direct score: the KL divergence (nats per token) of the model's next-token distribution with
only that layer replaced by the candidate, against the uncompressed model, on those tokens. Its cost is the candidate's packed
size in bits (values + scales + zero points of the `QArray` that `jaxcomp.convert` stores,
from the shapes `jaxcomp.quant.quantize_weight` gives). `Sensitivity.recipe` then picks one
candidate per layer minimising the summed score with the summed bits at most
``bits_per_param`` times the layers' parameters, and returns it as a `jaxcomp.Recipe` with one
rule per layer, which `jaxcomp.ptq` applies as any hand-written recipe.

Stacked layers (``nnx.vmap`` / ``nnx.scan``) are scored one layer of the stack at a time
(``blocks[i]/up``); since a recipe cannot split a stack, `Sensitivity.recipe` makes one choice
per stack (the stack's scores and costs summed over its layers).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxcomp.lowrank.spec import LowRank
from jaxcomp.oneshot import registry
from jaxcomp.oneshot.api import _set_kernel
from jaxcomp.oneshot.calibrate import LayerStats
from jaxcomp.oneshot.pipeline import as_batches, kernel_2d, plan_transform, solve_all
from jaxcomp.quant.qarray import quantize_weight
from jaxcomp.quant.spec import Quant
from jaxcomp.quantizers import gptq_core
from jaxcomp.recipe import Recipe, Rule
from jaxcomp.rewrite import engine
from jaxcomp.sparse.spec import Sparsity
from jaxcomp import search

_STACKED = re.compile(r"^(.*)\[(\d+)\](/.*)?$")


@dataclasses.dataclass
class _Scored:
  path: str  # relabelled ``path[i]/layer`` by the stack walk
  params: int
  bits: list[int]
  scores: list[float]
  per_out: list[np.ndarray] = dataclasses.field(default_factory=list)  # [N] per candidate
  trace_h: float = 0.0


@dataclasses.dataclass(frozen=True)
class Sensitivity:
  """Scores and packed costs of every (layer, candidate) pair.

  Attributes:
    paths: the L scored layers (a layer of a stack as ``path[i]/layer``), in solve order.
    names: the C candidate names.
    specs: the C candidate specs (`Quant` or `LowRank`; None keeps the layer as it is).
    params: int64[L] weights per layer.
    bits: int64[L, C] bits of the layer as stored under each candidate (packed `QArray`;
      low-rank factors in the kernel's dtype).
    scores: float64[L, C] Hessian-weighted output error of each candidate.
    kl: float64[L, C] the direct score (KL per token with only that layer compressed; NaN
      for candidates not measured), or None when not measured.
    fisher: float64[L, C] the Fisher-weighted output error (predicted KL per token, from the
      output gradients of ``fisher_tokens``), or None when not measured.
  """

  paths: tuple[str, ...]
  names: tuple[str, ...]
  specs: tuple[Quant, ...]
  params: np.ndarray
  bits: np.ndarray
  scores: np.ndarray
  kl: np.ndarray | None = None
  fisher: np.ndarray | None = None

  def estimator(self, name: str) -> np.ndarray:
    """The [L, C] scores of estimator ``name``:

    * ``"hessian"``: the Hessian-weighted output error (``scores``);
    * ``"fisher"``: the output error weighted by how much each output channel moves the
      model's output distribution (``fisher``: predicted KL per token);
    * ``"kl"``: the direct score, measured for every candidate;
    * ``"calibrated"``: the Fisher scores (the Hessian ones when Fisher was not measured)
      rescaled per layer and per bit width by the ratio of the direct to the cheap score of
      the measured candidates (``kl_candidates``; one forward per layer each) of the same
      bit width, or of the nearest measured one. The cheap score's ratios between group
      sizes of one bit width are kept; its level per layer and bit width is the measured
      KL's. (The Hessian score weighs every layer's output error alike, and the Fisher score
      is a second-order estimate that under-predicts the coarsest grids.)

    Example::

      sens.estimator("calibrated")[:, 0]    # predicted KL of the first candidate, per layer
    """
    if name == "hessian":
      return self.scores
    if name == "fisher":
      if self.fisher is None:
        raise ValueError("estimator 'fisher' was not measured; pass fisher_tokens= to "
                         "jc.sensitivity")
      return self.fisher
    if name not in ("kl", "calibrated"):
      raise ValueError(f"estimator must be 'hessian', 'fisher', 'kl' or 'calibrated', got "
                       f"{name!r}")
    if self.kl is None:
      raise ValueError(f"estimator {name!r} needs the direct score; pass kl_tokens= to "
                       "jc.sensitivity")
    measured = ~np.isnan(self.kl).any(axis=0)
    if name == "kl":
      if not measured.all():
        missing = [n for n, ok in zip(self.names, measured) if not ok]
        raise ValueError(f"estimator 'kl' was not measured for candidates {missing} "
                         "(kl_candidates=)")
      return self.kl
    base = self.fisher if self.fisher is not None else self.scores
    width = np.array([getattr(s, "w_bits", None) or 0 for s in self.specs])
    known = np.flatnonzero(measured)
    out = np.empty_like(base)
    for c in range(len(self.names)):
      gap = np.abs(width[known] - width[c])
      near = known[gap == gap.min()]  # the measured candidates of the nearest bit width
      cheap = base[:, near].sum(1)
      ratio = np.divide(self.kl[:, near].sum(1), cheap, out=np.zeros_like(cheap),
                        where=cheap > 0)
      out[:, c] = base[:, c] * ratio
    return out

  def spearman(self, estimator: str = "hessian") -> dict[str, float]:
    """Spearman rank correlation of a cheap estimator's scores (``"hessian"`` or ``"fisher"``)
    and the direct KL scores over the layers, per candidate whose KL was measured.

    Example::

      sens.spearman("fisher")       # {"w3g128": 0.83, "w4g128": 0.79}
    """
    cheap = self.estimator(estimator)
    if self.kl is None:
      raise ValueError("spearman: the direct score was not measured; pass kl_tokens= to "
                       "jc.sensitivity")
    import scipy.stats  # pylint: disable=import-outside-toplevel  (~0.7 s; only this needs it)
    return {n: float(scipy.stats.spearmanr(cheap[:, c], self.kl[:, c]).statistic)
            for c, n in enumerate(self.names) if not np.isnan(self.kl[:, c]).any()}

  def groups(self) -> list[tuple[str, list[int]]]:
    """``(recipe path, row indices)`` per choice: one per layer, one per stack."""
    out: dict[str, list[int]] = {}
    for i, p in enumerate(self.paths):
      m = _STACKED.match(p)
      out.setdefault(m.group(1) + (m.group(3) or "") if m else p, []).append(i)
    return list(out.items())

  def bits_per_param(self, choice: np.ndarray) -> float:
    """Packed bits per weight of the allocation ``choice`` (int[len(groups())])."""
    total = sum(self.bits[rows, c].sum() for (_, rows), c in zip(self.groups(), choice))
    return float(total / self.params.sum())

  def recipe(self, bits_per_param: float, *, method: str = "dp", unit: int | None = None,
             estimator: str = "hessian") -> tuple[Recipe, search.Allocation]:
    """The least-score allocation whose packed bits per weight are at most ``bits_per_param``,
    as a recipe with one rule per layer (per stack), and the `jaxcomp.search.Allocation`.

    The DP counts bits in ``unit``s, each layer's cost rounded *up* to a whole unit (so the
    budget holds in true bits); default: the smallest power of two keeping the table under
    50M cells (a few KB for a 135M-parameter model; exact when every cost is a multiple).
    ``estimator``: the scores minimised (`estimator`: ``"hessian"``, ``"kl"`` or
    ``"calibrated"``).

    Example::

      recipe, alloc = sens.recipe(3.5)
      model = jc.ptq(model, recipe, calib=tokens)
    """
    groups = self.groups()
    costs, scores = self._per_group(estimator)
    budget = float(bits_per_param) * float(self.params.sum())
    least = costs.min(1).sum() / self.params.sum()
    if budget < costs.min(1).sum():
      raise ValueError(f"recipe: {bits_per_param:g} bits/param is below the least achievable "
                       f"{least:.4f} (every layer at its cheapest candidate)")
    if method == "dp":
      if unit is None:
        unit = 1
        while len(groups) * budget / unit > 5e7:
          unit *= 2
      costs = np.ceil(costs / unit) * unit
    alloc = search.allocate(costs, scores, budget, method=method,
                            unit=unit if method == "dp" else None)
    rules = [_rule(path, self.specs[c]) for (path, _), c in zip(groups, alloc.choice)]
    return Recipe(rules), alloc

  def _per_group(self, estimator: str) -> tuple[np.ndarray, np.ndarray]:
    """[G, C] bits and scores summed over each choice's layers (`groups`)."""
    table = self.estimator(estimator)
    rows = [r for _, r in self.groups()]
    return (np.stack([self.bits[r].sum(0) for r in rows]).astype(np.float64),
            np.stack([table[r].sum(0) for r in rows]))

  def frontier(self, *, estimator: str = "hessian", points: int = 2048
               ) -> tuple[np.ndarray, np.ndarray]:
    """The predicted trade-off: ``(bits_per_param[k], score[k])``, the least summed score at
    each packed size from the smallest to the largest allocation (one choice per stack), on a
    grid of about ``points`` budget steps (each layer's cost rounded up to a step).

    Example::

      bits, loss = sens.frontier()         # plot(bits, loss): the predicted loss per budget
    """
    costs, scores = self._per_group(estimator)
    unit = 1.0
    while costs.max(1).sum() / unit > points * len(costs):
      unit *= 2.0
    cost, loss = search.frontier(np.ceil(costs / unit) * unit, scores, unit=unit)
    return cost / float(self.params.sum()), loss

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready: the candidates' specs and, per layer, each candidate's bits and scores
    (`from_dict` reads it back)."""
    def score(i, c):
      out = {}
      for key, table in (("kl", self.kl), ("fisher", self.fisher)):
        if table is not None and not np.isnan(table[i, c]):
          out[key] = float(table[i, c])
      return out
    return {"candidates": list(self.names),
            "specs": {n: None if s is None else s.to_dict()
                      for n, s in zip(self.names, self.specs)},
            "layers": {p: {"params": int(self.params[i]),
                           **{n: {"bits": int(self.bits[i, c]), "score": float(self.scores[i, c]),
                                  **score(i, c)}
                              for c, n in enumerate(self.names)}}
                       for i, p in enumerate(self.paths)}}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "Sensitivity":
    """The `Sensitivity` that `to_dict` wrote (e.g. a search stage's ``sensitivity.json``):
    allocate again at another budget without scoring again.

    Example::

      sens = jc.Sensitivity.from_dict(json.load(open("sensitivity.json")))
    """
    try:
      names = tuple(d["candidates"])
      specs = tuple(None if d["specs"][n] is None else
                    (Quant if "w_bits" in d["specs"][n] else LowRank).from_dict(d["specs"][n])
                    for n in names)
      paths = tuple(d["layers"])
      rows = [d["layers"][p] for p in paths]
      bits = np.asarray([[r[n]["bits"] for n in names] for r in rows], np.int64)
      scores = np.asarray([[r[n]["score"] for n in names] for r in rows], np.float64)
      kl = np.asarray([[r[n].get("kl", np.nan) for n in names] for r in rows], np.float64)
      fisher = np.asarray([[r[n].get("fisher", np.nan) for n in names] for r in rows],
                          np.float64)
      params = np.asarray([r["params"] for r in rows], np.int64)
    except (KeyError, TypeError, AttributeError) as e:
      raise ValueError(f"Sensitivity.from_dict: not a Sensitivity.to_dict() mapping (missing "
                       f"{e})") from None
    return cls(paths, names, specs, params, bits, scores,
               None if np.isnan(kl).all() else kl,
               None if np.isnan(fisher).any() else fisher)


def _rule(path: str, spec: Quant | LowRank | None) -> Rule:
  if spec is None:
    return Rule(re.escape(path), skip=True, name=path)
  return Rule(re.escape(path), name=path, **{_kind(spec): spec})


def packed_bits(shape: tuple[int, ...], contracting: tuple[int, ...], spec: Quant) -> int:
  """Bits of the packed `QArray` (values, scales, zero points) of a kernel of ``shape``.

  Example:
    >>> packed_bits((256, 64), (0,), jc.Quant(w_bits=3, group=128))
    53248
  """
  qa = jax.eval_shape(lambda w: quantize_weight(w, contracting, spec),
                      jax.ShapeDtypeStruct(shape, jnp.float32))
  leaves = [x for x in (qa.values, qa.scale, qa.zero_point, qa.tensor_scale) if x is not None]
  return int(sum(8 * np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in leaves))


def _kind(spec: Quant | LowRank) -> str:
  return "quant" if isinstance(spec, Quant) else "lowrank"


def _effective(w: jax.Array, stats: LayerStats, spec: Quant | LowRank | None, kernel: jax.Array,
               axes: engine.KernelAxes) -> tuple[jax.Array, int]:
  """What the layer computes (K, N) after ``spec``'s solver, and its size in bits as stored:
  the packed `QArray`, the two factors in the kernel's dtype, or (None) the kernel itself."""
  float_bits = 8 * np.dtype(kernel.dtype).itemsize
  if spec is None:
    return w, int(np.prod(kernel.shape)) * float_bits
  solver = registry.get(_kind(spec), spec.method)
  if isinstance(spec, LowRank):
    a, b = solver.solve(w, stats, spec)
    return a @ b, (a.size + b.size) * float_bits
  bits = packed_bits(tuple(kernel.shape), tuple(axes.contracting), spec)
  if solver.solve is None:  # data-free RTN: the QAT grid
    return gptq_core.rtn(w, spec), bits
  return solver.solve(w, stats, spec).effective, bits


def sensitivity(model: nnx.Module, layers: str, candidates: Mapping[str, Quant], calib: Any, *,
                batch_size: int = 8, blocks: str | None = None,
                call: Callable[[nnx.Module, Any], Any] | None = None, progress: bool = True,
                calib_dtype: Any = jnp.bfloat16, kl_tokens: Any = None,
                kl_batch_size: int = 4, kl_candidates: Sequence[str] | None = None,
                fisher_tokens: Any = None, fisher_batch_size: int = 1, seed: int = 0
                ) -> Sensitivity:
  """Scores every layer whose path fully matches ``layers`` under every candidate.

  Args:
    model: an NNX model (left untouched).
    layers: regex of the layer paths to score (e.g. ``r".*_proj"``).
    candidates: name -> `Quant` (weight-only; any registered solver: gptq, awq, rtn, ...),
      or name -> `LowRank` (svd, asvd, svd_llm; the cost is the factors' bits in the kernel's
      dtype), plus optionally name -> None (the layer left as it is: score 0, its own bits).
    calib: calibration inputs, as for `jaxcomp.ptq`.
    batch_size, blocks, call, progress, calib_dtype: as for `jaxcomp.ptq`.
    kl_tokens: also measure the direct score on these inputs (e.g. int32 tokens [B, T]; the
      model's output must be logits [..., V]): one forward per (layer, candidate), in batches
      of ``kl_batch_size``.
    kl_candidates: the candidate names the direct score is measured for (default: all; the
      others get NaN and cannot be allocated on ``estimator="kl"``).

    fisher_tokens: also score by the Fisher-weighted output error: one backward pass per
      batch of ``fisher_batch_size`` of these inputs (labels sampled from the model's own
      next-token distribution, seed ``seed``) gives, per layer and output channel ``n``, the
      mean squared gradient of the log-likelihood w.r.t. the layer's output, ``G_n = 2
      sum_k S_kn / (T tr H)`` from the summed squared kernel gradients ``S`` (the
      Kronecker-factored Fisher: inputs and output gradients independent); the score
      ``1/4 sum_n G_n dW_n^T H dW_n`` is the KL per token the candidate is predicted to add.

  Returns:
    `Sensitivity` ([L, C] scores and packed bits).

  Example::

    sens = jc.sensitivity(model, r".*_proj", {
        "w3g128": jc.Quant(w_bits=3, group=128, method="gptq"),
        "w4g128": jc.Quant(w_bits=4, group=128, method="gptq")}, calib=tokens)
    recipe, _ = sens.recipe(3.5)
  """
  if not candidates:
    raise ValueError("sensitivity: candidates is empty; give name -> jaxcomp.Quant / "
                     "jaxcomp.LowRank (or None: the layer left as it is)")
  names, specs = tuple(candidates), tuple(candidates.values())
  measured = list(names if kl_candidates is None else kl_candidates)
  unknown = sorted(set(measured) - set(names))
  if unknown:
    raise ValueError(f"sensitivity: kl_candidates {unknown} are not candidates ({list(names)})")
  kinds = set()
  for n, s in zip(names, specs):
    if s is None:
      continue
    if not isinstance(s, (Quant, LowRank)):
      raise TypeError(f"sensitivity: candidate {n!r} must be a jaxcomp.Quant, a jaxcomp.LowRank "
                      f"or None, got {type(s).__name__}")
    if isinstance(s, Quant) and s.a_bits is not None:
      raise ValueError(f"sensitivity: candidate {n!r} quantizes activations (a_bits="
                       f"{s.a_bits}); the Hessian score covers weight-only candidates")
    kinds.add(_kind(s))
    registry.get(_kind(s), s.method)
  if len(kinds) != 1:
    raise ValueError("sensitivity: candidates must be all jaxcomp.Quant or all jaxcomp.LowRank "
                     f"(plus None), got {sorted(kinds) or 'only None'}")
  kind = kinds.pop()
  real = [s for s in specs if s is not None]
  types = set.intersection(*({t for t in registry.get(kind, s.method).layers} for s in real))
  field = {"quant": "quant", "lowrank": "lowrank"}[kind]
  recipe = Recipe([Rule(layers, name="scored", **{field: real[0]})])
  new, todo, _ = plan_transform("sensitivity", model, recipe, calib, lambda m: type(m) in types,
                                lambda r: getattr(r, field), lambda spec: True, strict=True)
  done: list[_Scored] = []
  grads = None
  if fisher_tokens is not None:
    grads = _output_fisher(model, [p for p, *_ in todo], fisher_tokens, fisher_batch_size,
                           call or (lambda m, b: m(b)), seed)
  solved: list[list[np.ndarray | None]] = []  # (K, N) effective kernels for the direct score

  def score(path, m, _spec, stats, root=None):
    del root
    axes = engine.kernel_axes(m)
    kernel = getattr(m, axes.name)[...]
    w = kernel_2d(m).astype(jnp.float32)
    h = stats.h
    row, cost, effective, per_outs = [], [], [], []
    for name, spec in zip(names, specs):
      eff, bits = _effective(w, stats, spec, kernel, axes)
      d = eff.astype(jnp.float32) - w
      per_out = jnp.sum(d * (h @ d), axis=0)  # [N]: each output channel's error
      row.append(float(jnp.sum(per_out)))
      if grads is not None:
        per_outs.append(np.asarray(per_out, np.float64))
      cost.append(bits)
      if kl_tokens is not None:
        effective.append(np.asarray(eff, np.float32) if name in measured else None)
    solved.append(effective)
    done.append(_Scored(path, int(np.prod(kernel.shape)), cost, row, per_outs,
                        float(jnp.trace(h))))
    return done[-1]

  solve_all(new, todo, score, [], lambda _: None, calib, name="sensitivity",
            batch_size=batch_size, blocks=blocks,
            call=call or (lambda m, b: m(*b) if isinstance(b, tuple) else m(b)),
            progress=progress, calib_dtype=calib_dtype)
  paths = tuple(d.path for d in done)  # a stack's layers labelled ``path[i]/layer`` by now
  fisher = None
  if grads is not None:
    summed, n_tok = grads
    fisher = np.zeros((len(done), len(names)))
    for l, d in enumerate(done):
      hit = _STACKED.match(d.path)
      g = summed[hit.group(1) + (hit.group(3) or "")][int(hit.group(2))] if hit else summed[d.path]
      g_out = 2.0 * np.asarray(g, np.float64) / (n_tok * max(d.trace_h, 1e-30))
      fisher[l] = [0.25 * float(np.sum(g_out * e)) for e in d.per_out]
  kl = None
  if kl_tokens is not None:
    kl = _direct_kl(nnx.clone(model), paths, solved, kl_tokens, kl_batch_size,
                    call or (lambda m, b: m(b)), progress)
  return Sensitivity(paths, names, specs, np.asarray([d.params for d in done], np.int64),
                     np.asarray([d.bits for d in done], np.int64),
                     np.asarray([d.scores for d in done], np.float64), kl, fisher)


def _output_fisher(model: nnx.Module, paths: list[str], tokens: Any, batch_size: int,
                   call: Callable[[nnx.Module, Any], Any], seed: int
                   ) -> tuple[dict[str, np.ndarray], int]:
  """Per layer path, the squared kernel gradients of the sampled log-likelihood summed over
  batches and the contracting axes (``[N]``, ``[L, N]`` for a stack), and the token count."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loglik(p, batch, key):
    logits = call(nnx.merge(graphdef, p, rest), batch).astype(jnp.float32)
    y = jax.random.categorical(key, logits)  # the model's own distribution: its Fisher
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.sum(jnp.take_along_axis(logp, y[..., None], axis=-1)), y.size

  @jax.jit
  def squared(p, batch, key):
    grad, count = jax.grad(loglik, has_aux=True)(p, batch, key)
    g = nnx.merge(graphdef, grad, rest)
    return {path: jnp.sum(jnp.square(kernel_2d(engine.module_at(g, path))), axis=-2)
            for path in paths}, count

  summed: dict[str, Any] = {}
  n_tok = 0
  key = jax.random.key(seed)
  for i, batch in enumerate(as_batches(tokens, batch_size, "sensitivity")):
    out, count = squared(params, batch, jax.random.fold_in(key, i))
    summed = out if not summed else {p: summed[p] + out[p] for p in paths}
    n_tok += int(count)  # predictions: tokens of a language model, examples of a classifier
  return {p: np.asarray(v) for p, v in summed.items()}, n_tok


def _direct_kl(model: nnx.Module, paths: tuple[str, ...],
               solved: list[list[np.ndarray | None]],
               tokens: Any, batch_size: int, call: Callable[[nnx.Module, Any], Any],
               progress: bool) -> np.ndarray:
  """[L, C] KL per token of ``model`` with only layer l set to candidate c's kernel."""
  batches = as_batches(tokens, batch_size, "sensitivity")
  fwd = nnx.jit(lambda m, b: jax.nn.log_softmax(call(m, b).astype(jnp.float32), axis=-1))
  ref = [fwd(model, b) for b in batches]
  n_tok = sum(int(np.prod(r.shape[:-1])) for r in ref)

  def kl_now() -> float:
    total = 0.0
    for b, r in zip(batches, ref):
      q = fwd(model, b)
      total += float(jnp.sum(jnp.exp(r) * (r - q)))
    return total / n_tok

  out = np.zeros((len(paths), len(solved[0])))
  for l, path in enumerate(tqdm(paths, desc="sensitivity: direct KL", disable=not progress)):
    m = _STACKED.match(path)
    layer = engine.module_at(model, m.group(1) + (m.group(3) or "") if m else path)
    original = kernel_2d(layer)
    for c, eff in enumerate(solved[l]):
      if eff is None:  # not in kl_candidates
        out[l, c] = np.nan
        continue
      new = original.at[int(m.group(2))].set(eff) if m else jnp.asarray(eff)
      _set_kernel(layer, new)
      out[l, c] = kl_now()
    _set_kernel(layer, original)
  return out


def owl_recipe(model: nnx.Module, layers: str, calib: Any, sparsity: float, *,
               m: float = 5.0, lam: float = 0.08, method: str = "wanda",
               group: str | None = None, batch_size: int = 8, blocks: str | None = None,
               call: Callable[[nnx.Module, Any], Any] | None = None, progress: bool = True,
               calib_dtype: Any = jnp.bfloat16) -> tuple[Recipe, dict[str, float]]:
  """OWL's non-uniform unstructured sparsity (`jaxcomp.search.owl_sparsities`) as a recipe.

  One calibration pass over the uncompressed model gives each matched layer's Wanda scores
  ``|W_kn| * ||x_k||`` and their outlier ratio (`jaxcomp.search.outlier_ratio`, ``m``); the
  sparsities spread by ``lam`` around ``sparsity`` (more outliers, fewer zeros) keep the total
  number of zeros of uniform ``sparsity``. With ``group`` (a regex matched at the start of the
  layer paths, e.g. ``r"layers/\\d+"``: a transformer block, as in the paper), the ratio is
  taken over the scores of all the layers of a group together, and they share its sparsity.
  A stack gets one sparsity (its layers' mean ratio).

  Args:
    model: an NNX model (left untouched).
    layers: regex of the layer paths to prune.
    calib: calibration inputs, as for `jaxcomp.prune`.
    sparsity: the overall fraction pruned.
    m, lam: OWL's outlier threshold and spread.
    method: the pruning solver of every rule (``"wanda"``, ``"sparsegpt"``, ``"magnitude"``).
    group: regex of the path prefix whose layers share one outlier ratio (None: per layer).
    batch_size, blocks, call, progress, calib_dtype: as for `jaxcomp.prune`.

  Returns:
    ``(recipe, {path: sparsity})``, one rule per layer (per stack).

  Example::

    recipe, per_layer = jc.owl_recipe(model, r".*_proj", tokens, 0.5)
    pruned = jc.prune(model, recipe, calib=tokens)
  """
  types = set(registry.get("sparsity", "wanda").layers)
  plan = Recipe([Rule(layers, sparsity=Sparsity(sparsity=sparsity, method=method),
                      name="owl")])
  new, todo, _ = plan_transform("owl_recipe", model, plan, calib, lambda x: type(x) in types,
                                lambda r: r.sparsity, lambda spec: True, strict=True)
  done: list[_Scored] = []
  kept: dict[str, np.ndarray] = {}  # the scores of each layer, when grouped

  def ratio(path, layer, _spec, stats, root=None):
    del root
    w = kernel_2d(layer).astype(jnp.float32)
    norms = jnp.sqrt(jnp.maximum(jnp.diag(stats.h), 0.0))
    scores = np.asarray(jnp.abs(w) * norms[:, None], np.float32)
    if group is not None:
      kept[path] = scores.ravel()
    done.append(_Scored(path, int(w.size), [],
                        [np.nan if group is not None else search.outlier_ratio(scores, m)]))
    return done[-1]

  solve_all(new, todo, ratio, [], lambda _: None, calib, name="owl_recipe",
            batch_size=batch_size, blocks=blocks,
            call=call or (lambda mdl, b: mdl(*b) if isinstance(b, tuple) else mdl(b)),
            progress=progress, calib_dtype=calib_dtype)
  if group is not None:  # one ratio over the scores of each group's layers together
    by: dict[str, list[_Scored]] = {}
    for d in done:
      hit = re.match(group, d.path)
      by.setdefault(hit.group(0) if hit else d.path, []).append(d)
    for members in by.values():
      r = search.outlier_ratio(np.concatenate([kept.pop(d.path) for d in members]), m)
      for d in members:
        d.scores[0] = r
  groups: dict[str, list[_Scored]] = {}
  for d in done:
    hit = _STACKED.match(d.path)
    groups.setdefault(hit.group(1) + (hit.group(3) or "") if hit else d.path, []).append(d)
  paths = list(groups)
  ratios = [float(np.mean([d.scores[0] for d in groups[p]])) for p in paths]
  params = [sum(d.params for d in groups[p]) for p in paths]
  per_layer = search.owl_sparsities(ratios, params, sparsity, lam)
  rules = [Rule(re.escape(p), sparsity=Sparsity(sparsity=float(s), method=method), name=p)
           for p, s in zip(paths, per_layer)]
  return Recipe(rules), dict(zip(paths, map(float, per_layer)))
