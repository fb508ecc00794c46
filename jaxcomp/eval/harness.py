"""One evaluation harness for any model: quality, size, speed, robustness and derived scores.

`evaluate_lm` (token streams: perplexity, next-token accuracy, a cloze multiple-choice score,
robustness to token substitution and deletion) and `evaluate_classifier` (images: accuracy,
balanced accuracy, macro-F1, ECE, robustness to Gaussian noise and shifts) return a report
dict with the same layout -- ``quality``, ``size``, ``speed``, ``robustness`` -- which
`derived_scores` compares with a baseline report (LAT, PE, Pareto score; see
`jaxcomp.eval.metrics` for the definitions) and `write_report` saves as ``report.json`` +
``report.md``. Models are NNX modules (quantized, pruned, low-rank or packed by `jc.convert`)
or Linen ``(module, variables)`` pairs (`as_nnx`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import json
import math
import os
import pathlib
import platform
import re
import time
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxcomp.eval import metrics
from jaxcomp.eval import perplexity as ppl_lib
from jaxcomp.layers.quant import QuantScale
from jaxcomp.quant.qarray import QArray

DEFAULT_TEXT_RATES = (0.05, 0.1, 0.2)
DEFAULT_IMAGE_NOISE = (0.1, 0.2, 0.4)


class LinenModel(nnx.Module):
  """A Linen ``(module, variables)`` pair as an NNX module, so the harness treats both alike.

  Example::

    model = LinenModel(module, variables)          # also packed: jc.convert(module, variables=...)
    evaluate_lm(model, ids, seq_len=128)
  """

  def __init__(self, module: Any, variables: Any):
    self.module = module
    self.variables = nnx.Variable(variables)

  def __call__(self, *args: Any) -> jax.Array:
    return self.module.apply(self.variables.get_value(), *args)


def as_nnx(model: Any) -> nnx.Module:
  """``model`` itself if it is an NNX module; a Linen ``(module, variables)`` pair wrapped.

  Example::

    as_nnx((module, variables))(tokens)           # == module.apply(variables, tokens)
  """
  if isinstance(model, nnx.Module):
    return model
  if isinstance(model, tuple) and len(model) == 2 and hasattr(model[0], "apply"):
    return LinenModel(*model)
  raise TypeError(f"expected an nnx.Module or a Linen (module, variables) pair, got "
                  f"{type(model).__name__}")


def _leaves(model: nnx.Module) -> list[tuple[str, Any, bool]]:
  """(path, array or QArray, is a weight) of every stored parameter (a Linen pair: its
  variables); learned quantization steps are parameters but not weights."""
  is_q = lambda x: isinstance(x, QArray)
  if isinstance(model, LinenModel):
    flat = jax.tree_util.tree_flatten_with_path(model.variables.get_value(), is_leaf=is_q)[0]
    return [("/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path), leaf, True)
            for path, leaf in flat]
  return [("/".join(str(k) for k in path), var.get_value(), not isinstance(var, QuantScale))
          for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))]


def dequantize_stacked(q: QArray) -> jax.Array:
  """``q.dequantize()``, also for a kernel of stacked layers (`nnx.vmap` / scanned blocks:
  the QArray's leaves carry the stack axes in front, its ``shape`` is one layer's):
  ``[*stack, *q.shape]``.

  Example::

    w = dequantize_stacked(packed_model.layers.attn.q_proj.kernel[...])   # [L, K, N]
  """
  if q.values.ndim <= 2:
    return q.dequantize()
  return jax.vmap(dequantize_stacked)(q)


def stored_size(model: Any) -> dict[str, float | int]:
  """Parameters, non-zero parameters, bytes as stored and bits per parameter.

  A packed kernel (`QArray`) counts its logical weights as parameters and the bytes of its
  codes, scales and zero points as storage; a float array its own bytes. Non-zeros count
  the weights that are not exactly 0 (a packed code that dequantizes to 0 is a zero).

  Example:
    >>> s = stored_size(nnx.Linear(4, 2, rngs=nnx.Rngs(0)))
    >>> s["params"], s["bytes"], s["bits_per_param"]
    (10, 40, 32.0)
  """
  params = nonzero = nbytes = 0
  for _, leaf, _ in _leaves(as_nnx(model)):
    if isinstance(leaf, QArray):
      dense = np.asarray(dequantize_stacked(leaf))
      params += int(dense.size)
      nbytes += sum(int(np.asarray(x).nbytes) for x in (leaf.values, leaf.scale, leaf.zero_point,
                                                        leaf.tensor_scale) if x is not None)
      nonzero += int(np.count_nonzero(dense))
    elif hasattr(leaf, "dtype") and hasattr(leaf, "size"):
      params += int(leaf.size)
      nbytes += int(leaf.size) * np.dtype(leaf.dtype).itemsize
      nonzero += int(np.count_nonzero(np.asarray(leaf)))
  return {"params": params, "nonzero_params": nonzero, "bytes": nbytes,
          "bits_per_param": round(8 * nbytes / max(params, 1), 4),
          "sparsity": round(1 - nonzero / max(params, 1), 4)}


_NOT_MATMUL = re.compile(r"(^|/)(embedding|bias|scale|step|steps|.*norm.*)$")


def flops_per_token(model: Any, *, context: int = 0) -> float:
  """Analytic FLOPs per token (per output position for convolutions), sparsity-aware.

  Every stored weight array of rank >= 2 but embedding tables is a matmul that each token
  runs once: 2 FLOPs per non-zero weight (so a 2:4 layer counts half, a low-rank pair
  ``2 r (K + N)``, a stack of L layers all L). A tied LM head (``config.tie_embeddings``)
  adds ``2 V D``. With ``context`` > 0, a causal decoder with ``config.n_layers`` /
  ``n_heads`` / ``head_dim`` adds its attention scores and weighted sum averaged over
  ``context`` positions, ``2 * 2 * H * Dh * (context + 1) / 2`` per layer.

  Example:
    >>> lin = nnx.Linear(8, 4, use_bias=False, rngs=nnx.Rngs(0))
    >>> lin.kernel[...] = lin.kernel[...].at[::2].set(0.)          # half the rows zero
    >>> flops_per_token(lin)
    32.0
  """
  model = as_nnx(model)
  total = 0.0
  for name, leaf, weight in _leaves(model):
    if not weight or _NOT_MATMUL.search(name) or len(getattr(leaf, "shape", ())) < 2:
      continue
    total += metrics.linear_flops(dequantize_stacked(leaf) if isinstance(leaf, QArray) else leaf)
  config = getattr(model, "config", None)
  if config is not None and getattr(config, "tie_embeddings", False):
    total += 2.0 * config.vocab_size * config.dim
  if context and config is not None and hasattr(config, "n_layers"):
    head_dim = config.head_dim or config.dim // config.n_heads
    total += config.n_layers * 2 * 2 * config.n_heads * head_dim * (context + 1) / 2
  return total


def environment() -> dict[str, str]:
  """Where a measurement ran: backend, device kind and count, versions.

  Example::

    environment()["device"]            # 'cpu' / 'TPU v5 lite' / 'NVIDIA H100 80GB HBM3'
  """
  import flax  # pylint: disable=import-outside-toplevel
  dev = jax.devices()[0]
  return {"backend": jax.default_backend(), "device": dev.device_kind,
          "devices": str(jax.device_count()), "jax": jax.__version__, "flax": flax.__version__,
          "python": platform.python_version(), "machine": platform.machine()}


def measure_latency(fn: Callable[..., Any], *args: Any, items_per_call: int, warmup: int = 2,
                    repeats: int = 10) -> dict[str, Any]:
  """p50 / p95 latency and throughput of ``fn(*args)`` (results waited for), warm-up excluded.

  Also records the `environment` and, where the backend reports it
  (``Device.memory_stats``; not on CPU), the device's peak bytes in use.

  Example::

    measure_latency(jax.jit(model), tokens, items_per_call=tokens.size)["p50_ms"]
  """
  if warmup < 1 or repeats < 1:
    raise ValueError(f"warmup and repeats must be >= 1, got {warmup} and {repeats}")
  for _ in range(warmup):  # compile and warm caches
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  out: dict[str, Any] = metrics.latency_summary(times, items_per_call)
  out["items_per_call"] = items_per_call
  out["env"] = environment()
  stats = jax.devices()[0].memory_stats()
  out["peak_bytes"] = None if not stats else stats.get("peak_bytes_in_use")
  return out


def measure_latency_side_by_side(calls: Mapping[str, tuple[Callable[..., Any], tuple[Any, ...]]],
                                 *, items_per_call: int, warmup: int = 2, repeats: int = 10
                                 ) -> dict[str, dict[str, Any]]:
  """`measure_latency` of several ``name: (fn, args)`` calls, interleaved: every round times
  each call once, in turn, so that a machine slowing down or speeding up during the
  measurement shifts every call alike and their ratios hold.

  Example::

    speeds = measure_latency_side_by_side({"float": (f, (x,)), "int4": (q, (x,))},
                                          items_per_call=x.size)
    speeds["int4"]["p50_ms"] / speeds["float"]["p50_ms"]
  """
  if warmup < 1 or repeats < 1:
    raise ValueError(f"warmup and repeats must be >= 1, got {warmup} and {repeats}")
  for fn, args in calls.values():
    for _ in range(warmup):
      jax.block_until_ready(fn(*args))
  times: dict[str, list[float]] = {name: [] for name in calls}
  for _ in range(repeats):
    for name, (fn, args) in calls.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - t0)
  env = environment()
  return {name: {**metrics.latency_summary(t, items_per_call), "items_per_call": items_per_call,
                 "env": env, "interleaved_with": sorted(set(calls) - {name})}
          for name, t in times.items()}


def perturb_tokens(ids: np.ndarray, rate: float, *, kind: str, vocab_size: int,
                   seed: int = 0) -> np.ndarray:
  """Token noise: ``"substitute"`` replaces each token with probability ``rate`` by a uniform
  random id (length kept); ``"delete"`` drops each with probability ``rate``.

  Example:
    >>> perturb_tokens(np.arange(10), 0.0, kind="delete", vocab_size=10).tolist()
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
  """
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"perturbation rate must lie in [0, 1), got {rate}")
  rng = np.random.default_rng(seed)
  ids = np.asarray(ids)
  hit = rng.random(ids.shape) < rate
  if kind == "substitute":
    return np.where(hit, rng.integers(0, vocab_size, ids.shape), ids).astype(ids.dtype)
  if kind == "delete":
    return ids[~hit]
  raise ValueError(f"perturbation kind must be 'substitute' or 'delete', got {kind!r}")


def cloze_items(sentences: Sequence[Sequence[int]], *, n_items: int, n_choices: int = 4,
                seed: int = 0) -> list[dict[str, Any]]:
  """Multiple-choice items from consecutive sentences of a real text (token ids each).

  Item i: context = sentence ``s``, choices = its true successor ``s + 1`` and
  ``n_choices - 1`` distractor sentences drawn from elsewhere in the text, shuffled
  (seeded). A model scores each choice by its mean log-likelihood given the context;
  chance is ``1 / n_choices``.

  Example:
    >>> items = cloze_items([[1, 2], [3], [4, 5], [6], [7, 8]], n_items=2, n_choices=2)
    >>> len(items), sorted(items[0])
    (2, ['answer', 'choices', 'context'])
  """
  if n_choices < 2 or len(sentences) < n_choices + 1:
    raise ValueError(f"cloze needs n_choices >= 2 and more than n_choices sentences, got "
                     f"{n_choices} and {len(sentences)}")
  rng = np.random.default_rng(seed)
  starts = rng.permutation(len(sentences) - 1)[:n_items]
  items = []
  for s in starts:
    pool = [j for j in rng.permutation(len(sentences)) if j not in (s, s + 1)][:n_choices - 1]
    choices = [s + 1] + pool
    order = rng.permutation(n_choices)
    items.append({"context": list(sentences[s]),
                  "choices": [list(sentences[choices[o]]) for o in order],
                  "answer": int(np.argmin(order))})
  return items


@nnx.jit
def _choice_loglik(model: nnx.Module, tokens: jax.Array, mask: jax.Array) -> jax.Array:
  """Summed log-likelihood of the masked tokens of each row: ``int32[B, L] -> f32[B]``."""
  logits = model(tokens).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(mask[:, 1:], picked, 0.0), axis=1)


def cloze_accuracy(model: Any, items: Sequence[Mapping[str, Any]], *, seq_len: int,
                   batch_size: int = 16, progress: bool = False) -> float:
  """Fraction of `cloze_items` whose true choice has the highest mean log-likelihood.

  Context and choice are truncated from the left / right to fit ``seq_len`` tokens; rows are
  scored at the longest row's length (a power of two, at most ``seq_len``), not ``seq_len``.

  Example::

    cloze_accuracy(model, cloze_items(sentences, n_items=200), seq_len=128)
  """
  model = as_nnx(model)
  rows, owners = [], []
  for i, item in enumerate(items):
    for c in item["choices"]:
      c = list(c)[:seq_len - 1]
      ctx = list(item["context"])[-(seq_len - len(c)):]
      rows.append((ctx, c))
      owners.append(i)
  n = -(-len(rows) // batch_size) * batch_size
  # Rows are right-padded to the longest one (rounded up to a power of two, at most seq_len):
  # a causal model's log-likelihoods of the real tokens do not depend on the padding after them.
  longest = max((len(ctx) + len(c) for ctx, c in rows), default=1)
  width = min(seq_len, 1 << max(longest - 1, 1).bit_length())
  tokens = np.zeros((n, width), np.int32)
  mask = np.zeros((n, width), bool)
  for r, (ctx, c) in enumerate(rows):
    tokens[r, :len(ctx) + len(c)] = ctx + c
    mask[r, len(ctx):len(ctx) + len(c)] = True
  scores = []
  for k in tqdm(range(0, n, batch_size), desc="cloze", disable=not progress, leave=False):
    scores.append(np.asarray(_choice_loglik(model, jnp.asarray(tokens[k:k + batch_size]),
                                            jnp.asarray(mask[k:k + batch_size]))))
  mean = np.concatenate(scores)[:len(rows)] / np.maximum(mask[:len(rows)].sum(1), 1)
  hits, r = 0, 0
  for item in items:
    k = len(item["choices"])
    hits += int(np.argmax(mean[r:r + k]) == item["answer"])
    r += k
  return hits / len(items)


def evaluate_lm(model: Any, token_ids: Any, *, seq_len: int, batch_size: int = 8,
                vocab_size: int | None = None, cloze: Sequence[Mapping[str, Any]] = (),
                rates: Sequence[float] = DEFAULT_TEXT_RATES, latency_repeats: int = 5,
                seed: int = 0, progress: bool = False) -> dict[str, Any]:
  """The harness on a language model and a token stream ``token_ids: int[N]``.

  Returns ``{"quality": {ppl, nll, accuracy, tokens[, cloze_accuracy]}, "size":
  stored_size, "flops_per_token", "speed": measure_latency of one ``[batch_size, seq_len]``
  forward (tokens/s), "robustness": {kind: {rate: ppl}, "score": RS}}`` where the
  robustness quality at each rate is ``ppl_clean / ppl_perturbed`` (substitution feeds noisy
  inputs and scores the clean next tokens; deletion scores the shortened text).

  Example::

    report = evaluate_lm(model, ids, seq_len=128, vocab_size=tok.get_vocab_size())
    report["quality"]["ppl"], report["robustness"]["score"]
  """
  model = as_nnx(model)
  ids = np.asarray(token_ids)
  vocab = vocab_size or getattr(getattr(model, "config", None), "vocab_size", None)
  clean = ppl_lib.perplexity(model, ids, seq_len=seq_len, batch_size=batch_size)
  quality: dict[str, Any] = dict(clean)
  if cloze:
    quality["cloze_accuracy"] = cloze_accuracy(model, cloze, seq_len=seq_len,
                                               progress=progress)
    quality["cloze_items"] = len(cloze)
  robustness: dict[str, Any] = {}
  if rates:
    if vocab is None:
      raise ValueError("evaluate_lm: robustness needs vocab_size (or a model.config.vocab_size)")
    by_rate: dict[float, float] = {0.0: 1.0}
    for kind in ("substitute", "delete"):
      robustness[kind] = {}
      for rate in tqdm(rates, desc=f"robustness ({kind})", disable=not progress, leave=False):
        noisy = perturb_tokens(ids, rate, kind=kind, vocab_size=vocab, seed=seed)
        r = (ppl_lib.perplexity(model, ids, seq_len=seq_len, batch_size=batch_size,
                                input_ids=noisy) if kind == "substitute" else
             ppl_lib.perplexity(model, noisy, seq_len=seq_len, batch_size=batch_size))
        robustness[kind][str(rate)] = r["ppl"]
        by_rate[rate] = min(by_rate.get(rate, math.inf), clean["ppl"] / r["ppl"])
    robustness["score"] = metrics.robustness_score(by_rate)
  tokens = jnp.asarray(np.resize(ids, (batch_size, seq_len)).astype(np.int32))
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
  speed = measure_latency(forward, state, tokens, items_per_call=batch_size * seq_len,
                          repeats=latency_repeats)
  return {"kind": "lm", "quality": quality, "size": stored_size(model),
          "flops_per_token": flops_per_token(model, context=seq_len), "speed": speed,
          "robustness": robustness}


def evaluate_classifier(model: Any, images: np.ndarray, labels: np.ndarray, *,
                        batch_size: int = 256, noise: Sequence[float] = DEFAULT_IMAGE_NOISE,
                        shifts: Sequence[int] = (1, 2), latency_repeats: int = 5,
                        seed: int = 0) -> dict[str, Any]:
  """The harness on an image classifier: ``images: [n, H, W, C]``, ``labels: int[n]``.

  Quality: `metrics.classification` (accuracy, balanced accuracy, macro-F1, ECE). Robustness:
  accuracy under additive Gaussian noise of each std in ``noise`` and under shifts of the image
  by ``shifts`` pixels (rolled along H and W); the Robustness Score uses the worse of the two
  families at each severity (noise std / shift rank).

  Example::

    report = evaluate_classifier(cnn, test["image"], test["label"])
    report["quality"]["accuracy"], report["quality"]["ece"]
  """
  model = as_nnx(model)
  images, labels = np.asarray(images, np.float32), np.asarray(labels)
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda s, x: jax.nn.softmax(nnx.merge(graphdef, s)(x).astype(jnp.float32)))
  probs_of = lambda x: np.concatenate([np.asarray(forward(state, jnp.asarray(x[k:k + batch_size])))
                                       for k in range(0, len(x), batch_size)])
  clean = metrics.classification(probs_of(images), labels)
  rng = np.random.default_rng(seed)
  robustness: dict[str, Any] = {"noise": {}, "shift": {}}
  by_severity: dict[float, float] = {0.0: clean.accuracy}
  for i, std in enumerate(noise):
    acc = metrics.classification(
        probs_of(images + rng.normal(0, std, images.shape).astype(np.float32)), labels).accuracy
    robustness["noise"][str(std)] = acc
    by_severity[i + 1.0] = acc
  for i, s in enumerate(shifts):
    acc = metrics.classification(probs_of(np.roll(images, (s, s), axis=(1, 2))),
                                 labels).accuracy
    robustness["shift"][str(s)] = acc
    by_severity[i + 1.0] = min(by_severity.get(i + 1.0, math.inf), acc)
  if len(by_severity) > 1:
    robustness["score"] = metrics.robustness_score(by_severity) if clean.accuracy > 0 else 0.0
  n = min(batch_size, len(images))
  speed = measure_latency(forward, state, jnp.asarray(images[:n]), items_per_call=n,
                          repeats=latency_repeats)
  return {"kind": "classifier", "quality": dict(vars(clean), examples=int(len(labels))),
          "size": stored_size(model), "flops_per_token": flops_per_token(model),
          "speed": speed, "robustness": robustness}


def quality_of(report: Mapping[str, Any]) -> float:
  """The quality number scores compare: accuracy (classifiers) or perplexity (LMs, lower is
  better; `derived_scores` turns it into ``ppl_base / ppl``)."""
  q = report["quality"]
  return q["ppl"] if report["kind"] == "lm" else q["accuracy"]


def derived_scores(report: Mapping[str, Any], baseline: Mapping[str, Any], *,
                   alpha: float = 1.0,
                   weights: Sequence[float] = metrics.PARETO_WEIGHTS) -> dict[str, Any]:
  """LAT, PE and the Pareto score of ``report`` against ``baseline`` (both from this harness),
  plus the perplexity degradation band for LMs.

  Quality ratio: ``ppl_base / ppl`` for LMs, ``accuracy / accuracy_base`` for classifiers;
  size: bytes as stored; latency: p50 per batch.

  Example::

    derived_scores(evaluate_lm(q, ids, seq_len=128), evaluate_lm(f, ids, seq_len=128))
  """
  if report["kind"] != baseline["kind"]:
    raise ValueError(f"cannot compare a {report['kind']} report with a {baseline['kind']} one")
  if report["kind"] == "lm":
    q = metrics.perplexity_quality(report["quality"]["ppl"], baseline["quality"]["ppl"])
    q_base = 1.0
  else:
    q, q_base = report["quality"]["accuracy"], baseline["quality"]["accuracy"]
  size, size_base = report["size"]["bytes"], baseline["size"]["bytes"]
  t, t_base = report["speed"]["p50_ms"], baseline["speed"]["p50_ms"]
  out = {"quality_ratio": q / q_base, "size_ratio": size / size_base,
         "latency_ratio": t / t_base,
         "lat": metrics.latency_tradeoff(q, q_base, t, t_base, alpha=alpha),
         "pe": metrics.parameter_efficiency(q, q_base, size, size_base),
         "pareto_score": metrics.pareto_score(q, q_base, size, size_base, t, t_base, weights),
         "alpha": alpha, "weights": list(weights)}
  if report["kind"] == "lm":
    out["band"] = metrics.degradation_band(report["quality"]["ppl"], baseline["quality"]["ppl"])
  return out


def report_markdown(report: Mapping[str, Any], title: str) -> str:
  """A report as a two-column markdown table (nested keys joined by ``.``).

  Example:
    >>> print(report_markdown({"quality": {"ppl": 12.5}}, "run"))
    # run
    <BLANKLINE>
    | metric | value |
    |---|---:|
    | quality.ppl | 12.5000 |
    <BLANKLINE>
  """
  lines = [f"# {title}", "", "| metric | value |", "|---|---:|"]

  def walk(prefix: str, node: Any) -> None:
    if isinstance(node, Mapping):
      for k, v in node.items():
        walk(f"{prefix}.{k}" if prefix else str(k), v)
    else:
      lines.append(f"| {prefix} | {node:.4f} |" if isinstance(node, float)
                   else f"| {prefix} | {node} |")
  walk("", report)
  return "\n".join(lines) + "\n"


def write_report(report: Mapping[str, Any], directory: str | os.PathLike, *,
                 title: str = "evaluation") -> pathlib.Path:
  """Writes ``report.json`` and ``report.md`` into ``directory`` (each atomically).

  Example::

    write_report(evaluate_lm(model, ids, seq_len=128), "runs/x/stages/3_eval")
  """
  d = pathlib.Path(directory)
  d.mkdir(parents=True, exist_ok=True)
  for name, text in (("report.json", json.dumps(report, indent=2, default=_json_default)),
                     ("report.md", report_markdown(report, title))):
    tmp = d / (name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, d / name)
  return d / "report.json"


def _json_default(x: Any) -> Any:
  if isinstance(x, (np.integer, np.floating)):
    return x.item()
  raise TypeError(f"report value of type {type(x).__name__} is not JSON")
