"""The quantized dot_general: integer path exactness, equivalence to fake quant, gradients, HLO."""

import re

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcomp as jc
from jaxcomp.quant import core
from jaxcomp.quant import dot as qdot

DN = (((2,), (0,)), ((), ()))  # (B, T, K) x (K, N)


def _data(k=64, n=48, key=0):
  kx, kw = jax.random.split(jax.random.key(key))
  return jax.random.normal(kx, (2, 8, k)), jax.random.normal(kw, (k, n)) * 0.1


def test_int_dot_is_bit_exact_int32():
  """The integer accumulator equals numpy's int64 matmul of the same int8 grids exactly."""
  rng = np.random.default_rng(0)
  u_x = rng.integers(-127, 128, (1, 33, 700)).astype(np.float32)
  u_w = rng.integers(-127, 128, (1, 700, 21)).astype(np.float32)
  ones_x, ones_w = jnp.ones((1, 33, 1)), jnp.ones((1, 1, 21))
  out = qdot.int_dot(jnp.asarray(u_x), ones_x, jnp.asarray(u_w), ones_w, None)
  ref = u_x[0].astype(np.int64) @ u_w[0].astype(np.int64)
  np.testing.assert_array_equal(np.asarray(out[0]).astype(np.int64), ref)
  acc = qdot._idot(jnp.asarray(u_x), jnp.asarray(u_w), "xla")  # pylint: disable=protected-access
  assert acc.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(acc[0]), ref)


def _fake_quant_reference(x, w, spec):
  """y = fq(x) @ fq(w) written with plain core functions (per-token x, per-channel/group w)."""
  if spec.granularity == "group":
    k, n = w.shape
    wg = w.reshape(k // spec.group, spec.group, n)
    w_hat = core.fake_quant(wg, spec.w_bits, axes=1).reshape(k, n)
  else:
    w_hat = core.fake_quant(w, spec.w_bits, axes=0 if spec.granularity == "channel" else None)
  x_hat = x if spec.a_bits is None else core.fake_quant(x, spec.a_bits, axes=-1)
  return jnp.einsum("btk,kn->btn", x_hat, w_hat)


@pytest.mark.parametrize("spec", [
    jc.Quant(w_bits=8, a_bits=8),
    jc.Quant(w_bits=4, a_bits=8),
    jc.Quant(w_bits=4, a_bits=8, group=16),
    jc.Quant(w_bits=4),
    jc.Quant(w_bits=3, group=16),
    jc.Quant(w_bits=8, a_bits=8, granularity="tensor"),
], ids=str)
def test_forward_equals_fake_quant_reference(spec):
  x, w = _data()
  y = qdot.quant_dot_general(x, w, DN, spec)
  ref = _fake_quant_reference(x, w, spec)
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", [jc.Quant(w_bits=8, a_bits=8), jc.Quant(w_bits=4, group=16),
                                  jc.Quant(w_bits=4, a_bits=8, group=16)], ids=str)
@pytest.mark.parametrize("k,n", [(64, 48), (48, 64)])  # both weight-gradient layouts
def test_gradients_are_the_ste_of_the_reference(spec, k, n):
  """The custom VJPs (int8 and CPU float paths) equal autodiff through the fake-quant reference."""
  x, w = _data(k=k, n=n)
  up = jax.random.normal(jax.random.key(5), (2, 8, n))
  f = lambda x, w: jnp.sum(qdot.quant_dot_general(x, w, DN, spec) * up)
  g = lambda x, w: jnp.sum(_fake_quant_reference(x, w, spec) * up)
  for a, b in zip(jax.grad(f, (0, 1))(x, w), jax.grad(g, (0, 1))(x, w)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("k,n", [(256, 128), (128, 256)])  # both weight-gradient layouts
def test_int8_backward_close_to_float_backward(k, n):
  x, w = _data(k=k, n=n)
  up = jax.random.normal(jax.random.key(5), (2, 8, n))
  grads = {}
  for g_bits in (None, 8):
    spec = jc.Quant(w_bits=8, a_bits=8, g_bits=g_bits)
    f = lambda x, w: jnp.sum(qdot.quant_dot_general(x, w, DN, spec) * up)
    grads[g_bits] = jax.grad(f, (0, 1))(x, w)
  for a, b in zip(grads[None], grads[8]):
    rel = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a))
    assert rel < 0.02, rel


@pytest.mark.parametrize("k,n", [(256, 128), (128, 256)])  # both weight-gradient layouts
def test_int8_weight_gradient_layouts_for_tpu_give_the_same_numbers(k, n):
  """The weight-gradient dot as traced for TPU (XLA picks the transposes) computes the same
  int32 sums as the CPU layout (a materialized transpose of the smaller operand)."""
  import pallas_kernels  # pylint: disable=import-outside-toplevel
  x, w = _data(k=k, n=n)
  up = jax.random.normal(jax.random.key(5), (2, 8, n))
  spec = jc.Quant(w_bits=8, a_bits=8, g_bits=8)
  grad = lambda: jax.jit(jax.grad(
      lambda x, w: jnp.sum(qdot.quant_dot_general(x, w, DN, spec, backend="xla") * up),
      (0, 1)))
  on_cpu = grad()(x, w)
  with pallas_kernels.compiling_for("tpu", "v5e"):
    traced = grad().lower(x, w)  # traced for TPU, compiled and run here
  for a, b in zip(on_cpu, traced.compile()(x, w)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _int_dots(hlo: str) -> list[str]:
  return [l for l in hlo.splitlines() if "dot_general" in l and re.search(r"xi8>.*xi8>.*xi32>", l)]


def test_hlo_runs_int8_dots_forward_and_backward():
  x, w = _data()
  fwd = jax.jit(lambda x, w: qdot.quant_dot_general(x, w, DN, jc.Quant(w_bits=8, a_bits=8)))
  assert len(_int_dots(fwd.lower(x, w).as_text())) == 1
  for g_bits, n_int in ((None, 1), (8, 3)):
    spec = jc.Quant(w_bits=8, a_bits=8, g_bits=g_bits)
    step = jax.jit(jax.value_and_grad(lambda x, w: qdot.quant_dot_general(x, w, DN, spec).sum(),
                                      (0, 1)))
    assert len(_int_dots(step.lower(x, w).as_text())) == n_int


@pytest.mark.parametrize("eq,dims,lhs_shape,rhs_shape", [
    ("bthk,hkd->btd", (((2, 3), (0, 1)), ((), ())), (2, 5, 4, 8), (4, 8, 16)),
    ("bsd,dhk->bshk", (((2,), (0,)), ((), ())), (2, 5, 32), (32, 4, 8)),
    ("ebd,edf->ebf", (((2,), (1,)), ((0,), (0,))), (3, 5, 16), (3, 16, 8)),  # batched (experts)
])
def test_general_dimension_numbers(eq, dims, lhs_shape, rhs_shape):
  """Any dot_general layout: equals the einsum of explicitly fake-quantized operands."""
  kx, kw = jax.random.split(jax.random.key(3))
  x, w = jax.random.normal(kx, lhs_shape), jax.random.normal(kw, rhs_shape)
  spec = jc.Quant(w_bits=8, a_bits=8)
  y = qdot.quant_dot_general(x, w, dims, spec)
  (lc, rc), (lb, rb) = dims
  w_hat = core.fake_quant(w, 8, axes=rc)
  x_hat = core.fake_quant(x, 8, axes=lc)
  np.testing.assert_allclose(np.asarray(y), np.asarray(jnp.einsum(eq, x_hat, w_hat)),
                             rtol=1e-5, atol=1e-4)


def test_lsq_step_gets_gradient_and_shapes():
  x, w = _data()
  spec = jc.Quant(w_bits=4, a_bits=8, learn_scale=True, group=16)
  shape = qdot.weight_scale_shape(w.shape, (0,), spec)
  assert shape == (4, 48)
  step = jnp.full(shape, 0.05)
  g = jax.grad(lambda s: qdot.quant_dot_general(x, w, DN, spec, w_step=s).sum())(step)
  assert g.shape == shape and float(jnp.abs(g).sum()) > 0


def test_weight_scale_shape():
  assert qdot.weight_scale_shape((64, 32), (0,), jc.Quant()) == (1, 32)
  assert qdot.weight_scale_shape((64, 32), (0,), jc.Quant(granularity="tensor")) == (1, 1)
  # Groups run along the flattened contracting axis K = 3 * 3 * 16, held by the last one.
  assert qdot.weight_scale_shape((3, 3, 16, 8), (0, 1, 2), jc.Quant(group=8)) == (1, 1, 18, 8)
  assert qdot.weight_scale_shape((4, 64, 256), (0, 1), jc.Quant(group=128)) == (1, 2, 256)


def test_bad_inputs():
  x, w = _data()
  with pytest.raises(jc.SpecError, match="group=24 does not divide the contraction axis of size 64"):
    qdot.weight_scale_shape(w.shape, (0,), jc.Quant(group=24, calibration="mse"))
  assert qdot.weight_scale_shape(w.shape, (0,), jc.Quant(group=24)) == (3, w.shape[1])
  with pytest.raises(jc.SpecError, match="group=24"):
    qdot.quant_dot_general(x, w, DN, jc.Quant(w_bits=4, group=24, calibration="mse"))


@pytest.mark.parametrize("spec", [jc.Quant(w_bits=4, group=24), jc.Quant(w_bits=8, a_bits=8, group=24)],
                         ids=str)
def test_shorter_last_group(spec):
  """K = 64 in groups of 24, 24, 16: each group scaled by its own absmax."""
  x, w = _data()
  qmax = 2 ** (spec.w_bits - 1) - 1
  parts = []
  for block in (w[0:24], w[24:48], w[48:64]):
    step = jnp.max(jnp.abs(block), axis=0) / qmax
    parts.append(jnp.round(block / step) * step)
  w_hat = jnp.concatenate(parts)
  np.testing.assert_allclose(qdot.fake_quant_weight(w, (0,), spec), w_hat, rtol=1e-6, atol=1e-7)
  if spec.a_bits is None:
    np.testing.assert_allclose(qdot.quant_dot_general(x, w, DN, spec), x @ w_hat, rtol=1e-5,
                               atol=1e-5)
  else:  # per group int dots, summed: equal to the float product of the fake-quant operands
    xq = core.fake_quant(x, 8, axes=-1)
    np.testing.assert_allclose(qdot.quant_dot_general(x, w, DN, spec), xq @ w_hat, rtol=1e-4,
                               atol=1e-4)
  with pytest.raises(ValueError, match="contracting dims differ"):
    qdot.quant_dot_general(x, w[:10], DN, jc.Quant())


def test_conv_fake_quant():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  k = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
  dn = ("NHWC", "HWIO", "NHWC")
  spec = jc.Quant(w_bits=4, a_bits=8)
  y = qdot.quant_conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=dn, spec=spec)
  k_hat = core.fake_quant(k, 4, axes=(0, 1, 2))
  x_hat = core.fake_quant(x, 8, axes=(1, 2, 3))
  ref = jax.lax.conv_general_dilated(x_hat, k_hat, (1, 1), "SAME", dimension_numbers=dn)
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_jit_does_not_recompile():
  x, w = _data()
  f = jax.jit(lambda x, w: qdot.quant_dot_general(x, w, DN, jc.Quant(w_bits=8, a_bits=8)))
  f(x, w)
  before = f._cache_size()  # pylint: disable=protected-access
  f(x + 1, w * 2)
  assert f._cache_size() == before  # pylint: disable=protected-access


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(data=hypothesis.strategies.data())
def test_int4_skinny_dot_is_exact_for_every_row_count_and_group(data):
  """The packed-int4 decode product (two GEMMs on the stored bytes and their low nibbles, a
  block-diagonal operand per group) equals the int64 product of the values, per group."""
  st = hypothesis.strategies
  n, k, r = data.draw(st.integers(1, 9)), 2 * data.draw(st.integers(1, 40)), data.draw(
      st.integers(1, 9))
  group = data.draw(st.sampled_from([None, 4, 8, 16, 32]))
  seed = data.draw(st.integers(0, 2**16))
  rng = np.random.default_rng(seed)
  q = rng.integers(-8, 8, (n, k)).astype(np.int8)
  x = rng.integers(-128, 128, (r, k)).astype(np.int8)
  # one jitted program per example (eagerly, every op of the product compiles per shape)
  got = jax.jit(lambda x, q: qdot._int4_skinny_dot(x, jc.quant.pack_int4(q, 1), group,
                                                   jnp.ones(())))(jnp.asarray(x), jnp.asarray(q))
  gs = group or k
  want = np.stack([q[:, i:i + gs].astype(np.int64) @ x[:, i:i + gs].T.astype(np.int64)
                   for i in range(0, k, gs)])
  np.testing.assert_array_equal(np.asarray(got), want)
