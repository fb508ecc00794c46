"""Delayed scaling (``Quant(scaling="delayed")``): per-tensor activation and gradient scales from
earlier steps' absmax, the history passed back as a cotangent, calibration, the optimizer
wrapper, serving, stacks and the refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import jaxcomp as jc
from jaxcomp.quant import dot as qdot

DELAYED = jc.Quant(w_bits=8, a_bits=8, g_bits=8, a_granularity="tensor", scaling="delayed",
                   amax_history=4)
DN = (((1,), (0,)), ((), ()))


@pytest.mark.parametrize("kwargs, match", [
    (dict(a_bits=8, scaling="delayed"), "a_granularity='tensor'"),
    (dict(a_bits=8, a_granularity="tensor", scaling="delayed", group=32), "not groups"),
    (dict(scaling="delayed"), "needs a_bits"),
    (dict(a_bits=8, a_granularity="tensor", scaling="delayed", amax_history=0), "positive int"),
    (dict(a_bits=8, amax_history=8), "applies to scaling='delayed' only"),
    (dict(a_bits=8, scaling="late"), "scaling"),
])
def test_bad_delayed_specs_are_refused(kwargs, match):
  with pytest.raises(jc.SpecError, match=match):
    jc.Quant(w_bits=8, **kwargs)


def test_spec_round_trips_and_old_dicts_are_unchanged():
  assert jc.Quant.from_dict(DELAYED.to_dict()) == DELAYED
  assert "scaling" not in jc.Quant(w_bits=8, a_bits=8).to_dict()  # stage fingerprints keep


def test_amax_scale_and_empty_history():
  assert float(qdot.amax_scale(jnp.array([1.27, 2.54, 0.0]), 8)) == pytest.approx(0.02)
  assert np.isnan(float(qdot.amax_scale(jnp.zeros(4), 8)))


def _grid(v, s):
  return np.clip(np.round(v / s), -127, 127)


def test_forward_backward_and_history_match_a_numpy_reference():
  """y = (qx @ qw) s_x s_w with s_x from the history; d x from G quantized once per tensor
  against the weight re-quantized per input row; d w = s_x s_g qx^T qg; the history's
  cotangent is the history with this step's absmax pushed in front."""
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (24, 40))
  w = jax.random.normal(kw, (40, 16)) * 0.2
  g = jax.random.normal(kg, (24, 16)) * 1e-3
  hist = jnp.array([[3.0, 4.5, 0.0, 1.0], [2e-3, 1e-3, 4e-3, 0.0]])
  f = lambda x, w, h: qdot.quant_dot_general(x, w, DN, DELAYED, amax_history=h)

  @jax.jit
  def forward_backward(x, w, h, g):
    y, vjp = jax.vjp(f, x, w, h)
    return (y, *vjp(g))

  y, dx, dw, dh = forward_backward(x, w, hist, g)

  xn, wn, gn = (np.asarray(a, np.float64) for a in (x, w, g))
  s_x, s_g = 4.5 / 127, 4e-3 / 127
  s_w = np.abs(wn).max(0, keepdims=True) / 127
  qx, qw, qg = _grid(xn, s_x), _grid(wn, s_w), _grid(gn, s_g)
  np.testing.assert_allclose(np.asarray(y), (qx @ qw) * s_x * s_w, rtol=1e-5, atol=1e-6)
  w_hat = qw * s_w
  s_k = np.abs(w_hat).max(1, keepdims=True) / 127
  np.testing.assert_allclose(np.asarray(dx), s_g * (qg @ _grid(w_hat, s_k).T) * s_k.T,
                             rtol=1e-4, atol=1e-9)
  np.testing.assert_allclose(np.asarray(dw), s_x * s_g * (qx.T @ qg), rtol=1e-4, atol=1e-9)
  want = [[np.abs(xn).max(), 3.0, 4.5, 0.0], [np.abs(gn).max(), 2e-3, 1e-3, 4e-3]]
  np.testing.assert_allclose(np.asarray(dh), want, rtol=1e-6)


def test_float_backward_leaves_the_gradient_row():
  spec = jc.Quant(w_bits=8, a_bits=8, a_granularity="tensor", scaling="delayed", amax_history=3)
  hist = jnp.array([[2.0, 1.0, 0.5], [7.0, 6.0, 5.0]])
  x = jnp.full((4, 8), 0.5)
  dh = jax.grad(lambda h: qdot.quant_dot_general(x, jnp.ones((8, 3)), DN, spec,
                                                 amax_history=h).sum())(hist)
  np.testing.assert_array_equal(dh, [[0.5, 2.0, 1.0], [7.0, 6.0, 5.0]])


def test_non_finite_activations_poison_the_output():
  x = jnp.ones((4, 8)).at[1, 2].set(jnp.nan)
  y = qdot.quant_dot_general(x, jnp.ones((8, 3)), DN, DELAYED, amax_history=jnp.ones((2, 4)))
  assert np.isnan(np.asarray(y)).all()


def _mlp():
  return nnx.Sequential(nnx.Linear(16, 32, rngs=nnx.Rngs(0)), nnx.relu,
                        nnx.Linear(32, 8, rngs=nnx.Rngs(1)))


def _loss(model, x, y):
  return jnp.mean((model(x) - y) ** 2)


_jit_loss = nnx.jit(_loss)
_calibrate = nnx.jit(jc.calibrate_amax, static_argnums=1)  # as users would for large models


@pytest.fixture(scope="module")
def data():
  kx, ky = jax.random.split(jax.random.key(3))
  return jax.random.normal(kx, (64, 16)), jax.random.normal(ky, (64, 8))


def test_calibrate_then_train_with_the_overwriting_optimizer(data):
  x, y = data
  q = jc.quantize(_mlp(), jc.Recipe([jc.Rule(".*", quant=DELAYED)]))
  assert q.layers[0].dot_general.amax_history.shape == (2, 4)
  assert np.isnan(float(_jit_loss(q, x, y)))  # uncalibrated: NaN, never a silent guess
  cal = _calibrate(q, _loss, x, y)
  assert not np.asarray(q.layers[0].dot_general.amax_history[...]).any()  # input untouched
  h0 = np.asarray(cal.layers[0].dot_general.amax_history[...])
  assert h0[0, 0] == pytest.approx(float(jnp.max(jnp.abs(x))))
  assert h0[1, 0] > 0 and not h0[:, 1:].any()
  assert float(_jit_loss(cal, x, y)) == pytest.approx(float(_jit_loss(_mlp(), x, y)), rel=0.02)

  wrt = (nnx.Param, jc.AmaxHistory)
  tx = jc.amax_overwrite(optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)))
  opt = nnx.Optimizer(cal, tx, wrt=wrt)

  @nnx.jit
  def step(model, opt, x, y):
    loss, grads = nnx.value_and_grad(_loss, argnums=nnx.DiffState(0, wrt))(model, x, y)
    opt.update(model, grads)
    return loss

  first = float(step(cal, opt, x, y))
  for _ in range(29):
    last = float(step(cal, opt, x, y))
  assert last < 0.5 * first
  h = np.asarray(cal.layers[0].dot_general.amax_history[...])
  assert np.isfinite(h).all() and (h > 0).all()  # 30 steps filled all 4 entries
  assert h[0, 0] == pytest.approx(float(jnp.max(jnp.abs(x))))  # the same input every step


def test_amax_overwrite_keeps_histories_out_of_the_optimizer():
  tx = jc.amax_overwrite(optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1.0)))
  p = {"w": jnp.ones(2), "dot_general": {"amax_history": jnp.zeros((2, 2))}}
  g = {"w": jnp.full(2, 3.0), "dot_general": {"amax_history": jnp.full((2, 2), 100.0)}}
  u, _ = tx.update(g, tx.init(p), p)
  new = optax.apply_updates(p, u)
  np.testing.assert_allclose(new["w"], 1 - np.sqrt(0.5), rtol=1e-6)  # clipped by w's norm alone
  np.testing.assert_allclose(new["dot_general"]["amax_history"], 100.0)
  with pytest.raises(ValueError, match="needs params"):
    tx.update(g, tx.init(p))


def test_convert_serves_the_trained_numerics_and_round_trips(data, tmp_path):
  x, y = data
  recipe = jc.Recipe([jc.Rule(".*", quant=DELAYED)])
  q = jc.quantize(_mlp(), recipe)
  with pytest.raises(ValueError, match="layers/0: its amax history is empty"):
    jc.convert(q)
  cal = _calibrate(q, _loss, x, y)
  packed = jc.convert(cal)
  np.testing.assert_array_equal(np.asarray(packed(x)), np.asarray(cal(x)))
  jc.save_packed(packed, tmp_path / "ckpt")
  like = nnx.eval_shape(lambda: jc.packed_skeleton(_mlp(), recipe))
  back = jc.restore_packed(tmp_path / "ckpt", like)
  np.testing.assert_array_equal(np.asarray(back(x)), np.asarray(packed(x)))


class _Block(nnx.Module):

  def __init__(self, rngs):
    self.up = nnx.Linear(8, 16, rngs=rngs)
    self.mix = nnx.Einsum("bd,df->bf", (16, 8), rngs=rngs)

  def __call__(self, x):
    return x + self.mix(jax.nn.relu(self.up(x)))


class _Scanned(nnx.Module):

  def __init__(self, rngs):
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return _Block(rngs)

    self.blocks = make(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def forward(x, block):
      return block(x)

    return forward(x, self.blocks)


def test_stacked_layers_keep_one_history_per_layer():
  """nnx.vmap + nnx.scan: each of the 3 stacked layers records its own absmax, equal to the
  same blocks run one by one."""
  x = jax.random.normal(jax.random.key(5), (32, 8))
  loss = lambda m, x: jnp.mean(m(x) ** 2)
  recipe = jc.Recipe([jc.Rule("blocks/.*", quant=DELAYED)])
  model = _calibrate(jc.quantize(_Scanned(nnx.Rngs(0)), recipe), loss, x)
  hist = np.asarray(model.blocks.up.dot_general.amax_history[...])
  assert hist.shape == (3, 2, 4)
  graphdef, state = nnx.split(model.blocks)
  inputs = nnx.jit(lambda blocks, x: [x := blocks[i](x) for i in range(2)])(
      [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)) for i in range(3)], x)
  for i, h in enumerate([x] + inputs):
    assert hist[i, 0, 0] == pytest.approx(float(jnp.max(jnp.abs(h))), rel=1e-6)
  assert len(set(hist[:, 1, 0].tolist())) == 3 and (hist[:, 1, 0] > 0).all()
  mix = np.asarray(model.blocks.mix.einsum_op.amax_history[...])
  assert mix.shape == (3, 2, 4) and (mix[:, :, 0] > 0).all()


def test_layers_without_an_integer_dot_and_other_paths_refuse_delayed_scaling(data):
  x, _ = data
  conv = nnx.Sequential(nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="convolves in float"):
    jc.quantize(conv, jc.Recipe([jc.Rule(".*", quant=DELAYED)]))
  embed = nnx.Sequential(nnx.Embed(10, 4, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="not supported on Embed"):
    jc.quantize(embed, jc.Recipe([jc.Rule(".*", quant=DELAYED)]))
  dense = nn.Dense(4)
  variables = dense.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="NNX-only"):
    jc.quantize(dense, jc.Recipe([jc.Rule(".*", quant=DELAYED)]), variables=variables,
                args=(x,))
  with pytest.raises(ValueError, match="come from training steps"):
    jc.ptq(_mlp(), jc.Recipe([jc.Rule(".*", quant=DELAYED)]), calib=x)
  with pytest.raises(ValueError, match="no layer quantized"):
    jc.calibrate_amax(_mlp(), _loss, x, x[:, :8])
