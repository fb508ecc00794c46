"""Non-uniform layer sparsity from outlier ratios, as OWL does (Yin et al., 2023, "Outlier
Weighed Layerwise Sparsity"), on plain arrays.

A layer's outlier ratio ``D`` is the fraction of its Wanda scores ``|W_kn| * ||x_k||`` above
``m`` times their mean (the paper uses m = 5 and a sparsity spread lam = 0.08 for LLaMA).
Layers with more outliers keep more weights: the sparsities are spread linearly in
``[target - lam, target + lam]``, highest ratio lowest sparsity, then shifted so that the
parameter-weighted mean is exactly ``target`` (the same total number of zeros as uniform
``target``), clipped to ``[0, 1)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def outlier_ratio(scores: np.ndarray, m: float = 5.0) -> float:
  """The fraction of ``scores`` (any shape, e.g. a layer's (K, N) Wanda scores) above ``m``
  times their mean.

  Example:
    >>> outlier_ratio(np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 100.0]), m=5)
    0.125
  """
  s = np.abs(np.asarray(scores, np.float64))
  return float(np.mean(s > m * s.mean()))


def owl_sparsities(ratios: Sequence[float], params: Sequence[int], target: float,
                   lam: float = 0.08) -> np.ndarray:
  """Per-layer sparsities (float64[L]) whose parameter-weighted mean is ``target``.

  Args:
    ratios: [L] outlier ratios (`outlier_ratio`).
    params: [L] weights per layer.
    target: the overall fraction pruned, in (0, 1).
    lam: half-width of the spread around ``target``.

  Example:
    >>> owl_sparsities([0.01, 0.03], [100, 100], 0.5, lam=0.1).tolist()
    [0.6, 0.4]
  """
  d, n = np.asarray(ratios, np.float64), np.asarray(params, np.float64)
  if d.shape != n.shape or d.ndim != 1 or not len(d):
    raise ValueError(f"owl_sparsities: need one ratio and one parameter count per layer, got "
                     f"{d.shape} and {n.shape}")
  if not 0 < target < 1:
    raise ValueError(f"owl_sparsities: target must be in (0, 1), got {target}")
  if not 0 <= lam < min(target, 1 - target):
    raise ValueError(f"owl_sparsities: lam must be in [0, {min(target, 1 - target):g}) for "
                     f"target {target}, got {lam}")
  span = d.max() - d.min()
  unit = np.zeros_like(d) if span == 0 else (d - d.min()) / span  # 0: fewest outliers
  s = target + lam * (1 - 2 * unit)
  for _ in range(50):  # shift to the exact weighted mean; the clip rarely binds
    s = np.clip(s + target - np.sum(s * n) / n.sum(), 0.0, 1.0 - 1e-6)
    if abs(np.sum(s * n) / n.sum() - target) < 1e-12:
      break
  return s
