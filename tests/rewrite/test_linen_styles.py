"""Linen models written as MaxText writes them (`linen_styles`): boxed params, ``nn.scan`` over
remat'ed blocks (stack axis 0 or 1), ``nn.vmap``. Quantization, convert and save/restore treat
a stacked layer as its layers: each result equals the same weights run as a Python loop."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax.core import meta

import jaxcomp as jc
from jaxcomp.rewrite.linen_quant import PackedParam
from linen_styles import DEPTH, V, LoopLM, ScanLM, VmapEnsemble, VisionNet, unstack_params

TOKENS = jax.random.randint(jax.random.key(1), (2, 5), 0, V)
SPECS = {"w8a8": jc.Quant(w_bits=8, a_bits=8), "w4g8": jc.Quant(w_bits=4, group=8),
         "lsq": jc.Quant(w_bits=4, group=8, learn_scale=True)}


def _recipe(spec):
  return jc.Recipe([jc.Rule(r".*norm", skip=True), jc.Rule(".*", quant=spec)])


def _close(a, b, tol=2e-6):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


@functools.cache
def _lms(axis):
  """(ScanLM with stack axis ``axis``, its variables, the LoopLM variables of the same weights)."""
  scan = ScanLM(scan_axis=axis)
  variables = scan.init(jax.random.key(0), TOKENS)
  loop_vars = unstack_params(variables, axis)
  _close(scan.apply(variables, TOKENS), LoopLM().apply(loop_vars, TOKENS))
  return scan, variables, loop_vars, axis


@pytest.fixture(scope="module", params=[0, 1], ids=["scan_axis0", "scan_axis1"])
def lms(request):
  return _lms(request.param)


def test_report_lists_a_stacked_layer_once_with_its_depth(lms):
  scan, variables, _, _ = lms
  rep = jc.report(scan, _recipe(SPECS["w4g8"]), variables=variables, args=(TOKENS,))
  assert sorted(rep.matched[".*"]) == ["embed", "head", "layers/heads", "layers/merge",
                                       "layers/up"]
  assert rep.matched[r".*norm"] == ["layers/norm"]  # boxed params are seen too
  assert rep.depth == {f"layers/{n}": DEPTH for n in ("up", "heads", "merge")}
  rep.check()


@pytest.mark.parametrize("axis,name", [(0, "w8a8"), (0, "w4g8"), (0, "lsq"), (1, "lsq")])
def test_quantize_and_convert_equal_the_loop(axis, name):
  scan, variables, loop_vars, axis = _lms(axis)
  before = jax.tree.map(np.array, variables)
  qscan, qvars = jc.quantize(scan, _recipe(SPECS[name]), variables=variables, args=(TOKENS,))
  qloop, qloop_vars = jc.quantize(LoopLM(), _recipe(SPECS[name]), variables=loop_vars,
                                  args=(TOKENS,))
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, variables))
  y = qscan.apply(qvars, TOKENS)
  _close(y, qloop.apply(qloop_vars, TOKENS))
  if SPECS[name].learn_scale:  # the steps gain the stack axis, named, per layer equal
    step = qvars["params"]["layers"]["heads"]["w_step"]
    assert step.names == (None, "heads", "kv")[:axis] + ("layers",) + (None, "heads", "kv")[axis:]
    _close(unstack_params(qvars, axis)["params"]["layers_2"]["heads"]["w_step"].value,
           qloop_vars["params"]["layers_2"]["heads"]["w_step"].value, 0)
    grads = jax.grad(lambda v: qscan.apply(v, TOKENS).sum())(qvars)
    assert float(jnp.abs(grads["params"]["layers"]["up"]["w_step"].value).min()) >= 0
  module, packed = jc.convert(qscan, variables=qvars, args=(TOKENS,))
  _close(module.apply(packed, TOKENS), y)
  box = packed["params"]["layers"]["up"]["kernel"]
  assert isinstance(box, PackedParam) and box.stack_axis == axis
  assert box.names == (("embed", "mlp")[:axis] + ("layers",) + ("embed", "mlp")[axis:])
  assert box.value.values.shape[axis] == DEPTH and box.value.scale.shape[axis] == DEPTH
  loop_box = jc.convert(qloop, variables=qloop_vars, args=(TOKENS,))[1]["params"]["layers_0"][
      "up"]["kernel"]  # unboxing dequantizes; a stacked box per layer
  _close(jnp.take(box.unbox(), 0, axis=axis), loop_box.unbox(), 0)


def test_logical_specs_of_quantized_init_and_packed_variables(lms):
  scan, variables, _, axis = lms
  qscan, qvars = jc.quantize(scan, _recipe(SPECS["lsq"]), variables=variables, args=(TOKENS,))
  abstract = jax.eval_shape(qscan.init, jax.random.key(0), TOKENS)  # the MaxText way
  specs = nn.get_partition_spec(abstract)["params"]
  layers = lambda *names: jax.sharding.PartitionSpec(*(names[:axis] + ("layers",) + names[axis:]))
  assert specs["layers"]["up"]["w_step"] == layers(None, "mlp")
  assert specs["layers"]["up"]["kernel"] == layers("embed", "mlp")
  assert specs["embed"]["w_step"] == jax.sharding.PartitionSpec("vocab", None)
  _, packed = jc.convert(qscan, variables=qvars, args=(TOKENS,))
  box = nn.get_partition_spec(packed)["params"]["layers"]["up"]["kernel"].value
  assert box.values == layers("mlp", "embed") and box.scale == layers("mlp", None)


def test_packed_scan_under_a_mesh_is_placed_by_its_logical_names():
  mesh = jax.make_mesh((2, 4), ("data", "model"), devices=jax.devices("cpu")[:8],
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = (("embed", "data"), ("mlp", "model"), ("vocab", None), ("layers", None),
           ("heads", None), ("kv", None))
  scan = ScanLM()
  variables = scan.init(jax.random.key(0), TOKENS)
  qscan, qvars = jc.quantize(scan, _recipe(SPECS["w4g8"]), variables=variables, args=(TOKENS,))
  module, packed = jc.convert(qscan, variables=qvars, args=(TOKENS,))
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(packed), mesh, rules)
  placed = jax.device_put(packed, shardings)
  values = placed["params"]["layers"]["up"]["kernel"].value.values
  assert values.sharding.spec == jax.sharding.PartitionSpec(None, "model", "data")
  with nn.logical_axis_rules(rules), mesh:  # (flax DenseGeneral fails under jax.set_mesh)
    y = jax.jit(module.apply)(placed, TOKENS)
  _close(y, module.apply(packed, TOKENS))


def test_packed_scan_saves_and_restores(lms, tmp_path):
  scan, variables, _, axis = lms
  qscan, qvars = jc.quantize(scan, _recipe(SPECS["w4g8"]), variables=variables, args=(TOKENS,))
  module, packed = jc.convert(qscan, variables=qvars, args=(TOKENS,))
  jc.save_packed(packed, tmp_path / "packed")
  like = jax.eval_shape(lambda: jc.convert(qscan, variables=qvars, args=(TOKENS,))[1])
  restored = jc.restore_packed(tmp_path / "packed", like)
  box = restored["params"]["layers"]["merge"]["kernel"]
  assert box.stack_axis == axis and box.names == packed["params"]["layers"]["merge"]["kernel"].names
  assert isinstance(restored["params"]["layers"]["norm"]["scale"], meta.Partitioned)
  _close(module.apply(restored, TOKENS), module.apply(packed, TOKENS), 0)


def test_vmap_stack_quantizes_and_converts_per_copy():
  model, x = VmapEnsemble(), jax.random.normal(jax.random.key(2), (3, 4, 16))
  variables = model.init(jax.random.key(0), x)
  recipe = jc.Recipe([jc.Rule(".*", quant=SPECS["lsq"])])
  qmodel, qvars = jc.quantize(model, recipe, variables=variables, args=(x,))
  kernel = variables["params"]["experts"]["kernel"]
  for i in range(3):  # each copy: the Dense quantized on its own
    dense = nn.Dense(8)
    one = {"params": {"kernel": kernel[i], "bias": variables["params"]["experts"]["bias"][i]}}
    qd, qd_vars = jc.quantize(dense, recipe, variables=one, args=(x[i],))
    _close(qvars["params"]["experts"]["w_step"][i], qd_vars["params"]["w_step"], 0)
    _close(qmodel.apply(qvars, x)[i], qd.apply(qd_vars, x[i]))
  module, packed = jc.convert(qmodel, variables=qvars, args=(x,))
  _close(module.apply(packed, x), qmodel.apply(qvars, x))


def test_vision_attention_and_conv():
  model, images = VisionNet(), jax.random.normal(jax.random.key(3), (2, 8, 8, 3))
  variables = model.init(jax.random.key(0), images)
  recipe = jc.Recipe([jc.Rule(".*", quant=SPECS["w8a8"])])
  rep = jc.report(model, recipe, variables=variables, args=(images,))
  assert sorted(rep.matched[".*"]) == ["attn/key", "attn/out", "attn/query", "attn/value",
                                       "classifier", "stem"]
  qmodel, qvars = jc.quantize(model, recipe, variables=variables, args=(images,))
  module, packed = jc.convert(qmodel, variables=qvars, args=(images,))
  _close(module.apply(packed, images), qmodel.apply(qvars, images), 1e-5)


def test_quantize_takes_abstract_example_inputs_and_variables():
  """``args`` may be `jax.ShapeDtypeStruct`s (the LSQ steps depend on the kernels only), and
  abstract variables give abstract quantized variables (for sharded initialisation)."""
  scan, variables, _, _ = _lms(0)
  sds = jax.ShapeDtypeStruct(TOKENS.shape, TOKENS.dtype)
  recipe = _recipe(SPECS["lsq"])
  _, from_abstract_args = jc.quantize(scan, recipe, variables=variables, args=(sds,))
  _, reference = jc.quantize(scan, recipe, variables=variables, args=(TOKENS,))
  jax.tree.map(np.testing.assert_array_equal, meta.unbox(from_abstract_args),
               meta.unbox(reference))
  _, abstract = jc.quantize(scan, recipe, variables=jax.eval_shape(lambda: variables),
                            args=(sds,))
  assert jax.tree.map(lambda x: (x.shape, x.dtype), meta.unbox(abstract)) == jax.tree.map(
      lambda x: (x.shape, x.dtype), meta.unbox(reference))
