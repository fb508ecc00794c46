"""Llama under jit on a fake 8-device CPU mesh (tests/conftest.py sets XLA_FLAGS)."""

from flax import nnx
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from jaxcomp.models.llama import LOGICAL_AXES
from jaxcomp.models.llama import Llama
from jaxcomp.models.llama import LlamaConfig

# (mesh shape, mesh axes, logical-axis rules, tied embeddings)
_SETUPS = {
    "data_model": ((2, 4), ("data", "model"), (
        ("vocab", "model"), ("embed", None), ("q_heads", "model"),
        ("kv_heads", "model"), ("mlp", "model"), ("norm", None)), False),
    "data_fsdp_tensor": ((2, 2, 2), ("data", "fsdp", "tensor"), (
        ("vocab", "tensor"), ("embed", "fsdp"), ("q_heads", "tensor"),
        ("kv_heads", "tensor"), ("mlp", "tensor"), ("norm", None)), True),
}


def _cpu_mesh(shape, names):
  devices = jax.devices("cpu")
  assert len(devices) >= 8, "tests/conftest.py must force 8 host devices"
  return jax.make_mesh(shape, names, devices=devices[:8],
                       axis_types=(jax.sharding.AxisType.Auto,) * len(names))


@pytest.mark.parametrize("setup", sorted(_SETUPS))
def test_llama_jit_on_8_device_mesh_matches_unsharded(setup):
  shape, names, rules, tie = _SETUPS[setup]
  assert {r[0] for r in rules} == set(LOGICAL_AXES)
  mesh = _cpu_mesh(shape, names)
  cpu0 = jax.devices("cpu")[0]
  model_axis = names[-1]

  with jax.default_device(cpu0):
    model = Llama(LlamaConfig.tiny(tie_embeddings=tie), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, 256)
    want = np.asarray(nnx.jit(lambda m, t: m(t))(model, tokens))

  graphdef, state = nnx.split(model)
  with nnx.logical_axis_rules(rules):
    shardings = nnx.get_named_sharding(state, mesh)
  state = jax.device_put(state, shardings)
  tokens = jax.device_put(tokens, NamedSharding(mesh, P("data")))

  q = state["layers"][0]["attn"]["q_proj"]["kernel"][...]
  assert q.sharding.spec == P(dict(rules)["embed"], model_axis)
  assert len(q.addressable_shards) == 8
  assert q.addressable_shards[0].data.shape == (
      64 // (2 if dict(rules)["embed"] else 1), 64 // shape[-1])

  @jax.jit
  def forward(state, tokens):
    return nnx.merge(graphdef, state)(tokens)

  got = forward(state, tokens)
  assert got.shape == (4, 16, 256)
  # Batch stays split over "data"; the vocab dim follows lm_head / embed.
  assert got.sharding.is_equivalent_to(
      NamedSharding(mesh, P("data", None, model_axis)), got.ndim)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)

  # The same through nnx.jit on a merged (sharded) model.
  sharded_model = nnx.merge(graphdef, state)
  got2 = nnx.jit(lambda m, t: m(t))(sharded_model, tokens)
  np.testing.assert_allclose(np.asarray(got2), want, atol=1e-5)


def test_batch_chunked_attention_loops_within_each_batch_shard():
  """``attn_batch_chunk`` under the training rules (`jaxcomp.train.sharding`): sequences are
  taken ``chunk`` per batch shard per step, so the logits equal the unchunked model's and the
  step's temporaries do not grow with the number of shards at a fixed per-shard batch (a loop
  over the global batch runs every sequence's attention on every device)."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from jaxcomp.train import sharding as sh  # pylint: disable=import-outside-toplevel
  graphdefs = {c: nnx.split(Llama(LlamaConfig.tiny(attn_batch_chunk=c), rngs=nnx.Rngs(0)))
               for c in (None, 1)}
  temps = {}
  for data in (2, 8):
    mesh = sh.make_mesh(ml_collections.ConfigDict({"shape": {"data": data, "fsdp": 1,
                                                             "tensor": 1}}),
                        devices=jax.devices("cpu")[:data])
    tokens = jax.random.randint(jax.random.key(1), (2 * data, 16), 0, 256)
    tokens = jax.device_put(tokens, NamedSharding(mesh, P(("data", "fsdp"))))
    logits = {}
    with sh.activation_rules(mesh, "data_parallel"):
      for c, (graphdef, state) in graphdefs.items():
        state = jax.device_put(state, NamedSharding(mesh, P()))
        forward = jax.jit(lambda s, t, g=graphdef: nnx.merge(g, s)(t))
        logits[c] = np.asarray(forward(state, tokens))
        if c == 1:
          compiled = forward.lower(state, tokens).compile()
          temps[data] = compiled.memory_analysis().temp_size_in_bytes
    np.testing.assert_allclose(logits[1], logits[None], rtol=1e-5, atol=1e-5)
  assert temps[8] < 1.5 * temps[2], temps
