"""Meshes and shardings from logical names (data parallel, FSDP, tensor); the optimizer."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import jaxcomp as jc
from jaxcomp.models import Llama, LlamaConfig
from jaxcomp.sparse.training import sparsify
from jaxcomp.train import make_optimizer
from jaxcomp.train import sharding as sh
from jaxcomp.train.loop import TrainState, make_step


def _mesh_cfg(**shape):
  return ml_collections.ConfigDict({"shape": shape})


def test_mesh_shapes_and_errors():
  n = jax.device_count()
  assert sh.make_mesh(_mesh_cfg(data=-1)).shape["data"] == n
  assert dict(sh.make_mesh(_mesh_cfg(data=-1, tensor=2)).shape) == {"data": n // 2, "fsdp": 1,
                                                                    "tensor": 2}
  with pytest.raises(ValueError, match=f"needs {3 * n} devices, {n} are present"):
    sh.make_mesh(_mesh_cfg(data=n, tensor=3))
  with pytest.raises(ValueError, match="mesh.shape has no axis 'model'"):
    sh.make_mesh(_mesh_cfg(model=2))
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    sh.make_mesh(_mesh_cfg(data=-1, fsdp=-1))


def test_param_shardings_follow_rules_and_name_missing_axes():
  mesh = sh.make_mesh(_mesh_cfg(data=-1))
  _, params, _ = nnx.split(Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0)), nnx.Param, ...)
  shardings = sh.param_shardings(params, mesh)  # data parallel: everything replicated
  assert all(s.is_fully_replicated for s in jax.tree.leaves(shardings))
  rules = [("vocab", "data"), ("embed", None)]
  with pytest.raises(ValueError, match=r"logical axis '\w+' has no sharding rule"):
    sh.param_shardings(params, mesh, rules)


def test_optimizer_rejects_warmup_longer_than_run():
  cfg = ml_collections.ConfigDict(dict(lr=1e-3, warmup_steps=10, weight_decay=0.0, grad_clip=1.0))
  with pytest.raises(ValueError, match=r"train.warmup_steps=10 must be in \[0, 8\)"):
    make_optimizer(cfg, total_steps=8)


def _lm_loss(model, batch, rng, frozen=None):
  del rng, frozen
  logits = model(batch["tokens"][:, :-1])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["tokens"][:, 1:]).mean()
  return loss, {}


def _run_steps(mesh_shape, rules, n_steps=3, sparse=False):
  """Losses and final params of a few steps of a tiny Llama on a mesh of the 8 devices."""
  mesh = sh.make_mesh(_mesh_cfg(**mesh_shape))
  model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adamw(1e-2)
  if sparse:
    tx = sparsify(tx, lambda path, _: jc.Sparsity(sparsity=0.5) if path.endswith(
        "mlp/up_proj/kernel") else None, schedule=lambda step: 1.0, update_every=1)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.key_data(jax.random.key(0)))
  shardings = sh.state_shardings(state, mesh, rules)
  state = jax.device_put(state, shardings)
  step = jax.jit(make_step(_lm_loss, graphdef, rest, tx), in_shardings=(
      shardings, sh.batch_sharding(mesh)), out_shardings=(shardings, None))
  tokens = jax.random.randint(jax.random.key(1), (8, 17), 0, 256)
  losses = []
  with sh.activation_rules(mesh, rules):
    for _ in range(n_steps):
      state, metrics = step(state, {"tokens": tokens})
      losses.append(float(metrics["loss"]))
  return losses, state, shardings


@pytest.mark.parametrize("mesh_shape,rules", [
    ({"fsdp": 8}, "fsdp"), ({"data": 2, "fsdp": 2, "tensor": 2}, "fsdp_tensor")])
def test_fsdp_and_tensor_steps_match_data_parallel(mesh_shape, rules):
  ref, _, _ = _run_steps({"data": 8}, "data_parallel")
  losses, state, shardings = _run_steps(mesh_shape, rules)
  np.testing.assert_allclose(losses, ref, rtol=1e-5)
  q = state.params["layers"][0]["attn"]["q_proj"]["kernel"][...]
  want = P("fsdp", None) if rules == "fsdp" else P("fsdp", "tensor")
  assert q.sharding.spec == want
  # Adam's moments are sharded like the params they mirror; step counts are replicated.
  mu = shardings.opt_state[0].mu["layers"][0]["attn"]["q_proj"]["kernel"]
  assert mu.spec == want
  assert shardings.opt_state[0].count.spec == P()


def test_sparsity_masks_shard_like_their_kernels():
  _, state, shardings = _run_steps({"fsdp": 8}, "fsdp", n_steps=2, sparse=True)
  mask = shardings.opt_state.masks["layers"][0]["mlp"]["up_proj"]["kernel"]
  assert mask.spec == P("fsdp", None)
  kernel = np.asarray(state.params["layers"][0]["mlp"]["up_proj"]["kernel"][...])
  assert (kernel == 0).mean() == 0.5


def test_rule_errors_are_one_line():
  with pytest.raises(ValueError, match="mesh.rules must be one of data_parallel, fsdp, "
                     "fsdp_tensor"):
    sh.rules("zero3")
  with pytest.raises(ValueError, match="maps 'embed' to 'model', not a mesh axis"):
    sh.rules([("embed", "model")])
  mesh = sh.make_mesh(_mesh_cfg(fsdp=8))
  _, params, _ = nnx.split(Llama(LlamaConfig.tiny(dim=36, n_heads=2, n_kv_heads=1),
                                 rngs=nnx.Rngs(0)), nnx.Param, ...)
  with pytest.raises(ValueError, match=r"embed/embedding: dimension 'embed' of "
                     r"size 36 does not divide over mesh axis 'fsdp' of size 8"):
    sh.param_shardings(params, mesh, "fsdp")
