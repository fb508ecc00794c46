"""`jc.convert` (packed serving form) and packed checkpoints: equality, sizes, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxcomp as jc
from jaxcomp.models.llama import Llama, LlamaConfig, generate
from jaxcomp.quant.qarray import QArray

CFG = LlamaConfig.tiny(tie_embeddings=True)
TOKENS = jax.random.randint(jax.random.key(1), (2, 16), 0, 256)


def _recipe(proj, embed=None):
  rules = [jc.Rule(r".*_proj", quant=proj)]
  if embed is not None:
    rules.insert(0, jc.Rule("embed", quant=embed))
  return jc.Recipe(rules)


@pytest.mark.parametrize("proj,embed", [
    (jc.Quant(w_bits=8, a_bits=8), jc.Quant(w_bits=8, a_bits=8)),
    (jc.Quant(w_bits=4, group=32), jc.Quant(w_bits=4, group=16)),
    (jc.Quant(w_bits=8, a_bits=8, group=32), None),
    (jc.Quant(w_bits=4, w_symmetric=False), jc.Quant(w_bits=8)),
    (jc.Quant(w_bits=3, calibration="mse"), None),
    (jc.Quant(w_bits=4, group=32, full_range=True), jc.Quant(w_bits=8, full_range=True)),
    (jc.Quant(w_bits=8, a_bits=8, full_range=True), None),
    # W4A8: the packed nibbles' int8 GEMM (per channel, per group); on CPU a decode-shaped
    # call takes the nibble-split path (`dot._int4_skinny_dot`), bit-exact all the same.
    (jc.Quant(w_bits=4, a_bits=8), jc.Quant(w_bits=8, a_bits=8)),
    (jc.Quant(w_bits=4, a_bits=8, group=32), None),
    (jc.Quant(w_bits=4, a_bits=4, group=32), None),
], ids=str)
def test_converted_logits_equal_fake_quant(proj, embed):
  model = Llama(CFG, rngs=nnx.Rngs(0))
  qmodel = jc.quantize(model, _recipe(proj, embed))
  packed = jc.convert(qmodel)
  kernel = packed.layers[0].mlp.up_proj.kernel[...]
  assert isinstance(kernel, QArray) and kernel.packed == (proj.w_bits <= 4)
  assert isinstance(qmodel.layers[0].mlp.up_proj.kernel[...], jax.Array)  # input untouched
  for tokens in (TOKENS, TOKENS[:1, :1]):  # prefill and a one-token (decode-shaped) call
    np.testing.assert_array_equal(np.asarray(packed(tokens)), np.asarray(qmodel(tokens)))


def test_converted_lsq_model_after_training_steps_equals_fake_quant():
  model = Llama(CFG, rngs=nnx.Rngs(0))
  qmodel = jc.quantize(model, _recipe(jc.Quant(w_bits=4, learn_scale=True)))
  opt = nnx.Optimizer(qmodel, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(m, opt):
    loss = lambda m: jnp.mean(m(TOKENS) ** 2)
    opt.update(m, nnx.grad(loss)(m))

  for _ in range(3):
    step(qmodel, opt)
  packed = jc.convert(qmodel)
  np.testing.assert_array_equal(np.asarray(packed(TOKENS)), np.asarray(qmodel(TOKENS)))


def test_packed_model_decodes_like_the_fake_quant_model():
  qmodel = jc.quantize(Llama(CFG, rngs=nnx.Rngs(0)), _recipe(jc.Quant(w_bits=8, a_bits=8),
                                                               jc.Quant(w_bits=8, a_bits=8)))
  packed = jc.convert(qmodel)
  np.testing.assert_array_equal(generate(packed, TOKENS[:, :4], 6),
                                generate(qmodel, TOKENS[:, :4], 6))


def test_save_restore_roundtrip_and_bits_on_disk(tmp_path):
  model = nnx.Sequential(nnx.Linear(1024, 1024, use_bias=False, rngs=nnx.Rngs(0)),
                         nnx.Linear(1024, 512, rngs=nnx.Rngs(1)))
  x = jax.random.normal(jax.random.key(0), (4, 1024))
  for bits, group, limit in ((4, 128, 4.3), (8, None, 8.3)):
    recipe = jc.Recipe([jc.Rule(".*", quant=jc.Quant(w_bits=bits, group=group))])
    packed = jc.convert(jc.quantize(model, recipe))
    size = jc.save_packed(packed, tmp_path / f"w{bits}")
    assert size.packed_params == 1024 * 1024 + 1024 * 512 and size.float_params == 512
    assert size.packed_bits_per_param <= limit, size.to_dict()
    like = nnx.eval_shape(lambda: jc.packed_skeleton(nnx.Sequential(
        nnx.Linear(1024, 1024, use_bias=False, rngs=nnx.Rngs(0)),
        nnx.Linear(1024, 512, rngs=nnx.Rngs(1))), recipe))
    restored = jc.restore_packed(tmp_path / f"w{bits}", like)
    np.testing.assert_array_equal(np.asarray(restored(x)), np.asarray(packed(x)))


def test_skeleton_of_a_ptq_model_restores_its_smoothing(tmp_path):
  model = Llama(CFG, rngs=nnx.Rngs(0))
  recipe = _recipe(jc.Quant(w_bits=4, group=32, method="awq"))
  calib = jax.random.randint(jax.random.key(2), (8, 16), 0, 256)
  packed = jc.convert(jc.ptq(model, recipe, calib, progress=False))
  jc.save_packed(packed, tmp_path / "awq")
  like = nnx.eval_shape(lambda: jc.packed_skeleton(Llama(CFG, rngs=nnx.Rngs(0)), recipe))
  restored = jc.restore_packed(tmp_path / "awq", like)
  np.testing.assert_array_equal(np.asarray(restored(TOKENS)), np.asarray(packed(TOKENS)))


def test_bad_input(tmp_path):
  model = Llama(CFG, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="no quantized layers"):
    jc.convert(model)
  packed = jc.convert(jc.quantize(model, _recipe(jc.Quant(w_bits=4))))
  jc.save_packed(packed, tmp_path / "a")
  with pytest.raises(FileExistsError, match="already exists"):
    jc.save_packed(packed, tmp_path / "a")
  with pytest.raises(ValueError, match="no packed kernels"):
    jc.save_packed(model, tmp_path / "b")
  with pytest.raises(ValueError, match="is not a packed checkpoint"):
    jc.restore_packed(tmp_path, packed)
  other = jc.packed_skeleton(model, _recipe(jc.Quant(w_bits=8)))
  with pytest.raises(ValueError, match="does not match the model"):
    jc.restore_packed(tmp_path / "a", other)


@pytest.mark.parametrize("proj", [jc.Quant(w_bits=4, group=48),
                                  jc.Quant(w_bits=8, a_bits=8, group=48),
                                  jc.Quant(w_bits=4, a_bits=8, group=48),
                                  jc.Quant(w_bits=4, group=48, learn_scale=True)], ids=str)
def test_shorter_last_group_converts_exactly(proj):
  """64- and 128-wide inputs in groups of 48 (like SmolLM2's 576 in groups of 128)."""
  qmodel = jc.quantize(Llama(CFG, rngs=nnx.Rngs(0)), _recipe(proj))
  packed = jc.convert(qmodel)
  for tokens in (TOKENS, TOKENS[:1, :1]):  # prefill and a one-token (decode-shaped) call
    np.testing.assert_array_equal(np.asarray(packed(tokens)), np.asarray(qmodel(tokens)))
