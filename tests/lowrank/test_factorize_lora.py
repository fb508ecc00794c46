"""jc.factorize (SVD / ASVD / SVD-LLM layers) and LoRA add / merge on NNX models."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxcomp as jc
from jaxcomp.layers.lowrank import LoRALinear, LowRankLinear
from jaxcomp.models.llama import Llama, LlamaConfig
from jaxcomp.eval.size import param_count
from jaxcomp.rewrite.lora import add_lora, merge_lora

PROJ = r"layers/\d+/(attn|mlp)/\w+_proj"
TOKENS = jax.random.randint(jax.random.key(2), (4, 32), 0, 256)


@pytest.fixture(scope="module")
def setup():
  model = Llama(LlamaConfig.tiny(n_layers=2), rngs=nnx.Rngs(0))
  calib = jax.random.randint(jax.random.key(1), (16, 32), 0, 256)
  return model, calib


def _factorize(model, calib, spec):
  out, results = jc.factorize(model, jc.Recipe([jc.Rule(PROJ, lowrank=spec)]), calib, progress=False,
                     return_report=True)
  return out, results


def test_full_rank_reproduces_the_model(setup):
  model, calib = setup
  for method in ("svd", "asvd", "svd_llm"):
    out, results = _factorize(model, calib, jc.LowRank(energy=1.0, method=method))
    assert isinstance(out.layers[0].mlp.up_proj, LowRankLinear)
    assert isinstance(model.layers[0].mlp.up_proj, nnx.Linear)  # input untouched
    assert {r.rank for r in results} == {32, 64}  # min(in, out) of every layer
    np.testing.assert_allclose(out(TOKENS), model(TOKENS), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("reduction", [0.2, 0.4])
def test_budget_and_svd_llm_beats_svd_on_the_output(setup, reduction):
  model, calib = setup
  ref = model(TOKENS)
  err, sizes = {}, {}
  for method in ("svd", "asvd", "svd_llm"):
    out, results = _factorize(model, calib, jc.LowRank(reduction=reduction, method=method))
    err[method] = float(jnp.sum((out(TOKENS) - ref) ** 2) / jnp.sum(ref ** 2))
    sizes[method] = param_count(out)
    assert all(r.rank >= 1 for r in results)
  assert len(set(sizes.values())) == 1  # equal parameter counts
  matched = 2 * (64 * 64 * 2 + 64 * 32 * 2 + 64 * 128 * 3)
  assert param_count(model) - sizes["svd"] >= reduction * matched * 0.9
  assert err["svd_llm"] < err["svd"], err


def test_energy_rank_and_errors(setup):
  model, calib = setup
  out, results = _factorize(model, calib, jc.LowRank(energy=0.999, method="svd"))
  assert all(1 <= r.rank <= 64 for r in results)
  with pytest.raises(ValueError, match=r"LowRank.rank=65 is above min\(in, out\)"):
    jc.factorize(model, jc.Recipe([jc.Rule(PROJ, lowrank=jc.LowRank(rank=65))]))
  with pytest.raises(ValueError, match="calib is missing; rule .* has LowRank.method='svd_llm'"):
    jc.factorize(model, jc.Recipe([jc.Rule(PROJ, lowrank=jc.LowRank(rank=4, method="svd_llm"))]))
  with pytest.raises(jc.SpecError, match="give exactly one of rank, reduction, energy"):
    jc.LowRank(rank=4, reduction=0.5)


def test_lora_trains_adapters_only_and_merges_exactly(setup):
  model, _ = setup
  lora = add_lora(model, r".*(q|v)_proj", rank=4, alpha=8.0, rngs=nnx.Rngs(3))
  assert isinstance(lora.layers[0].attn.q_proj, LoRALinear)
  np.testing.assert_array_equal(lora(TOKENS), model(TOKENS))  # b = 0: unchanged at start
  base_before = np.asarray(lora.layers[0].attn.q_proj.base.kernel[...]).copy()
  opt = nnx.Optimizer(lora, optax.adam(1e-2), wrt=nnx.LoRAParam)

  @nnx.jit
  def step(m, opt):
    loss = lambda m: jnp.mean(m(TOKENS)[:, :-1].max(-1))
    opt.update(m, nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(m))

  for _ in range(3):
    step(lora, opt)
  np.testing.assert_array_equal(lora.layers[0].attn.q_proj.base.kernel[...], base_before)
  assert float(jnp.abs(lora.layers[0].attn.q_proj.lora_b[...]).sum()) > 0
  merged = merge_lora(lora)
  assert type(merged.layers[0].attn.q_proj) is nnx.Linear
  np.testing.assert_allclose(merged(TOKENS), lora(TOKENS), atol=1e-4, rtol=1e-4)


def test_qlora_on_a_quantized_base(setup):
  model, _ = setup
  q = jc.quantize(model, jc.Recipe([jc.Rule(PROJ, quant=jc.Quant(w_bits=4, group=32))]))
  lora = add_lora(q, r".*_proj", rank=2, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(lora(TOKENS), q(TOKENS))
  with pytest.raises(ValueError, match="matches no nnx.Linear layer"):
    add_lora(model, "nothing", rank=2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"LoRA rank must be an int in \[1, min\(in, out\) = 32\]"):
    add_lora(model, r".*k_proj", rank=33, rngs=nnx.Rngs(0))
  packed = jc.convert(q)
  with pytest.raises(ValueError, match="not a packed QArray"):
    merge_lora(add_lora(packed, r".*_proj", rank=2, rngs=nnx.Rngs(0)))
