"""The harness's metrics on hand-computed examples."""

import numpy as np
import pytest

from jaxcomp.eval import metrics


def test_degradation_bands_at_their_edges():
  assert metrics.degradation_band(10.0, 10.0) == "low"
  assert metrics.degradation_band(11.49, 10.0) == "low"
  assert metrics.degradation_band(11.5, 10.0) == "moderate"  # exactly 15%
  assert metrics.degradation_band(13.0, 10.0) == "moderate"  # exactly 30%
  assert metrics.degradation_band(13.01, 10.0) == "high"
  with pytest.raises(ValueError, match="ppl_base must be a positive finite number"):
    metrics.degradation_band(10.0, float("nan"))


def test_lat_pe_and_pareto_score_by_hand():
  # Quality kept 90%, half the latency, a quarter of the bytes.
  assert metrics.latency_tradeoff(0.9, 1.0, 5.0, 10.0) == pytest.approx(1.8)
  assert metrics.latency_tradeoff(0.9, 1.0, 5.0, 10.0, alpha=0.5) == pytest.approx(
      0.9 * 2 ** 0.5)
  assert metrics.parameter_efficiency(0.9, 1.0, 25.0, 100.0) == pytest.approx(3.6)
  # 0.5 * 0.9 + 0.25 * (1 - 0.25) + 0.25 * (1 - 0.5)
  assert metrics.pareto_score(0.9, 1.0, 25.0, 100.0, 5.0, 10.0) == pytest.approx(0.7625)
  assert metrics.pareto_score(0.9, 1.0, 25.0, 100.0, 5.0, 10.0,
                              weights=(1, 0, 0)) == pytest.approx(0.9)
  # The baseline scores w1 exactly.
  assert metrics.pareto_score(1.0, 1.0, 7.0, 7.0, 3.0, 3.0) == pytest.approx(0.5)
  with pytest.raises(ValueError, match="Pareto weights"):
    metrics.pareto_score(1, 1, 1, 1, 1, 1, weights=(1, -1, 0))


def test_frontier_keeps_exactly_the_non_dominated_points():
  # (quality up, bytes down, latency down)
  pts = [(0.90, 100, 10),   # 0: best quality
         (0.85, 25, 6),     # 1: on the front
         (0.84, 25, 7),     # 2: dominated by 1
         (0.70, 20, 9),     # 3: smallest -> front
         (0.85, 25, 6),     # 4: equal to 1, kept
         (0.60, 30, 5)]     # 5: fastest -> front
  assert metrics.pareto_frontier(pts, maximize=(True, False, False)) == [0, 1, 3, 4, 5]
  with pytest.raises(ValueError, match="one value per objective"):
    metrics.pareto_frontier([(1, 2)], maximize=(True, False, False))


def test_robustness_score_caps_gains_at_one():
  assert metrics.robustness_score({0.0: 0.8, 0.1: 0.6, 0.2: 0.4}) == pytest.approx(0.625)
  assert metrics.robustness_score({0.0: 0.5, 0.1: 0.6}) == 1.0  # noise that helps counts 1
  with pytest.raises(ValueError, match="clean quality at rate 0.0"):
    metrics.robustness_score({0.1: 0.5})


def test_classification_metrics_and_ece_by_hand():
  probs = np.array([[.9, .1, 0.], [.6, .4, 0.], [.3, .7, 0.], [.2, .8, 0.], [.1, .05, .85]])
  labels = np.array([0, 1, 1, 1, 2])
  c = metrics.classification(probs, labels, n_bins=10)
  assert c.accuracy == pytest.approx(4 / 5)
  assert c.balanced_accuracy == pytest.approx((1 + 2 / 3 + 1) / 3)
  # F1: class 0 2*1/(1+2), class 1 2*2/(3+2), class 2 2*1/(1+1)
  assert c.macro_f1 == pytest.approx((2 / 3 + 4 / 5 + 1) / 3)
  # bins: .9 (hit) .6 (miss) .7 (hit) .8 (hit) .85 (hit, same bin as .8)
  ece = (abs(1 - .9) + abs(0 - .6) + abs(1 - .7) + 2 * abs(1 - (.8 + .85) / 2)) / 5
  assert c.ece == pytest.approx(ece)
  perfect = metrics.classification(np.eye(3), np.arange(3))
  assert (perfect.accuracy, perfect.macro_f1, perfect.ece) == (1.0, 1.0, 0.0)
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
    metrics.classification(np.eye(3), np.array([0, 1, 3]))


def test_flops_of_a_2_4_layer_are_half_the_dense_ones():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(64, 32))
  keep = np.argsort(-np.abs(w.reshape(16, 4, 32)), axis=1)[:, :2]  # 2 of every 4 along K
  mask = np.zeros((16, 4, 32), bool)
  np.put_along_axis(mask, keep, True, axis=1)
  sparse = np.where(mask.reshape(64, 32), w, 0.0)
  assert metrics.linear_flops(sparse) == 0.5 * metrics.linear_flops(w) == 64 * 32
  assert metrics.linear_flops(shape=(64, 32), rank=8) == 2 * 8 * (64 + 32)


def test_weight_error_spectral_and_frobenius():
  w = np.diag([3.0, 4.0])
  e = metrics.weight_error(w, np.diag([3.0, 3.0]))
  assert e["spectral"] == pytest.approx(1.0)
  assert e["rel_spectral"] == pytest.approx(0.25)
  assert e["rel_frobenius"] == pytest.approx(1 / 5)
  with pytest.raises(ValueError, match="weight shapes differ"):
    metrics.weight_error(w, np.ones(3))


def test_latency_summary_percentiles():
  s = metrics.latency_summary([0.002, 0.001, 0.003, 0.004], items_per_call=10)
  assert s["p50_ms"] == pytest.approx(2.5)
  assert s["p95_ms"] == pytest.approx(3.85)
  assert s["throughput"] == pytest.approx(4000.0)
  with pytest.raises(ValueError, match="positive time"):
    metrics.latency_summary([], items_per_call=1)
