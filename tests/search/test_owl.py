"""OWL: outlier ratios, sparsities spread around the target with the same total zeros, and the
recipe `jc.owl_recipe` builds prunes each layer to its sparsity (one per stack)."""

import hypothesis
import hypothesis.strategies as st
import jax
import numpy as np
import pytest
from flax import nnx

import jaxcomp as jc
from jaxcomp.models.llama import Llama, LlamaConfig, scan_layers
from jaxcomp.rewrite.engine import module_at
from jaxcomp.search import outlier_ratio, owl_sparsities


def test_outlier_ratio_counts_scores_above_m_times_the_mean():
  s = np.ones((10, 10))
  s[0, :3] = 1000.0  # mean 30.97: three above 5x the mean
  assert outlier_ratio(s, m=5) == pytest.approx(0.03)
  assert outlier_ratio(-s, m=5) == pytest.approx(0.03)  # magnitudes


@hypothesis.settings(max_examples=50, deadline=None)
@hypothesis.given(ratios=st.lists(st.floats(0, 0.2), min_size=1, max_size=12),
                  data=st.data(), target=st.floats(0.2, 0.8), lam=st.floats(0, 0.15))
def test_sparsities_keep_the_total_and_order(ratios, data, target, lam):
  params = data.draw(st.lists(st.integers(1, 10_000), min_size=len(ratios),
                              max_size=len(ratios)))
  s = owl_sparsities(ratios, params, target, lam)
  n = np.asarray(params, float)
  assert np.sum(s * n) / n.sum() == pytest.approx(target, abs=1e-9)
  assert np.all(s >= 0) and np.all(s < 1)
  order = np.argsort(ratios, kind="stable")
  assert np.all(np.diff(s[order]) <= 1e-12)  # more outliers, no more sparsity
  assert np.ptp(s) <= 2 * lam + 1e-9


def test_bad_arguments_are_one_line():
  with pytest.raises(ValueError, match=r"target must be in \(0, 1\)"):
    owl_sparsities([0.1], [10], 1.0)
  with pytest.raises(ValueError, match=r"lam must be in \[0, 0.1\)"):
    owl_sparsities([0.1, 0.2], [10, 10], 0.9, lam=0.2)
  with pytest.raises(ValueError, match="one ratio and one parameter count per layer"):
    owl_sparsities([0.1, 0.2], [10], 0.5)


def test_owl_recipe_prunes_each_layer_to_its_sparsity_and_the_total_to_the_target():
  model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (4, 32), 0, 256)
  recipe, per_layer = jc.owl_recipe(model, r".*_proj", tokens, 0.5, lam=0.1, progress=False)
  assert len(recipe.rules) == 14 and len(set(per_layer.values())) > 1
  pruned = jc.prune(model, recipe, calib=tokens, progress=False)
  zeros = total = 0
  for path, s in per_layer.items():
    w = np.asarray(module_at(pruned, path).kernel[...])
    assert np.mean(w == 0) == pytest.approx(s, abs=1 / w.shape[0])  # per output, rounded
    zeros, total = zeros + np.sum(w == 0), total + w.size
  assert zeros / total == pytest.approx(0.5, abs=0.01)
  stacked, per_stack = jc.owl_recipe(scan_layers(model), r".*_proj", tokens, 0.5, lam=0.1,
                                     progress=False)
  assert len(stacked.rules) == 7 and stacked.rules[0].pattern == "layers/attn/k_proj"
  jc.prune(scan_layers(model), stacked, calib=tokens, progress=False)


def test_grouped_ratios_are_taken_over_each_block_together():
  model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (4, 32), 0, 256)
  recipe, per_layer = jc.owl_recipe(model, r".*_proj", tokens, 0.5, lam=0.1, progress=False,
                                    group=r"layers/\d+")
  assert len(recipe.rules) == 14
  blocks = {}
  for path, s in per_layer.items():
    blocks.setdefault(path.split("/")[1], set()).add(round(s, 12))
  assert all(len(v) == 1 for v in blocks.values()) and len(blocks) == 2
  assert len({v.pop() for v in blocks.values()}) == 2  # the two blocks differ
  params = {p: module_at(model, p).kernel[...].size for p in per_layer}
  mean = sum(per_layer[p] * params[p] for p in per_layer) / sum(params.values())
  assert mean == pytest.approx(0.5)
  # One group holding every layer: one ratio, so uniform sparsity.
  _, one = jc.owl_recipe(model, r".*_proj", tokens, 0.5, lam=0.1, progress=False, group="layers")
  assert np.allclose(list(one.values()), 0.5)
