"""`jc.ptq` over NNX models: sequential calibration, solvers, conversion, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental import io_callback

import jaxcomp as jc
from jaxcomp.layers.quant import QuantDot, SmoothScale
from jaxcomp.models.llama import Llama, LlamaConfig, scan_layers
from jaxcomp.oneshot.calibrate import catch_inputs, find_blocks

PROJ = r"layers/\d+/(attn|mlp)/\w+_proj"


@pytest.fixture(scope="module")
def setup():
  model = Llama(LlamaConfig.tiny(n_layers=2), rngs=nnx.Rngs(0))
  calib = jax.random.randint(jax.random.key(1), (16, 32), 0, 256)
  tokens = jax.random.randint(jax.random.key(2), (2, 32), 0, 256)
  return model, calib, tokens


def _rel(a, b):
  return float(jnp.sum((a - b) ** 2) / jnp.sum(b ** 2))


def _ptq(model, calib, spec, **kw):
  q, results = jc.ptq(model, jc.Recipe([jc.Rule(PROJ, quant=spec)]), calib, batch_size=8,
             progress=False, return_report=True, **kw)
  return q, results


def test_gptq_beats_rtn_on_the_model_output(setup):
  model, calib, tokens = setup
  ref = model(tokens)
  rtn, _ = _ptq(model, calib, jc.Quant(w_bits=3))
  gptq, results = _ptq(model, calib, jc.Quant(w_bits=3, method="gptq"))
  assert len(results) == 14 and all(r.method == "gptq" for r in results)
  e_rtn, e_gptq = _rel(rtn(tokens), ref), _rel(gptq(tokens), ref)
  assert e_gptq < 0.85 * e_rtn, (e_gptq, e_rtn)


def test_input_model_untouched(setup):
  model, calib, _ = setup
  before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  graph_before = nnx.graphdef(model)
  _ptq(model, calib, jc.Quant(w_bits=4, group=32, method="awq"))
  after = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  jax.tree.map(np.testing.assert_array_equal, before, after)
  assert nnx.graphdef(model) == graph_before


@pytest.mark.parametrize("spec", [
    jc.Quant(w_bits=4, method="gptq", options={"act_order": True}),
    jc.Quant(w_bits=4, group=32, method="gptq"),
    jc.Quant(w_bits=4, group=32, method="awq"),
    jc.Quant(w_bits=8, a_bits=8, method="smoothquant"),
    jc.Quant(w_bits=4, group=16),
], ids=lambda s: f"{s.method}-w{s.w_bits}-g{s.group}-a{s.a_bits}")
def test_solved_layers_and_converted_logits_equal_fake_quant(setup, spec):
  model, calib, tokens = setup
  q, results = _ptq(model, calib, spec)
  hook = q.layers[1].mlp.down_proj.dot_general
  assert isinstance(hook, QuantDot) and hook.spec == spec
  if spec.method in ("gptq", "awq"):
    assert hook.w_step is not None
    w = q.layers[1].mlp.down_proj.kernel[...]
    step = hook.w_step[...]
    s_full = jnp.repeat(step, w.shape[0] // step.shape[0], axis=0)
    np.testing.assert_allclose(w / s_full, jnp.round(w / s_full), atol=1e-3)  # on the grid
  assert isinstance(hook.in_scale, SmoothScale) == (spec.method in ("awq", "smoothquant"))
  if spec.method != "rtn":
    assert all(np.isfinite(r.error) and r.error < 0.2 for r in results)
  packed = jc.convert(q)
  np.testing.assert_array_equal(np.asarray(packed(tokens)), np.asarray(q(tokens)))


def test_smoothquant_w8a8_stays_close_to_float(setup):
  model, calib, tokens = setup
  q, _ = _ptq(model, calib, jc.Quant(w_bits=8, a_bits=8, method="smoothquant"))
  assert _rel(q(tokens), model(tokens)) < 1e-3


def test_calibration_matmuls_in_float32_give_the_same_solution_closely(setup):
  model, calib, tokens = setup
  spec = jc.Quant(w_bits=4, method="gptq")
  a, _ = _ptq(model, calib, spec)
  b, _ = _ptq(model, calib, spec, calib_dtype=None)
  assert _rel(a(tokens), b(tokens)) < 1e-3


def test_catch_inputs_records_the_first_block_arguments(setup):
  model, calib, _ = setup
  inputs = catch_inputs(model, "layers/0", [calib[:4], calib[4:8]], lambda m, b: m(b))
  assert len(inputs) == 2
  (h, positions), kwargs = inputs[0]
  np.testing.assert_allclose(h, model.embed(calib[:4]), rtol=1e-6)
  assert positions.shape == (4, 32) and kwargs == {}
  assert type(model.layers[0]).__name__ == "Block"  # restored


def test_catching_a_scanned_stack_leaves_the_process_clean(setup):
  """The stand-in stops the compiled scan from a host callback: the first layer's inputs are
  recorded (eager and jitted model), and later ordered effects still run."""
  model, calib, _ = setup
  scanned = scan_layers(model)
  for call in (lambda m, b: m(b), nnx.jit(lambda m, b: m(b))):
    inputs = catch_inputs(scanned, "layers", [calib[:4]], call, stacked=True)
    (h, positions), _ = inputs[0]
    np.testing.assert_allclose(h, model.embed(calib[:4]), rtol=1e-6)
    assert positions.shape == (4, 32)
  jax.effects_barrier()  # the stopped programs' runtime tokens do not re-raise the stop
  seen = []
  jax.jit(lambda x: io_callback(lambda v: seen.append(v) or v, x, x, ordered=True))(jnp.ones(2))
  jax.effects_barrier()
  assert len(seen) == 1


def test_find_blocks_orders_naturally():
  model = Llama(LlamaConfig.tiny(n_layers=12, dim=16, n_heads=2, n_kv_heads=1, ffn_dim=16,
                                 vocab_size=32), rngs=nnx.Rngs(0))
  layers = [f"layers/{i}/attn/q_proj" for i in range(12)]
  assert find_blocks(model, layers) == [f"layers/{i}" for i in range(12)]
  assert find_blocks(model, layers, r"layers/1\d") == ["layers/10", "layers/11"]


def test_layers_outside_blocks_are_solved_from_a_full_pass():
  model = Llama(LlamaConfig.tiny(n_layers=1), rngs=nnx.Rngs(0))  # untied: has lm_head
  calib = jax.random.randint(jax.random.key(3), (8, 16), 0, 256)
  q, results = jc.ptq(model, jc.Recipe([jc.Rule("lm_head", quant=jc.Quant(w_bits=4, method="gptq"))]),
             calib, progress=False, return_report=True)
  assert [r.path for r in results] == ["lm_head"]
  assert q.lm_head.dot_general.w_step is not None


def test_bad_input():
  model = Llama(LlamaConfig.tiny(n_layers=1, tie_embeddings=True), rngs=nnx.Rngs(0))
  calib = jnp.zeros((4, 8), jnp.int32)
  gptq = jc.Quant(w_bits=4, method="gptq")
  with pytest.raises(ValueError, match="embed: calibrated methods support nnx.Linear.*Quant.method='gptq' cannot solve it"):
    jc.ptq(model, jc.Recipe([jc.Rule("embed", quant=gptq)]), calib, progress=False)
  with pytest.raises(ValueError, match="use jc.ptq"):
    jc.quantize(model, jc.Recipe([jc.Rule(PROJ, quant=gptq)]))
  with pytest.raises(ValueError, match="calib must hold at least one example"):
    jc.ptq(model, jc.Recipe([jc.Rule(PROJ, quant=gptq)]), calib[:0], progress=False)
  with pytest.raises(ValueError, match="matches no module"):
    jc.ptq(model, jc.Recipe([jc.Rule(PROJ, quant=gptq)]), calib, blocks="nope", progress=False)
  with pytest.raises(jc.SpecError, match="w_symmetric=True"):
    jc.Quant(w_bits=4, group=32, method="awq", w_symmetric=False)
  # RTN only: no calibration data is needed at all.
  q = jc.ptq(model, jc.Recipe([jc.Rule(PROJ, quant=jc.Quant(w_bits=4))]), None, progress=False)
  assert isinstance(q.layers[0].attn.q_proj.dot_general, QuantDot)


@pytest.mark.parametrize("spec", [jc.Quant(w_bits=3, group=32, method="gptq", w_symmetric=False),
                                  jc.Quant(w_bits=4, method="gptq", w_symmetric=False),
                                  jc.Quant(w_bits=4, group=32, method="gptq", full_range=True)],
                         ids=str)
def test_asymmetric_and_full_grid_gptq_pack_and_serve_the_same_logits(spec):
  """Asymmetric GPTQ (min-max grid with zero points) and the full signed grid: the solved grid
  goes through convert (zero points stored in the QArray) and the packed dot unchanged."""
  model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
  calib = jax.random.randint(jax.random.key(3), (8, 32), 0, 256)
  q, results = jc.ptq(model, jc.Recipe([jc.Rule(PROJ, quant=spec)]), calib, progress=False,
                      return_report=True)
  assert len(results) == 14 and all(np.isfinite(r.error) for r in results)
  hook = q.layers[0].mlp.up_proj.dot_general
  assert (hook.w_zero is not None) == (not spec.w_symmetric)
  packed = jc.convert(q)
  qa = packed.layers[0].mlp.up_proj.kernel[...]
  assert (qa.zero_point is not None) == (not spec.w_symmetric)
  tokens = calib[:2]
  np.testing.assert_allclose(np.asarray(packed(tokens)), np.asarray(q(tokens)), rtol=1e-5,
                             atol=1e-5)


def test_stack_walk_host_memory_plumbing():
  """The stack walk's host-memory measures: a layer of a committed or uncommitted CPU stack
  is its host row (no copy, alive after the stack is dropped, as committed as the stack); a
  restack buffer is page-aligned and becomes its jax array without a copy; the cache a
  stacked catch clears exists in this jax (`calibrate._drop_eager_executables`)."""
  import gc  # pylint: disable=import-outside-toplevel
  from jax._src import dispatch  # pylint: disable=import-outside-toplevel
  from jaxcomp.oneshot import pipeline  # pylint: disable=import-outside-toplevel
  assert callable(getattr(dispatch.xla_primitive_callable, "cache_clear", None))
  x = jax.device_put(jnp.arange(4 * 64 * 32, dtype=jnp.float32).reshape(4, 64, 32),
                     jax.devices()[0])
  row = pipeline._take(x, 2)
  assert row.unsafe_buffer_pointer() == x.unsafe_buffer_pointer() + 2 * 64 * 32 * 4
  expected = np.asarray(x)[2].copy()
  del x
  gc.collect()
  np.testing.assert_array_equal(np.asarray(row), expected)
  odd = jax.device_put(jnp.ones((3, 5, 7), jnp.bfloat16), jax.devices()[0])  # copied
  np.testing.assert_array_equal(np.asarray(pipeline._take(odd, 1)), np.ones((5, 7)))
  loose = jnp.asarray(np.arange(4 * 64 * 32, dtype=np.float32).reshape(4, 64, 32))
  row = pipeline._take(loose, 1)
  assert not loose.committed and not row.committed
  assert row.unsafe_buffer_pointer() == loose.unsafe_buffer_pointer() + 64 * 32 * 4
  buf = pipeline.host_buffer((3, 64, 32), np.float32)
  assert buf.ctypes.data % 4096 == 0
  buf[:] = 2.0
  stacked = pipeline._to_device(buf, jax.devices()[0])
  assert stacked.unsafe_buffer_pointer() == buf.ctypes.data
  del buf
  gc.collect()
  assert float(stacked.sum()) == 2.0 * 3 * 64 * 32


@pytest.mark.parametrize("spec", [
    jc.Quant(w_bits=4, group=32, method="gptq"),
    jc.Quant(w_bits=4, method="gptq", w_symmetric=False),
    jc.Quant(w_bits=4, group=32, method="awq"),
    jc.Quant(w_bits=8, a_bits=8, method="smoothquant"),
    jc.Quant(w_bits=4, group=32),
], ids=["gptq_g32", "gptq_asym", "awq", "smoothquant", "rtn"])
def test_ptq_skeleton_has_the_structure_ptq_gives(spec):
  from jaxcomp.oneshot import ptq_skeleton  # pylint: disable=import-outside-toplevel
  model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
  recipe = jc.Recipe([jc.Rule(r".*(q|k|v|o|gate|up|down)_proj", quant=spec)])
  calib = np.random.default_rng(0).integers(0, 256, (4, 16)).astype(np.int32)
  real = jc.ptq(model, recipe, calib, progress=False)
  like = nnx.eval_shape(lambda m: ptq_skeleton(m, recipe), model)
  shapes = lambda m: jax.tree.map(lambda a: (a.shape, a.dtype), nnx.state(m))
  assert nnx.graphdef(like) == nnx.graphdef(real)
  assert shapes(like) == shapes(real)


def test_gptq_float_acts_solves_the_weight_only_kernels(setup):
  """With ``float_acts`` every layer of a W4A8 GPTQ is solved from the weight-only model's
  inputs: the kernels and steps equal the weight-only solve's, and only the activations are
  quantized on top; without it later layers see quantized activations and land elsewhere."""
  model, calib, tokens = setup
  g = dict(w_bits=4, group=32, method="gptq")
  wo, _ = _ptq(model, calib, jc.Quant(**g))
  fa, _ = _ptq(model, calib, jc.Quant(**g, a_bits=8, options={"float_acts": True}))
  qa, _ = _ptq(model, calib, jc.Quant(**g, a_bits=8))
  params = lambda m: jax.tree.map(np.asarray, nnx.state(m, nnx.Param))
  jax.tree.map(np.testing.assert_array_equal, params(wo), params(fa))
  steps = lambda m: [np.asarray(h.w_step[...]) for _, h in nnx.iter_graph(m)
                     if isinstance(h, QuantDot)]
  for a, b in zip(steps(wo), steps(fa)):
    np.testing.assert_array_equal(a, b)
  assert all(h.spec.a_bits == 8 for _, h in nnx.iter_graph(fa) if isinstance(h, QuantDot))
  k = lambda m: np.asarray(m.layers[1].mlp.down_proj.kernel[...])
  assert not np.array_equal(k(qa), k(fa))  # the default calibrates on quantized activations
  assert not np.allclose(np.asarray(fa(tokens)), np.asarray(wo(tokens)))  # activations quantized


def test_gptq_float_acts_is_a_bool_option():
  with pytest.raises(jc.SpecError, match="float_acts"):
    jc.Quant(w_bits=4, a_bits=8, method="gptq", options={"float_acts": "yes"})
