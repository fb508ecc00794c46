"""Sharding survives every transform: on the fake 8-device mesh with FSDP-style logical rules,
the outputs of ptq / convert / factorize / LoRA keep their logical names and are placed by
them (NNX), or keep their boxes so the MaxText way of placing variables works (Linen)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

import jaxcomp as jc
from jaxcomp.serve import packed_named_sharding
from linen_styles import V, ScanLM

P = jax.sharding.PartitionSpec
RULES = (("embed", "fsdp"), ("mlp", "tensor"), ("vocab", None), ("layers", None),
         ("heads", None), ("kv", None))
GPTQ = jc.Quant(w_bits=4, group=8, method="gptq")


def _mesh():
  return jax.make_mesh((2, 4), ("fsdp", "tensor"), devices=jax.devices("cpu")[:8],
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


class MLP(nnx.Module):

  def __init__(self, rngs):
    init = nnx.initializers.lecun_normal()
    self.up = nnx.Linear(16, 32, kernel_init=nnx.with_partitioning(init, ("embed", "mlp")),
                         rngs=rngs)
    self.down = nnx.Linear(32, 16, kernel_init=nnx.with_partitioning(init, ("mlp", "embed")),
                           rngs=rngs)

  def __call__(self, x):
    return self.down(jax.nn.relu(self.up(x)))


def _spec(x):
  return x.sharding.spec


def test_nnx_outputs_keep_their_names_and_placement():
  x = jax.random.normal(jax.random.key(0), (16, 16))
  mesh = _mesh()
  with jax.set_mesh(mesh), nnx.logical_axis_rules(RULES):
    model = MLP(nnx.Rngs(0))
    assert _spec(model.up.kernel[...]) == P("fsdp", "tensor")
    q = jc.ptq(model, jc.Recipe([jc.Rule(".*", quant=GPTQ)]), x, progress=False)
    assert _spec(q.up.kernel[...]) == P("fsdp", "tensor")
    assert _spec(q.up.dot_general.w_step[...]) == P(None, "tensor")
    packed = jc.convert(q)
    qa = packed.up.kernel[...]
    assert packed.up.kernel.get_metadata()["kernel_sharding"] == ("embed", "mlp")
    assert (_spec(qa.values), _spec(qa.scale)) == (P("tensor", "fsdp"), P("tensor", None))
    np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, x: m(x))(packed, x)),
                               np.asarray(q(x)), rtol=1e-5, atol=1e-5)
    # The state of the packed model placed again from its names (e.g. after a replicated
    # restore), and an abstract skeleton under the mesh (nnx.eval_shape) to restore into.
    graphdef, state = nnx.split(packed)
    replicated = jax.device_put(state, jax.sharding.NamedSharding(mesh, P()))
    placed = jax.device_put(replicated, packed_named_sharding(replicated, mesh))
    assert _spec(placed["down"]["kernel"].get_value().values) == P("fsdp", "tensor")
    like = nnx.eval_shape(lambda: jc.packed_skeleton(MLP(nnx.Rngs(0)),
                                                     jc.Recipe([jc.Rule(".*", quant=GPTQ)])))
    assert isinstance(like.up.kernel[...], jc.QArray)
    factored = jc.factorize(model, jc.Recipe([jc.Rule(".*", lowrank=jc.LowRank(rank=4))]),
                            progress=False)
    assert (_spec(factored.up.a[...]), _spec(factored.up.b[...])) == (P("fsdp", None),
                                                                        P(None, "tensor"))
    lora = jc.add_lora(model, ".*", rank=4, rngs=nnx.Rngs(1))
    assert (_spec(lora.down.lora_a[...]), _spec(lora.down.lora_b[...])) == (P("tensor", None),
                                                                             P(None, "fsdp"))


def test_nnx_stack_solved_layer_by_layer_keeps_its_placement():
  """GPTQ on an `nnx.vmap` stack under the mesh: each layer solved alone, the rebuilt stack
  placed by the layers' names with the stack axis unsharded."""
  x = jax.random.normal(jax.random.key(0), (16, 16))
  with jax.set_mesh(_mesh()), nnx.logical_axis_rules(RULES):
    model = Stacked(nnx.Rngs(0))
    assert _spec(model.blocks.up.kernel[...]) == P(None, "fsdp", "tensor")
    q = jc.ptq(model, jc.Recipe([jc.Rule(".*", quant=GPTQ)]), x, progress=False)
    up = q.blocks.up
    assert _spec(up.kernel[...]) == P(None, "fsdp", "tensor")
    assert _spec(up.dot_general.w_step[...]) == P(None, None, "tensor")
    assert up.kernel.get_metadata()["out_sharding"] == ("layers", "embed", "mlp")
    np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, x: m(x))(q, x)), np.asarray(q(x)),
                               rtol=1e-5, atol=1e-5)  # the placed stack runs jitted on the mesh


class Stacked(nnx.Module):
  """Two `MLP` blocks built by `nnx.vmap` (stack axis named "layers"), run by `nnx.scan`."""

  def __init__(self, rngs):
    @nnx.split_rngs(splits=2)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs):
      return MLP(rngs)

    self.blocks = make(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def forward(h, block):
      return block(h)

    return forward(x, self.blocks)


def test_linen_outputs_keep_their_boxes_and_place_on_the_mesh():
  """PTQ steps, factors and LoRA adapters of a boxed, scanned Linen LM: their partition specs
  come from `nn.get_partition_spec`, and the placed variables run jitted on the mesh."""
  tokens = jax.random.randint(jax.random.key(1), (8, 6), 0, V)
  scan = ScanLM(scan_axis=1)
  variables = scan.init(jax.random.key(0), tokens[:2])
  outs = {
      "ptq": jc.ptq(scan, jc.Recipe([jc.Rule(r".*up", quant=GPTQ)]), tokens,
                    variables=variables, progress=False),
      "factorize": jc.factorize(scan, jc.Recipe([jc.Rule(r".*up", lowrank=jc.LowRank(rank=4))]),
                                variables=variables, args=(tokens[:2],), progress=False),
      "lora": jc.add_lora(scan, r".*up", rank=4, rngs=nnx.Rngs(0), variables=variables,
                          args=(tokens[:2],)),
  }
  expect = {"ptq": {"w_step": P(None, None, "tensor")},
            "factorize": {"lowrank_a": P("fsdp", None, None),
                          "lowrank_b": P(None, None, "tensor")},
            "lora": {"lora_a": P("fsdp", None, None), "lora_b": P(None, None, "tensor")}}
  mesh = _mesh()
  for name, (module, new) in outs.items():
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(new), mesh, RULES)
    placed = jax.device_put(meta_unbox(new), meta_unbox(shardings))
    up = placed["params"]["layers"]["up"]
    for param, spec in expect[name].items():
      assert _spec(up[param]) == spec, (name, param)
    with mesh, nn.logical_axis_rules(RULES):
      out = jax.jit(lambda v: module.apply(v, tokens))(jax.tree.map(
          lambda box, value: box.replace_boxed(value) if isinstance(box, nn.meta.AxisMetadata)
          else value, new, placed, is_leaf=lambda b: isinstance(b, nn.meta.AxisMetadata)))
    np.testing.assert_allclose(np.asarray(out), np.asarray(module.apply(new, tokens)),
                               rtol=1e-5, atol=1e-5)


def meta_unbox(tree):
  return nn.meta.unbox(tree)
