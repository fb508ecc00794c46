"""One-shot transforms on Linen modules written as other codebases write them (`linen_styles`):
`jc.ptq`, `jc.prune` and `jc.factorize` through the same solvers as NNX, calibrated by
interception; a layer stacked by ``nn.scan`` / ``nn.vmap`` is solved layer by layer and gives
the results of the same weights run as a Python loop."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from flax.core import meta

import jaxcomp as jc
from jaxcomp.rewrite.linen_lowrank import LoRALinen, LowRankLinen
from jaxcomp.rewrite.linen_quant import QuantizedLinen
from linen_styles import DEPTH, V, LoopLM, ScanLM, VisionNet, VmapEnsemble, unstack_params

CALIB = jax.random.randint(jax.random.key(5), (8, 6), 0, V)
KW = dict(progress=False, return_report=True, calib_dtype=None, batch_size=4)


@functools.cache
def _lms(axis):
  scan = ScanLM(scan_axis=axis)
  variables = scan.init(jax.random.key(0), CALIB[:2])
  return scan, variables, unstack_params(variables, axis)


def _arrays(tree):
  return jax.tree.map(np.asarray, meta.unbox(tree))


CASES = [
    ("gptq_asym", jc.ptq, dict(quant=jc.Quant(w_bits=3, group=8, method="gptq",
                                              w_symmetric=False,
                                              options={"act_order": True})), 1),
    ("awq", jc.ptq, dict(quant=jc.Quant(w_bits=4, group=8, method="awq")), 1),
    ("smoothquant", jc.ptq, dict(quant=jc.Quant(w_bits=8, a_bits=8, method="smoothquant")), 1),
    ("wanda_axis0", jc.prune, dict(sparsity=jc.Sparsity(sparsity=0.5, method="wanda")), 0),
    ("sparsegpt_2:4", jc.prune, dict(sparsity=jc.Sparsity("2:4", method="sparsegpt")), 1),
    ("svd_llm", jc.factorize, dict(lowrank=jc.LowRank(rank=6, method="svd_llm")), 1),
]


@pytest.mark.parametrize("fn,payload,axis", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_calibrated_methods_solve_each_stacked_layer_as_the_loop(fn, payload, axis):
  """GPTQ, AWQ, SmoothQuant, Wanda, SparseGPT 2:4, SVD-LLM on ``nn.scan``-stacked (remat'ed,
  boxed) blocks: per-layer errors, weights and logits equal the unrolled model's; the input
  variables are untouched; a PTQ result packs to the same logits."""
  scan, variables, loop_vars = _lms(axis)
  before = _arrays(variables)
  pattern = r".*(up|heads)" if fn is not jc.factorize else r".*up"
  recipe = jc.Recipe([jc.Rule(pattern, **payload)])
  module, new, results = fn(scan, recipe, CALIB, variables=variables, strict=True, **KW)
  ref_module, ref, ref_results = fn(LoopLM(), recipe, CALIB, variables=loop_vars, **KW)
  names = ("up", "heads") if fn is not jc.factorize else ("up",)
  assert [r.path for r in results] == [f"layers[{i}]/{n}" for i in range(DEPTH) for n in names]
  assert [r.path for r in ref_results] == [f"layers_{i}/{n}" for i in range(DEPTH)
                                           for n in names]
  np.testing.assert_allclose([r.error for r in results], [r.error for r in ref_results],
                             rtol=1e-3, atol=1e-6)
  unstacked = unstack_params(new, axis)["params"]
  for i in range(DEPTH):
    for key, value in _arrays(ref["params"][f"layers_{i}"]).items():
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                   _arrays(unstacked[f"layers_{i}"][key]), value)
  logits = module.apply(new, CALIB)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_module.apply(ref, CALIB)),
                             rtol=1e-4, atol=1e-4)
  jax.tree.map(np.testing.assert_array_equal, before, _arrays(variables))
  if fn is jc.ptq:
    assert isinstance(module, QuantizedLinen)
    packed_module, packed = jc.convert(module, variables=new, args=(CALIB[:2],))
    np.testing.assert_allclose(np.asarray(packed_module.apply(packed, CALIB)),
                               np.asarray(logits), rtol=1e-4, atol=1e-4)
  if fn is jc.prune:
    kernel = meta.unbox(new["params"]["layers"]["up"]["kernel"])
    per_layer = jnp.moveaxis(kernel, axis, 0)
    np.testing.assert_allclose(np.mean(per_layer == 0, axis=(1, 2)), 0.5)
  if fn is jc.factorize:
    assert isinstance(module, LowRankLinen)
    up = new["params"]["layers"]["up"]
    assert "kernel" not in up
    assert up["lowrank_a"].names == (("embed", "layers", None) if axis == 1
                                     else ("layers", "embed", None))


def test_solved_params_are_boxed_and_stacked_like_their_kernel():
  """A solved step takes the kernel's box with the output names only, stacked at the scan
  axis; the MaxText way to get partition specs still works on the PTQ variables."""
  scan, variables, _ = _lms(1)
  recipe = jc.Recipe([jc.Rule(r".*up", quant=jc.Quant(w_bits=4, group=8, method="awq"))])
  _, new = jc.ptq(scan, recipe, CALIB, variables=variables, progress=False)
  up = new["params"]["layers"]["up"]
  assert up["w_step"].names == (None, "layers", "mlp")
  assert up["w_step"].value.shape == (2, DEPTH, 32)
  assert up["in_scale"].shape == (16, DEPTH)  # (K,) per layer, stacked at axis 1
  specs = nn.get_partition_spec(new)["params"]["layers"]["up"]
  assert specs["w_step"] == jax.sharding.PartitionSpec(None, "layers", "mlp")


def test_data_free_methods_on_a_stack_equal_the_loop():
  """RTN (every supported type, Embed and Einsum too), magnitude pruning and SVD need no
  calibration data: an example batch (args=) traces the model."""
  scan, variables, loop_vars = _lms(1)
  for fn, payload in [(jc.ptq, dict(quant=jc.Quant(w_bits=4, group=8))),
                      (jc.prune, dict(sparsity=jc.Sparsity(sparsity=0.5))),
                      (jc.factorize, dict(lowrank=jc.LowRank(rank=4)))]:
    pattern = r".*(up|heads|merge|embed|head)" if fn is not jc.factorize else r".*up"
    recipe = jc.Recipe([jc.Rule(pattern, **payload)])
    module, new = fn(scan, recipe, variables=variables, args=(CALIB[:2],), progress=False)
    ref_module, ref = fn(LoopLM(), recipe, variables=loop_vars, args=(CALIB[:2],),
                         progress=False)
    np.testing.assert_allclose(np.asarray(module.apply(new, CALIB)),
                               np.asarray(ref_module.apply(ref, CALIB)), rtol=1e-5, atol=1e-5)


def test_vmapped_layers_are_each_solved_on_their_own_inputs():
  """``nn.vmap`` over three Dense copies, each on its own input slice: GPTQ of the stack equals
  GPTQ of each copy alone."""
  x = jax.random.normal(jax.random.key(3), (3, 16, 6))
  ensemble = VmapEnsemble()
  variables = ensemble.init(jax.random.key(0), x)
  recipe = jc.Recipe([jc.Rule(".*", quant=jc.Quant(w_bits=3, method="gptq"))])
  _, new, results = jc.ptq(ensemble, recipe, x, **KW, variables=variables)
  assert [r.path for r in results] == ["experts[0]", "experts[1]", "experts[2]"]
  for i in range(3):
    one = {"params": {"Dense_0": jax.tree.map(lambda a: a[i], variables["params"]["experts"])}}

    class One(nn.Module):

      @nn.compact
      def __call__(self, x):
        return nn.Dense(8, name="Dense_0")(x)

    _, ref, ref_results = jc.ptq(One(), recipe, x[i][None], **KW, variables=one)
    np.testing.assert_allclose(results[i].error, ref_results[0].error, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(new["params"]["experts"]["kernel"][i]),
                               np.asarray(ref["params"]["Dense_0"]["kernel"]), atol=1e-6)


def test_vision_model_conv_and_attention():
  """Conv (its input patches) and MultiHeadDotProductAttention's DenseGeneral projections:
  GPTQ solves each and the result packs to the same outputs; 2:4 on the 27-wide Conv input
  is a one-line error before anything runs."""
  net = VisionNet()
  images = jax.random.normal(jax.random.key(2), (8, 8, 8, 3))
  variables = net.init(jax.random.key(0), images[:1])
  recipe = jc.Recipe([jc.Rule(".*", quant=jc.Quant(w_bits=4, method="gptq"))])
  module, new, results = jc.ptq(net, recipe, images, **KW, variables=variables)
  assert [r.path for r in results] == ["stem", "attn/query", "attn/key", "attn/value",
                                       "attn/out", "classifier"]
  assert all(0 < r.error < 0.05 for r in results)
  out = module.apply(new, images)
  packed_module, packed = jc.convert(module, variables=new, args=(images[:1],))
  np.testing.assert_allclose(np.asarray(packed_module.apply(packed, images)), np.asarray(out),
                             rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match=r"^stem: Sparsity.pattern '2:4' needs the input size 27 "
                     r"to be a multiple of M=4$"):
    jc.prune(net, jc.Recipe([jc.Rule(".*", sparsity=jc.Sparsity("2:4"))]),
             variables=variables, args=(images[:1],))


def test_blocks_group_unstacked_layers_and_bad_input_is_one_line():
  scan, variables, loop_vars = _lms(1)
  gptq = jc.Recipe([jc.Rule(r".*up", quant=jc.Quant(w_bits=4, method="gptq"))])
  with pytest.raises(ValueError, match=r"merge: calibrated methods support nn.Dense and "
                     r"nn.DenseGeneral.* not nn.Einsum; Quant.method='gptq'.*use 'rtn'"):
    jc.ptq(scan, jc.Recipe([jc.Rule(".*merge", quant=jc.Quant(w_bits=4, method="gptq"))]),
           CALIB, variables=variables, progress=False)
  with pytest.raises(ValueError, match=r"calib is missing; layers/up has Quant.method='gptq'"):
    jc.ptq(scan, gptq, variables=variables, args=(CALIB[:2],), progress=False)
  with pytest.raises(ValueError, match=r"needs variables="):
    jc.ptq(scan, gptq, CALIB, progress=False)
  with pytest.raises(ValueError, match=r"blocks='nothing' matches no module"):
    jc.ptq(LoopLM(), gptq, CALIB, variables=loop_vars, blocks="nothing", progress=False)
  qmodule, qvars = jc.ptq(scan, gptq, CALIB, variables=variables, progress=False)
  with pytest.raises(TypeError, match=r"give the float Linen module, not the QuantizedLinen"):
    jc.prune(qmodule, jc.Recipe([jc.Rule(".*", sparsity=jc.Sparsity(sparsity=0.5))]),
             CALIB, variables=qvars)
  with pytest.raises(TypeError, match="variables= and args= are for Linen modules"):
    jc.prune(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), gptq, variables=variables)
  # The blocks of the unrolled model, named by a regex: same results as the default grouping.
  _, a = jc.ptq(LoopLM(), gptq, CALIB, variables=loop_vars, progress=False, calib_dtype=None)
  _, b = jc.ptq(LoopLM(), gptq, CALIB, variables=loop_vars, progress=False, calib_dtype=None,
                blocks=r"layers_\d")
  jax.tree.map(np.testing.assert_array_equal, _arrays(a), _arrays(b))


@pytest.mark.parametrize("axis", [0, 1])
def test_lora_adapts_each_stacked_layer_and_merges_back(axis):
  """LoRA on an ``nn.scan`` stack: one adapter per layer, boxed and stacked like the kernel; a
  fresh adapter changes nothing; with trained-like adapters the stack equals the loop holding
  the same adapters, and merging folds them into the kernels."""
  scan, variables, _ = _lms(axis)
  module, lora = jc.add_lora(scan, r".*up", rank=4, rngs=nnx.Rngs(0), variables=variables,
                             args=(CALIB[:2],))
  up = lora["params"]["layers"]["up"]
  assert up["lora_a"].names == tuple(np.insert(np.array(["embed", None], object), axis,
                                               "layers"))
  np.testing.assert_array_equal(np.asarray(module.apply(lora, CALIB)),
                                np.asarray(scan.apply(variables, CALIB)))
  b = up["lora_b"]
  up["lora_b"] = b.replace(value=0.1 * jax.random.normal(jax.random.key(1), b.value.shape))
  out = module.apply(lora, CALIB)
  assert float(jnp.abs(out - scan.apply(variables, CALIB)).max()) > 1e-2
  loop_module = LoRALinen(base=LoopLM(), pattern=r".*up", rank=4, alpha=module.alpha)
  np.testing.assert_allclose(np.asarray(loop_module.apply(unstack_params(lora, axis), CALIB)),
                             np.asarray(out), rtol=1e-5, atol=1e-5)
  merged_module, merged = jc.merge_lora(module, variables=lora)
  assert merged_module is scan and "lora_a" not in merged["params"]["layers"]["up"]
  np.testing.assert_allclose(np.asarray(scan.apply(merged, CALIB)), np.asarray(out), rtol=1e-4,
                             atol=1e-4)


def test_qlora_on_a_quantized_linen_module_and_bridged_modules_get_one_line():
  x = jax.random.normal(jax.random.key(0), (4, 16))
  dense = nn.Dense(8)
  variables = dense.init(jax.random.key(1), x)
  qmodule, qvars = jc.quantize(dense, jc.Recipe([jc.Rule(".*", quant=jc.Quant(w_bits=4))]),
                               variables=variables, args=(x,))
  module, lora = jc.add_lora(qmodule, ".*", rank=2, alpha=4.0, rngs=nnx.Rngs(0),
                             variables=qvars, args=(x,))
  a = lora["params"]["lora_a"]
  b = 0.1 * jnp.ones_like(lora["params"]["lora_b"])
  lora["params"]["lora_b"] = b
  np.testing.assert_allclose(np.asarray(module.apply(lora, x)),
                             np.asarray(qmodule.apply(qvars, x) + 2.0 * (x @ a) @ b), rtol=1e-5,
                             atol=1e-5)  # the adapter counted once, beside the quantized dot
  bridged = nnx.bridge.ToNNX(nn.Dense(4), rngs=nnx.Rngs(0))
  nnx.bridge.lazy_init(bridged, x)
  for call in (lambda: jc.quantize(bridged, jc.Recipe([jc.Rule(".*", quant=jc.Quant())])),
               lambda: jc.add_lora(bridged, ".*", rank=2, rngs=nnx.Rngs(0))):
    with pytest.raises(ValueError, match=r"^the model is a bridged Linen module \(nnx.bridge"
                       r".ToNNX\).*give the Linen module itself with variables= and args=$"):
      call()
