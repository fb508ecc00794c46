"""`jc.sensitivity`: Hessian-weighted scores equal the hand-computed error, packed bits equal the
converted model's bytes, the budgeted recipe is the brute-force optimum and never over budget,
a stacked Llama gets the unrolled model's scores with one choice per stack; bad input is one
line."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxcomp as jc
from jaxcomp.models.llama import Llama, LlamaConfig, scan_layers
from jaxcomp.quant.qarray import QArray
from jaxcomp.quantizers import gptq_core


class MLP(nnx.Module):
  """Three Linears in a list: the pipeline's blocks are the list's elements."""

  def __init__(self, rngs):
    dims = (64, 128, 64, 32)
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims, dims[1:])])

  def __call__(self, x):
    for i, layer in enumerate(self.layers):
      x = layer(x)
      x = jnp.tanh(x) if i < len(self.layers) - 1 else x
    return x


CANDIDATES = {"w2": jc.Quant(w_bits=2, group=32), "w3": jc.Quant(w_bits=3, group=32),
              "w4": jc.Quant(w_bits=4, group=32, method="gptq")}


@pytest.fixture(scope="module")
def mlp_and_scores():
  model = MLP(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (64, 64))
  sens = jc.sensitivity(model, r"layers/\d+", CANDIDATES, calib=x, progress=False,
                        calib_dtype=None)
  return model, x, sens


def test_scores_are_the_hessian_weighted_output_error(mlp_and_scores):
  model, x, sens = mlp_and_scores
  assert sens.paths == ("layers/0", "layers/1", "layers/2") and sens.names == ("w2", "w3", "w4")
  inputs = x
  for i, layer in enumerate(model.layers):
    w = layer.kernel[...]
    h = 2 * inputs.T @ inputs / inputs.shape[0]
    for c, spec in enumerate(CANDIDATES.values()):
      w_hat = (gptq_core.gptq(w, h, spec).w_hat if spec.method == "gptq"
               else gptq_core.rtn(w, spec))
      d = w_hat - w
      # H is captured from bfloat16 inputs (`Capture`); GPTQ's rounding choices follow it.
      np.testing.assert_allclose(sens.scores[i, c], float(jnp.sum(d * (h @ d))),
                                 rtol=5e-2 if spec.method == "gptq" else 1e-2)
    inputs = jnp.tanh(layer(inputs))  # the float model's inputs: nothing is rewritten
  # More bits, less error, more bits stored.
  assert np.all(np.diff(sens.scores, axis=1) < 0) and np.all(np.diff(sens.bits, axis=1) > 0)


@pytest.mark.parametrize("budget", [3.0, 3.3, 3.6, 4.0, 5.0])
def test_recipe_is_the_brute_force_optimum_and_its_bits_are_the_packed_bits(
    mlp_and_scores, budget):
  model, x, sens = mlp_and_scores
  recipe, alloc = sens.recipe(budget)
  best = min((c for c in itertools.product(range(3), repeat=3)
              if sum(sens.bits[i, k] for i, k in enumerate(c)) <= budget * sens.params.sum()),
             key=lambda c: sum(sens.scores[i, k] for i, k in enumerate(c)))
  assert alloc.loss == pytest.approx(sum(sens.scores[i, k] for i, k in enumerate(best)))
  assert sens.bits_per_param(alloc.choice) <= budget
  packed = jc.convert(jc.ptq(model, recipe, calib=x, progress=False))
  qas = [v.get_value() for _, v in nnx.iter_graph(packed)
         if isinstance(v, nnx.Variable) and isinstance(v.get_value(), QArray)]
  assert len(qas) == 3
  assert 8 * sum(q.nbytes for q in qas) == sum(sens.bits[i, k] for i, k in enumerate(alloc.choice))


def test_a_stacked_llama_scores_per_layer_and_chooses_per_stack():
  model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (4, 32), 0, 256)
  cands = {"w2": jc.Quant(w_bits=2, group=32, method="gptq"),
           "w4": jc.Quant(w_bits=4, group=32, method="gptq")}
  flat = jc.sensitivity(model, r".*_proj", cands, calib=tokens, progress=False)
  stacked = jc.sensitivity(scan_layers(model), r".*_proj", cands, calib=tokens, progress=False)
  as_flat = {p.replace("layers[", "layers/").replace("]", ""): i
             for i, p in enumerate(stacked.paths)}
  order = [as_flat[p] for p in flat.paths]
  np.testing.assert_allclose(stacked.scores[order], flat.scores, rtol=1e-3)
  np.testing.assert_array_equal(stacked.bits[order], flat.bits)
  recipe, alloc = stacked.recipe(3.5)
  assert len(recipe.rules) == 7 and recipe.rules[0].pattern == "layers/attn/k_proj"
  assert stacked.bits_per_param(alloc.choice) <= 3.5
  packed = jc.convert(jc.ptq(scan_layers(model), recipe, calib=tokens, progress=False))
  assert packed(tokens).shape == (4, 32, 256)


def test_bad_input_is_one_line(mlp_and_scores):
  model, x, sens = mlp_and_scores
  with pytest.raises(ValueError, match=r"2.5 bits/param is below the least achievable 3.0"):
    sens.recipe(2.5)
  with pytest.raises(ValueError, match="candidates is empty"):
    jc.sensitivity(model, r"layers/\d+", {}, calib=x)
  with pytest.raises(ValueError, match=r"candidate 'w8a8' quantizes activations"):
    jc.sensitivity(model, r"layers/\d+", {"w8a8": jc.Quant(w_bits=8, a_bits=8)}, calib=x)
  with pytest.raises(ValueError, match="calib is missing"):
    jc.sensitivity(model, r"layers/\d+", CANDIDATES, calib=None)


def test_direct_kl_is_the_model_with_only_that_layer_compressed():
  model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (4, 32), 0, 256)
  held_out = jax.random.randint(jax.random.key(2), (4, 32), 0, 256)
  cands = {"w2": jc.Quant(w_bits=2, group=32, method="gptq"),
           "w3": jc.Quant(w_bits=3, group=32, method="gptq")}
  sens = jc.sensitivity(model, r".*_proj", cands, calib=tokens, progress=False,
                        kl_tokens=held_out)
  assert sens.kl.shape == (14, 2) and np.all(sens.kl >= 0)
  for l in (0, 5, 13):
    one = jc.ptq(model, jc.Recipe([jc.Rule(sens.paths[l], quant=cands["w2"])]), calib=tokens,
                 progress=False)
    p, q = (jax.nn.log_softmax(m(held_out), -1) for m in (model, one))
    kl = float(jnp.sum(jnp.exp(p) * (p - q))) / held_out.size
    # ptq's dots run in bfloat16: 3% of the KL, or 1e-7 nats for the layers that barely move
    # it (float32 log-probabilities near -5.5 are 4.8e-7 apart: a KL of 4e-7 is at that floor,
    # and moves by 5% with the CPU's summation order)
    np.testing.assert_allclose(sens.kl[l, 0], kl, rtol=3e-2, atol=1e-7)
  # The stacked model: the same direct scores, layer by layer.
  stacked = jc.sensitivity(scan_layers(model), r".*_proj", cands, calib=tokens, progress=False,
                           kl_tokens=held_out)
  np.testing.assert_allclose(np.sort(stacked.kl.ravel()), np.sort(sens.kl.ravel()), rtol=1e-4,
                             atol=1e-9)
  # Spearman of the two estimators, per candidate, from the ranks.
  rank = lambda v: np.argsort(np.argsort(v))
  for c, name in enumerate(cands):
    expect = np.corrcoef(rank(sens.scores[:, c]), rank(sens.kl[:, c]))[0, 1]
    assert sens.spearman()[name] == pytest.approx(expect)
  recipe, alloc = sens.recipe(3.5, estimator="kl")
  assert sens.bits_per_param(alloc.choice) <= 3.5 and len(recipe.rules) == 14
  # Without kl_tokens: no direct score (one layer and one candidate take the same path).
  with pytest.raises(ValueError, match="estimator 'kl' needs the direct score"):
    jc.sensitivity(model, sens.paths[0], {"w2": cands["w2"]}, calib=tokens,
                   progress=False).recipe(3.5, estimator="kl")


@pytest.fixture(scope="module")
def mlp_and_rank_scores():
  """The ranks' scores, once for every budget (`jc.factorize` leaves the model untouched)."""
  model = MLP(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (64, 64))
  cands = {"keep": None, **{f"r{p}": jc.LowRank(reduction=p / 100, method="svd_llm")
                            for p in (20, 40, 60)}}
  return model, x, jc.sensitivity(model, r"layers/\d+", cands, calib=x, progress=False)


@pytest.mark.parametrize("budget", [0.6, 0.75, 0.9])
def test_rank_allocation_fits_the_budget_and_is_the_brute_force_optimum(
    mlp_and_rank_scores, budget):
  model, x, sens = mlp_and_rank_scores
  assert np.all(sens.scores[:, 0] == 0) and np.all(np.diff(sens.scores[:, 1:], axis=1) > 0)
  recipe, alloc = sens.recipe(32 * budget)
  limit = 32 * budget * sens.params.sum()
  best = min((c for c in itertools.product(range(4), repeat=3)
              if sum(sens.bits[i, k] for i, k in enumerate(c)) <= limit),
             key=lambda c: sum(sens.scores[i, k] for i, k in enumerate(c)))
  assert alloc.loss == pytest.approx(sum(sens.scores[i, k] for i, k in enumerate(best)))
  small = jc.factorize(model, recipe, calib=x, progress=False)
  stored = sum(v.get_value().size for _, v in nnx.iter_graph(small)
               if isinstance(v, nnx.Param) and v.get_value().ndim == 2)
  assert 32 * stored == sum(sens.bits[i, k] for i, k in enumerate(alloc.choice)) <= limit
  for rule, c in zip(recipe.rules, alloc.choice):
    assert rule.skip == (c == 0)


def test_to_dict_round_trips_and_the_frontier_is_the_dp_optimum(mlp_and_scores):
  _, _, sens = mlp_and_scores
  back = jc.Sensitivity.from_dict(sens.to_dict())
  assert back.paths == sens.paths and back.names == sens.names and back.specs == sens.specs
  np.testing.assert_array_equal(back.bits, sens.bits)
  np.testing.assert_array_equal(back.scores, sens.scores)
  assert back.kl is None
  bits, loss = sens.frontier()
  assert np.all(np.diff(bits) > 0) and np.all(np.diff(loss) < 0)
  # Each point: the least summed score of any allocation within that many bits.
  for b, l in zip(bits, loss):
    best = min(sum(sens.scores[i, c] for i, c in enumerate(choice))
               for choice in itertools.product(range(3), repeat=3)
               if sens.bits_per_param(np.asarray(choice)) <= b + 1e-9)
    assert l == pytest.approx(best)
  with pytest.raises(ValueError, match="not a Sensitivity.to_dict"):
    jc.Sensitivity.from_dict({"candidates": ["w2"]})


def test_kl_for_some_candidates_only():
  model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (4, 32), 0, 256)
  cands = {"w2": jc.Quant(w_bits=2, group=32), "w3": jc.Quant(w_bits=3, group=32)}
  sens = jc.sensitivity(model, r".*_proj", cands, calib=tokens, progress=False,
                        kl_tokens=tokens[:2], kl_candidates=["w3"])
  assert np.isnan(sens.kl[:, 0]).all() and (sens.kl[:, 1] >= 0).all()
  assert list(sens.spearman()) == ["w3"]
  back = jc.Sensitivity.from_dict(sens.to_dict())
  np.testing.assert_array_equal(np.isnan(back.kl), np.isnan(sens.kl))
  with pytest.raises(ValueError, match=r"not measured for candidates \['w2'\]"):
    sens.recipe(3.0, estimator="kl")
  with pytest.raises(ValueError, match=r"kl_candidates \['w5'\] are not candidates"):
    jc.sensitivity(model, r".*_proj", cands, calib=tokens, kl_tokens=tokens,
                   kl_candidates=["w5"])


def test_calibrated_scores_rescale_each_layer_to_its_measured_kl():
  model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (4, 32), 0, 256)
  cands = {"w2": jc.Quant(w_bits=2, group=32), "w3": jc.Quant(w_bits=3, group=32),
           "w4": jc.Quant(w_bits=4, group=32)}
  sens = jc.sensitivity(model, r".*_proj", cands, calib=tokens, progress=False,
                        kl_tokens=tokens[:2], kl_candidates=["w3"])
  cal = sens.estimator("calibrated")
  np.testing.assert_allclose(cal[:, 1], sens.kl[:, 1], rtol=1e-12)  # the measured one: its KL
  # Per layer, the candidates keep their Hessian ratios.
  np.testing.assert_allclose(cal[:, 0] / cal[:, 1], sens.scores[:, 0] / sens.scores[:, 1])
  recipe, alloc = sens.recipe(3.5, estimator="calibrated")
  assert sens.bits_per_param(alloc.choice) <= 3.5 and len(recipe.rules) == 14
  with pytest.raises(ValueError, match="estimator 'calibrated' needs the direct score"):
    dataclasses.replace(sens, kl=None).estimator("calibrated")


def test_calibrated_scores_take_each_bit_widths_own_measured_kl():
  """With Fisher scores and a measured candidate per bit width, each width is rescaled by its
  own measurement (the nearest measured width for the others)."""
  model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (4, 32), 0, 256)
  cands = {"w2": jc.Quant(w_bits=2, group=32), "w3": jc.Quant(w_bits=3, group=32),
           "w3c": jc.Quant(w_bits=3), "w4": jc.Quant(w_bits=4, group=32)}
  sens = jc.sensitivity(model, r".*_proj", cands, calib=tokens, progress=False,
                        fisher_tokens=tokens[:2], kl_tokens=tokens[:2],
                        kl_candidates=["w2", "w3"])
  cal = sens.estimator("calibrated")
  np.testing.assert_allclose(cal[:, :2], sens.kl[:, :2], rtol=1e-12)
  f = sens.fisher
  np.testing.assert_allclose(cal[:, 2] / cal[:, 1], f[:, 2] / f[:, 1], rtol=1e-10)
  np.testing.assert_allclose(cal[:, 3] / cal[:, 1], f[:, 3] / f[:, 1], rtol=1e-10)  # nearest: 3
  assert not np.allclose(cal[:, 0] / cal[:, 1], f[:, 0] / f[:, 1])  # 2 bits: its own level


def test_fisher_score_predicts_the_direct_kl():
  """The Kronecker-factored Fisher score is the KL the candidate adds, to first order: on a
  tiny Llama it ranks the layers as the direct score does and matches its size, where the
  Hessian score (blind to what the later layers do with an error) does not."""
  model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (8, 64), 0, 256)
  cands = {"w2": jc.Quant(w_bits=2, group=32), "w3": jc.Quant(w_bits=3, group=32)}
  sens = jc.sensitivity(model, r".*_proj", cands, calib=tokens, progress=False,
                        kl_tokens=tokens, fisher_tokens=tokens, calib_dtype=None)
  assert min(sens.spearman("fisher").values()) > 0.9
  assert max(sens.spearman("hessian").values()) < 0.5
  # Within 30%, except that a direct KL under 1/1000 of the largest (~3e-8 here: k/v
  # projections) is float32 summation noise of its own size: atol covers those.
  np.testing.assert_allclose(sens.fisher[:, 1], sens.kl[:, 1], rtol=0.3,
                             atol=1e-3 * sens.kl[:, 1].max())
  back = jc.Sensitivity.from_dict(sens.to_dict())
  np.testing.assert_array_equal(back.fisher, sens.fisher)
  # A stack: the same scores, layer by layer (gradients sliced per layer of the stack).
  stacked = jc.sensitivity(scan_layers(model), r".*_proj", cands, calib=tokens, progress=False,
                           fisher_tokens=tokens, calib_dtype=None)
  np.testing.assert_allclose(np.sort(stacked.fisher.ravel()), np.sort(sens.fisher.ravel()),
                             rtol=1e-4)
  recipe, alloc = sens.recipe(3.0, estimator="fisher")
  assert sens.bits_per_param(alloc.choice) <= 3.0
  with pytest.raises(ValueError, match="estimator 'fisher' was not measured"):
    dataclasses.replace(sens, fisher=None).recipe(3.0, estimator="fisher")
