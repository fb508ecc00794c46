"""Training-time sparsity (optax): masks in the state, exact sparsity on a schedule, pruned
weights stay zero, the jitted sharded step, scores, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxcomp as jc
from jaxcomp.sparse.training import cubic_schedule, layer_mask, sparsify


def _problem(key=0):
  k1, k2, k3 = jax.random.split(jax.random.key(key), 3)
  params = {"dense": {"kernel": jax.random.normal(k1, (64, 32)), "bias": jnp.zeros(32)},
            "conv": {"kernel": jax.random.normal(k2, (3, 3, 8, 16))}}
  x = jax.random.normal(k3, (128, 64))
  target = x @ jax.random.normal(jax.random.key(9), (64, 32))

  def loss(p):
    y = x @ p["dense"]["kernel"] + p["dense"]["bias"]
    return jnp.mean((y - target) ** 2) + 1e-3 * jnp.sum(p["conv"]["kernel"] ** 2)

  return params, loss


SPECS = {"dense": {"kernel": jc.Sparsity("block", sparsity=0.75, block=(8, 8)), "bias": None},
         "conv": {"kernel": jc.Sparsity("2:4")}}


def _train(opt, params, loss, steps):
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    updates, state = opt.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  history = []
  for _ in range(steps):
    params, state = step(params, state)
    history.append(params)
  return params, state, history


def test_gradual_schedule_reaches_exact_target_and_pruned_stay_zero():
  params, loss = _problem()
  schedule = cubic_schedule(begin_step=0, end_step=40)
  opt = sparsify(optax.adam(1e-2), SPECS, schedule=schedule, update_every=10)
  final, state, history = _train(opt, params, loss, 60)
  dense = np.asarray(final["dense"]["kernel"])
  tiles = (dense.reshape(8, 8, 4, 8) == 0).all(axis=(1, 3))
  assert tiles.sum() == round(0.75 * 32)  # whole 8x8 tiles, exactly 75% of them
  np.testing.assert_array_equal(dense == 0, ~np.asarray(state.masks["dense"]["kernel"]))
  conv = np.asarray(final["conv"]["kernel"]).reshape(-1, 4, 16)
  np.testing.assert_array_equal((conv != 0).sum(axis=1), 2)  # 2:4 along the inputs
  assert state.masks["dense"]["bias"] is None
  # Sparsity ramps up: never decreases between mask updates, frozen after end_step.
  zeros = [int((np.asarray(h["dense"]["kernel"]) == 0).sum()) for h in history]
  assert zeros == sorted(zeros) and zeros[0] < zeros[-1]
  assert len(set(zeros[41:])) == 1
  for h in history[41:]:  # once frozen, pruned weights stay exactly zero
    np.testing.assert_array_equal(np.asarray(h["dense"]["kernel"]) == 0, dense == 0)


def test_ramp_end_off_the_update_grid_still_reaches_the_target():
  # end_step 39 is not a multiple of update_every 20: the last ramp step must still update.
  params, loss = _problem()
  opt = sparsify(optax.adam(1e-2), SPECS, schedule=cubic_schedule(begin_step=0, end_step=39),
                 update_every=20)
  final, _, _ = _train(opt, params, loss, 45)
  tiles = (np.asarray(final["dense"]["kernel"]).reshape(8, 8, 4, 8) == 0).all(axis=(1, 3))
  assert tiles.sum() == round(0.75 * 32)


def test_one_shot_without_schedule():
  params, loss = _problem()
  opt = sparsify(optax.sgd(1e-2), {"dense": {"kernel": jc.Sparsity(sparsity=0.5), "bias": None},
                                   "conv": None})
  final, _, history = _train(opt, params, loss, 5)
  first = np.asarray(history[0]["dense"]["kernel"]) == 0
  assert first.sum() == 1024
  np.testing.assert_array_equal(np.asarray(final["dense"]["kernel"]) == 0, first)
  assert not (np.asarray(final["conv"]["kernel"]) == 0).any()


@pytest.mark.parametrize("score", ["movement", "taylor"])
def test_accumulated_scores(score):
  params, loss = _problem()
  opt = sparsify(optax.adam(1e-2), {"dense": {"kernel": jc.Sparsity(sparsity=0.5), "bias": None},
                                    "conv": None},
                 schedule=cubic_schedule(2, 6), update_every=2, score=score)
  final, state, _ = _train(opt, params, loss, 8)
  assert int((np.asarray(final["dense"]["kernel"]) == 0).sum()) == 1024
  assert float(jnp.abs(state.scores["dense"]["kernel"]).sum()) > 0


def test_masks_survive_the_jitted_sharded_step():
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  params, loss = _problem()
  shard = {"dense": {"kernel": NamedSharding(mesh, P(None, "model")),
                     "bias": NamedSharding(mesh, P("model"))},
           "conv": {"kernel": NamedSharding(mesh, P(None, None, None, "model"))}}
  params = jax.device_put(params, shard)
  opt = sparsify(optax.adam(1e-2), SPECS, schedule=cubic_schedule(0, 4), update_every=2)
  state = opt.init(params)
  mask_shard = jax.tree.map(lambda s: s, shard)
  mask_shard["dense"]["bias"] = None
  state_shard = jax.tree.map(lambda _: NamedSharding(mesh, P()), state)
  state_shard = state_shard._replace(masks=mask_shard, inner=jax.tree.map(
      lambda _: NamedSharding(mesh, P()), state.inner))
  state = jax.device_put(state, state_shard)

  @jax.jit
  def step(params, state):
    updates, state = opt.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step, in_shardings=(shard, state_shard), out_shardings=(shard, state_shard))
  for _ in range(8):
    params, state = step(params, state)
  assert state.masks["dense"]["kernel"].sharding == shard["dense"]["kernel"]
  kernel = np.asarray(params["dense"]["kernel"])
  np.testing.assert_array_equal(kernel == 0, ~np.asarray(state.masks["dense"]["kernel"]))
  assert int((kernel == 0).sum()) == 24 * 64


def test_layer_mask_views_conv_kernels_as_inputs_by_outputs():
  s = jnp.arange(3 * 3 * 4 * 2, dtype=jnp.float32).reshape(3, 3, 4, 2)
  m = np.asarray(layer_mask(s, jc.Sparsity("1:4"), 0.0)).reshape(-1, 4, 2)
  np.testing.assert_array_equal(m.sum(axis=1), 1)


def test_errors():
  params, loss = _problem()
  with pytest.raises(ValueError, match="score must be one of"):
    sparsify(optax.sgd(0.1), SPECS, score="random")
  with pytest.raises(ValueError, match="update_every must be a positive int"):
    sparsify(optax.sgd(0.1), SPECS, update_every=0)
  with pytest.raises(ValueError, match="specs do not match the params' structure"):
    sparsify(optax.sgd(0.1), {"dense": None}).init(params)
  with pytest.raises(ValueError, match="begin_step < end_step"):
    cubic_schedule(10, 10)
  with pytest.raises(ValueError, match="update needs params"):
    opt = sparsify(optax.sgd(0.1), SPECS)
    opt.update(params, opt.init(params))
