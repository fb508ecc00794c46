"""The evaluation harness's metrics as plain functions of numbers and arrays.

Quality, size, speed and the derived trade-off scores of a compressed model relative to its
baseline. The project's seed document numbers these equations (perplexity Eq. 7, weight error
Eq. 2, LAT Eq. 9, PE Eq. 10, the Pareto score Eqs. 11-14, the Robustness Score Eq. 15) but its
text is not available here, so the definitions below are this module's own, written so that
every score is dimensionless, 1.0 means "same as the baseline" where a ratio is meant, and
higher is better; docs/evaluation.md states them with a worked example:

* ``quality`` q of a run is its accuracy (classifiers: top-1; LMs: next-token accuracy) or,
  for perplexity, ``ppl_base / ppl`` (the retained fraction; 1.0 = no degradation).
* LAT (latency-accuracy trade-off): ``(q / q_base) * (t_base / t) ** alpha`` -- retained quality
  times the speed-up to the power ``alpha`` (default 1; 0 ignores speed).
* PE (parameter efficiency): ``(q / q_base) / (bytes / bytes_base)`` -- retained quality per
  unit of stored size (a 4x smaller model with no loss scores 4).
* Pareto score: ``w1 * q/q_base + w2 * (1 - bytes/bytes_base) + w3 * (1 - t/t_base)`` with
  ``w = (0.5, 0.25, 0.25)`` by default (quality, size saving, latency saving).
* Robustness Score: the mean over perturbation rates of ``min(1, q(rate) / q(0))``.
* Degradation band of a perplexity increase ``ppl / ppl_base - 1``: ``"low"`` < 15% <=
  ``"moderate"`` <= 30% < ``"high"``.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import math

import numpy as np

PARETO_WEIGHTS = (0.5, 0.25, 0.25)
BANDS = ((0.15, "low"), (0.30, "moderate"))


def degradation_band(ppl: float, ppl_base: float) -> str:
  """The band of the relative perplexity increase ``ppl / ppl_base - 1``.

  ``"low"`` below 15%, ``"moderate"`` from 15% to 30% (both ends included), ``"high"`` above.

  Example:
    >>> degradation_band(11.0, 10.0), degradation_band(12.0, 10.0), degradation_band(14.0, 10.0)
    ('low', 'moderate', 'high')
  """
  _positive(ppl_base=ppl_base, ppl=ppl)
  rise = ppl / ppl_base - 1.0
  if rise < BANDS[0][0] - 1e-12:  # 11.5 / 10 - 1 is 0.1499...: the edge is 15%
    return BANDS[0][1]
  return BANDS[1][1] if rise <= BANDS[1][0] + 1e-12 else "high"


def perplexity_quality(ppl: float, ppl_base: float) -> float:
  """Retained quality of a perplexity: ``ppl_base / ppl`` (1.0 = no degradation).

  Example:
    >>> perplexity_quality(20.0, 16.0)
    0.8
  """
  _positive(ppl_base=ppl_base, ppl=ppl)
  return ppl_base / ppl


def latency_tradeoff(quality: float, quality_base: float, latency: float, latency_base: float,
                     *, alpha: float = 1.0) -> float:
  """LAT: ``(quality / quality_base) * (latency_base / latency) ** alpha``.

  Example:
    >>> latency_tradeoff(0.9, 1.0, 5.0, 10.0)              # 90% quality, 2x faster
    1.8
    >>> latency_tradeoff(0.9, 1.0, 5.0, 10.0, alpha=0.0)
    0.9
  """
  _positive(quality_base=quality_base, latency=latency, latency_base=latency_base)
  return float(quality / quality_base * (latency_base / latency) ** alpha)


def parameter_efficiency(quality: float, quality_base: float, size: float,
                         size_base: float) -> float:
  """PE: retained quality per unit of stored size, ``(q / q_base) / (size / size_base)``.

  Example:
    >>> parameter_efficiency(0.95, 1.0, 25.0, 100.0)      # 4x smaller, 95% quality
    3.8
  """
  _positive(quality_base=quality_base, size=size, size_base=size_base)
  return float(quality / quality_base / (size / size_base))


def pareto_score(quality: float, quality_base: float, size: float, size_base: float,
                 latency: float, latency_base: float,
                 weights: Sequence[float] = PARETO_WEIGHTS) -> float:
  """Weighted sum of retained quality, size saving and latency saving.

  ``w1 * q/q_base + w2 * (1 - size/size_base) + w3 * (1 - latency/latency_base)``; the baseline
  itself scores ``w1``.

  Example:
    >>> pareto_score(0.9, 1.0, 25.0, 100.0, 8.0, 10.0)   # .5*.9 + .25*.75 + .25*.2
    0.6875
  """
  w1, w2, w3 = _weights(weights)
  _positive(quality_base=quality_base, size_base=size_base, latency_base=latency_base)
  return float(w1 * quality / quality_base + w2 * (1.0 - size / size_base)
               + w3 * (1.0 - latency / latency_base))


def pareto_frontier(points: Sequence[Sequence[float]],
                    maximize: Sequence[bool]) -> list[int]:
  """Indices of the non-dominated points, in input order.

  ``points[i]`` holds one value per objective; ``maximize[j]`` says whether objective ``j`` is
  better high (quality) or low (size, latency). Point ``a`` dominates ``b`` when it is no worse
  in every objective and strictly better in one; equal points are all kept.

  Example:
    >>> pareto_frontier([(0.9, 10), (0.8, 5), (0.7, 6), (0.9, 12)], maximize=(True, False))
    [0, 1]
  """
  p = np.asarray(points, np.float64)
  if p.ndim != 2 or p.shape[1] != len(maximize):
    raise ValueError(f"points must be [n, {len(maximize)}] (one value per objective), got "
                     f"shape {p.shape}")
  if not np.isfinite(p).all():
    raise ValueError("points must be finite")
  signed = np.where(np.asarray(maximize, bool), p, -p)  # every objective: higher is better
  keep = []
  for i in range(len(signed)):
    others = signed[np.arange(len(signed)) != i]
    dominated = np.any(np.all(others >= signed[i], axis=1) & np.any(others > signed[i], axis=1))
    if not dominated:
      keep.append(i)
  return keep


def robustness_score(quality_by_rate: dict[float, float]) -> float:
  """RS: mean over the perturbation rates > 0 of ``min(1, q(rate) / q(0))``.

  ``quality_by_rate`` maps each rate (0 = clean input, required) to the quality measured there.

  Example:
    >>> robustness_score({0.0: 0.8, 0.1: 0.6, 0.2: 0.4})
    0.625
  """
  if 0.0 not in quality_by_rate:
    raise ValueError("quality_by_rate needs the clean quality at rate 0.0")
  clean = quality_by_rate[0.0]
  _positive(clean_quality=clean)
  rates = sorted(r for r in quality_by_rate if r > 0)
  if not rates:
    raise ValueError("quality_by_rate needs at least one perturbation rate > 0")
  return float(np.mean([min(1.0, quality_by_rate[r] / clean) for r in rates]))


@dataclasses.dataclass(frozen=True)
class Classification:
  """Classifier quality: accuracy, balanced accuracy, macro-F1 and ECE (all in [0, 1])."""
  accuracy: float
  balanced_accuracy: float
  macro_f1: float
  ece: float


def classification(probs: np.ndarray, labels: np.ndarray, *, n_bins: int = 15) -> Classification:
  """Quality of class probabilities ``probs: [n, C]`` against ``labels: int[n]``.

  Balanced accuracy is the mean recall over the classes present in ``labels``; macro-F1 the mean
  F1 over all ``C`` classes (a class never predicted nor present scores 0 and is left out); ECE
  the expected calibration error over ``n_bins`` equal-width bins of the top-1 confidence,
  ``sum_b |B| / n * |accuracy(B) - confidence(B)|``.

  Example:
    >>> p = np.array([[.9, .1], [.6, .4], [.3, .7], [.2, .8]])
    >>> c = classification(p, np.array([0, 1, 1, 1]), n_bins=10)
    >>> c.accuracy, round(c.balanced_accuracy, 4), round(c.macro_f1, 4), round(c.ece, 4)
    (0.75, 0.8333, 0.7333, 0.3)
  """
  probs, labels = np.asarray(probs, np.float64), np.asarray(labels)
  if probs.ndim != 2 or labels.shape != probs.shape[:1]:
    raise ValueError(f"probs must be [n, C] and labels [n], got {probs.shape} and "
                     f"{labels.shape}")
  if len(labels) == 0:
    raise ValueError("classification needs at least one example")
  n_classes = probs.shape[1]
  if labels.min() < 0 or labels.max() >= n_classes:
    raise ValueError(f"labels must lie in [0, {n_classes}), got [{labels.min()}, "
                     f"{labels.max()}]")
  pred = probs.argmax(-1)
  correct = pred == labels
  recalls, f1s = [], []
  for c in range(n_classes):
    tp = np.sum(correct & (labels == c))
    actual, predicted = np.sum(labels == c), np.sum(pred == c)
    if actual:
      recalls.append(tp / actual)
    if actual or predicted:
      f1s.append(2 * tp / (actual + predicted))
  conf = probs.max(-1)
  bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
  ece = sum(abs(correct[bins == b].mean() - conf[bins == b].mean()) * np.mean(bins == b)
            for b in np.unique(bins))
  return Classification(float(correct.mean()), float(np.mean(recalls)), float(np.mean(f1s)),
                        float(ece))


def weight_error(w: np.ndarray, w_q: np.ndarray) -> dict[str, float]:
  """``||W - W_q||_2`` (spectral norm of the ``(K, N)`` view), its relative value and the
  relative Frobenius error, for a kernel ``w: [..., K, N]`` -> flattened to ``[prod(...)*K, N]``.

  Example:
    >>> e = weight_error(np.eye(3), np.diag([1., 1., .5]))
    >>> e["spectral"], e["rel_spectral"]
    (0.5, 0.5)
  """
  w, w_q = np.asarray(w, np.float64), np.asarray(w_q, np.float64)
  if w.shape != w_q.shape:
    raise ValueError(f"weight shapes differ: {w.shape} vs {w_q.shape}")
  two_d = lambda a: a.reshape(-1, a.shape[-1]) if a.ndim != 1 else a[:, None]
  d, w2 = two_d(w - w_q), two_d(w)
  spectral, base = np.linalg.norm(d, 2), np.linalg.norm(w2, 2)
  fro, base_fro = np.linalg.norm(d), np.linalg.norm(w2)
  return {"spectral": float(spectral), "rel_spectral": float(spectral / base) if base else 0.0,
          "rel_frobenius": float(fro / base_fro) if base_fro else 0.0}


def linear_flops(kernel: np.ndarray | None = None, *, shape: Sequence[int] | None = None,
                 nonzero_fraction: float = 1.0, rank: int | None = None) -> float:
  """Multiply-add FLOPs per token of one linear map (2 per non-zero weight).

  ``kernel`` counts its own non-zeros (unstructured, N:M or block masks alike: a 2:4 layer
  halves); else ``shape = (K, N)`` with ``nonzero_fraction``; ``rank`` counts a factorized
  ``(K, r) @ (r, N)`` map as ``2 r (K + N)``.

  Example:
    >>> w = np.ones((8, 4)); w[::2] = 0                    # 2:4 along K
    >>> linear_flops(w), linear_flops(shape=(8, 4)), linear_flops(shape=(8, 4), rank=1)
    (32.0, 64.0, 24.0)
  """
  if kernel is not None:
    return 2.0 * float(np.count_nonzero(np.asarray(kernel)))
  if shape is None or len(shape) != 2:
    raise ValueError(f"give a kernel or shape=(K, N), got shape={shape}")
  k, n = shape
  if rank is not None:
    return 2.0 * rank * (k + n)
  if not 0.0 <= nonzero_fraction <= 1.0:
    raise ValueError(f"nonzero_fraction must lie in [0, 1], got {nonzero_fraction}")
  return 2.0 * k * n * nonzero_fraction


def latency_summary(seconds: Sequence[float], items_per_call: int) -> dict[str, float]:
  """p50 / p95 latency (ms) of timed calls and throughput (items per second, from the mean).

  Example:
    >>> s = latency_summary([0.010] * 19 + [0.030], items_per_call=64)
    >>> s["p50_ms"], s["p95_ms"], s["throughput"]
    (10.0, 11.0, 5818.2)
  """
  t = np.asarray(seconds, np.float64)
  if t.ndim != 1 or not len(t) or (t <= 0).any():
    raise ValueError("latency_summary needs at least one positive time")
  return {"p50_ms": round(float(np.percentile(t, 50)) * 1e3, 4),
          "p95_ms": round(float(np.percentile(t, 95)) * 1e3, 4),
          "throughput": round(items_per_call / float(t.mean()), 1), "calls": int(len(t))}


def _weights(weights: Sequence[float]) -> tuple[float, float, float]:
  w = tuple(float(x) for x in weights)
  if len(w) != 3 or any(x < 0 or not math.isfinite(x) for x in w) or not sum(w):
    raise ValueError(f"Pareto weights must be three finite non-negative numbers, not all 0; "
                     f"got {tuple(weights)}")
  return w  # type: ignore[return-value]


def _positive(**values: float) -> None:
  for name, v in values.items():
    if not (math.isfinite(v) and v > 0):
      raise ValueError(f"{name} must be a positive finite number, got {v}")
