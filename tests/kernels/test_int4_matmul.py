"""int4 (w4a16) matmul: TPU and GPU kernels (interpreted) against the XLA reference over group
sizes and ragged shapes, symmetric and with zero points, the packing, and bad input."""

import numpy as np
import jax.numpy as jnp
import pytest

import jaxcomp as jc
from jaxcomp.quant.qarray import pack_int4, quantize_weight
from pallas_kernels import int4_matmul, int4_matmul_reference, pack_kn, unpack_kn
from pallas_kernels.tiling import Blocks


def _problem(rng, m, k, n, group, dtype=jnp.bfloat16):
  q = jnp.asarray(rng.integers(-8, 8, (k, n)), jnp.int8)
  scales = jnp.asarray(rng.uniform(0.01, 0.1, (k // group if group else 1, n)), jnp.float32)
  x = jnp.asarray(rng.standard_normal((m, k)), dtype)
  return x, pack_kn(q), scales, q


def _zeros(rng, scales):
  """Zero points like a quantizer stores them: integer-valued f32 in [-8, 7], shaped like
  the scales."""
  return jnp.asarray(rng.integers(-8, 8, scales.shape), jnp.float32)


# (m, k, n, group, TPU blocks or None for the roofline default). The explicit TPU tiles take
# several K steps with (tk / group) >= 8 scale rows per step.
CASES = [
    (1, 256, 128, 32, None),
    (5, 512, 130, 64, Blocks(16, 128, 512)),
    (17, 1024, 256, 128, Blocks(16, 128, 1024)),
    (9, 2048, 128, 128, Blocks(16, 128, 1024)),
    (3, 192, 260, None, None),
    (33, 576, 200, 64, None),
]


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("m,k,n,group,tpu_blocks", CASES)
def test_matches_reference(backend, m, k, n, group, tpu_blocks):
  rng = np.random.default_rng(m + k + n)
  x, w, s, q = _problem(rng, m, k, n, group)
  ref = int4_matmul_reference(x, w, s, group=group, out_dtype=jnp.float32)
  # The reference is the textbook dequantize-then-matmul:
  deq = (np.asarray(q, np.float32) * np.repeat(np.asarray(s), group or k, axis=0)).astype(
      jnp.bfloat16).astype(np.float32)
  np.testing.assert_allclose(np.asarray(ref), np.asarray(x, np.float32) @ deq, rtol=1e-4,
                             atol=1e-3)
  blocks = tpu_blocks if backend == "tpu" else None
  y = int4_matmul(x, w, s, group=group, out_dtype=jnp.float32, backend=backend, interpret=True,
                  blocks=blocks)
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("m,k,n,group,tpu_blocks", CASES)
def test_zeros_match_reference(backend, m, k, n, group, tpu_blocks):
  rng = np.random.default_rng(m + k + n + 1)
  x, w, s, q = _problem(rng, m, k, n, group)
  z = _zeros(rng, s)
  ref = int4_matmul_reference(x, w, s, group=group, zeros=z, out_dtype=jnp.float32)
  # The reference is the textbook (q - z) * s dequantize-then-matmul:
  rows = group or k
  deq = ((np.asarray(q, np.float32) - np.repeat(np.asarray(z), rows, axis=0))
         * np.repeat(np.asarray(s), rows, axis=0)).astype(jnp.bfloat16).astype(np.float32)
  np.testing.assert_allclose(np.asarray(ref), np.asarray(x, np.float32) @ deq, rtol=1e-4,
                             atol=1e-3)
  # Zero points matter: the symmetric result is far from it.
  sym = int4_matmul_reference(x, w, s, group=group, out_dtype=jnp.float32)
  assert np.max(np.abs(np.asarray(sym) - np.asarray(ref))) > 1e-2
  blocks = tpu_blocks if backend == "tpu" else None
  y = int4_matmul(x, w, s, group=group, zeros=z, out_dtype=jnp.float32, backend=backend,
                  interpret=True, blocks=blocks)
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", ["tpu", "gpu", "xla"])
def test_zeros_of_zero_are_symmetric(backend):
  rng = np.random.default_rng(5)
  x, w, s, _ = _problem(rng, 4, 256, 128, 64)
  sym = int4_matmul(x, w, s, group=64, out_dtype=jnp.float32, backend=backend,
                    interpret=True)
  y = int4_matmul(x, w, s, group=64, zeros=jnp.zeros_like(s), out_dtype=jnp.float32,
                  backend=backend, interpret=True)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(sym))


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_zeros_with_bias_activation_and_bf16_output(backend):
  rng = np.random.default_rng(6)
  x, w, s, _ = _problem(rng, 6, 256, 130, 32)
  z = _zeros(rng, s)
  bias = jnp.asarray(rng.standard_normal(130), jnp.float32)
  ref = int4_matmul_reference(x, w, s, group=32, zeros=z, bias=bias, activation="gelu")
  y = int4_matmul(x, w, s, group=32, zeros=z, bias=bias, activation="gelu", backend=backend,
                  interpret=True)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32),
                             rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_bias_activation_and_bf16_output(backend):
  rng = np.random.default_rng(3)
  x, w, s, _ = _problem(rng, 6, 256, 128, 32)
  bias = jnp.asarray(rng.standard_normal(128), jnp.float32)
  ref = int4_matmul_reference(x, w, s, group=32, bias=bias, activation="silu")
  y = int4_matmul(x, w, s, group=32, bias=bias, activation="silu", backend=backend,
                  interpret=True)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32),
                             rtol=2e-2, atol=2e-2)


def test_packing_is_the_transpose_of_a_qarray():
  rng = np.random.default_rng(4)
  q = jnp.asarray(rng.integers(-8, 8, (64, 48)), jnp.int8)  # (K, N)
  np.testing.assert_array_equal(np.asarray(unpack_kn(pack_kn(q))), np.asarray(q))
  # A QArray stores (N, K // 2) with pairs along K: its transpose is this kernel's layout.
  np.testing.assert_array_equal(np.asarray(pack_int4(q.T, axis=1).T), np.asarray(pack_kn(q)))
  qa = quantize_weight(jnp.asarray(rng.standard_normal((64, 48)), jnp.float32), (0,),
                      jc.Quant(w_bits=4, group=32))
  x = jnp.asarray(rng.standard_normal((3, 64)), jnp.float32)
  y = int4_matmul(x, qa.values.T, qa.scale.T, group=32, backend="tpu", interpret=True)
  np.testing.assert_allclose(np.asarray(y), np.asarray(x @ qa.dequantize()), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(k=96, wk=64), r"K mismatch: x is \(2, 96\)"),
    (dict(group=48), r"group must be one of \(32, 64, 128\)"),
    (dict(k=96, wk=96, group=64), r"group 64 does not divide K=96"),
    (dict(x_dtype=jnp.int8), r"x must be bfloat16, float16 or float32, got int8"),
    (dict(w_dtype=jnp.float32), r"w_packed must be int8"),
    (dict(w_dtype=jnp.uint8), r"w_packed must be int8 .*got uint8"),
    (dict(scales_rows=3), r"scales must have shape \(2, 16\)"),
])
def test_bad_input(kwargs, match):
  k, wk = kwargs.get("k", 64), kwargs.get("wk", 64)
  group = kwargs.get("group", 32)
  x = jnp.zeros((2, k), kwargs.get("x_dtype", jnp.bfloat16))
  w = jnp.zeros((wk // 2, 16), kwargs.get("w_dtype", jnp.int8))
  s = jnp.ones((kwargs.get("scales_rows", wk // 32), 16))
  with pytest.raises(ValueError, match=match):
    int4_matmul(x, w, s, group=group, backend="tpu", interpret=True)


@pytest.mark.parametrize("group,z_shape,match", [
    (32, (3, 16), r"zeros must have shape \(2, 16\) \(the shape of scales\), got \(3, 16\)"),
    (32, (2, 8), r"zeros must have shape \(2, 16\) \(the shape of scales\), got \(2, 8\)"),
    (32, (16,), r"zeros must have shape \(2, 16\) \(the shape of scales\), got \(16,\)"),
    (None, (2, 16), r"zeros must have shape \(1, 16\) \(the shape of scales\), got \(2, 16\)"),
])
@pytest.mark.parametrize("backend", ["tpu", "gpu", "xla"])
def test_bad_zeros_shape(backend, group, z_shape, match):
  x = jnp.zeros((2, 64), jnp.bfloat16)
  w = jnp.zeros((32, 16), jnp.int8)
  s = jnp.ones((2 if group else 1, 16))
  with pytest.raises(ValueError, match=match):
    int4_matmul(x, w, s, group=group, zeros=jnp.zeros(z_shape), backend=backend,
                interpret=True)


def test_bad_zeros_dtype():
  x = jnp.zeros((2, 64), jnp.bfloat16)
  w = jnp.zeros((32, 16), jnp.int8)
  s = jnp.ones((2, 16))
  with pytest.raises(ValueError, match=r"zeros must be a float array .* got int8"):
    int4_matmul(x, w, s, group=32, zeros=jnp.zeros((2, 16), jnp.int8), backend="tpu",
                interpret=True)
