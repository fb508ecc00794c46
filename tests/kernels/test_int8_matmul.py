"""int8 matmul: the TPU (Mosaic, TPU-semantics interpreter) and GPU (Triton, interpreter)
kernels against the XLA reference -- bit-exact in the int32 accumulator over ragged shapes --
the fused epilogue, and bad input."""

import numpy as np
import jax.numpy as jnp
import pytest

from pallas_kernels import int8_matmul, int8_matmul_reference
from pallas_kernels.tiling import Blocks

# Small tiles so a test shape spans several blocks on every grid axis (K included).
BLOCKS = {"tpu": Blocks(32, 128, 128), "gpu": Blocks(16, 128, 64)}
SHAPES = [(1, 128, 128), (5, 300, 130), (40, 384, 260), (64, 256, 384)]


def _ints(rng, shape):
  return jnp.asarray(rng.integers(-128, 128, shape), jnp.int8)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("layout", ["kn", "nk"])
def test_accumulator_is_bit_exact(backend, m, k, n, layout):
  rng = np.random.default_rng(m * k + n)
  x = _ints(rng, (m, k))
  w = _ints(rng, (k, n) if layout == "kn" else (n, k))
  y = int8_matmul(x, w, out_dtype=jnp.int32, w_layout=layout, backend=backend,
                  interpret=True, blocks=BLOCKS[backend])
  wk = np.asarray(w, np.int64) if layout == "kn" else np.asarray(w, np.int64).T
  exact = np.asarray(x, np.int64) @ wk
  np.testing.assert_array_equal(np.asarray(y), exact)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(
      int8_matmul_reference(x, w, out_dtype=jnp.int32, w_layout=layout)))


def test_v4_bf16_mxu_path_is_bit_exact_at_the_largest_k_tile(monkeypatch):
  """v4 has no int8 MXU: int8 tiles run as bf16 with an f32 sum per K tile. At the extreme
  values (-128 * -128 everywhere) over tk = 1024 the tile sum is 2**24, still exact."""
  monkeypatch.setenv("JAXCOMP_TPU_GENERATION", "v4")
  x = jnp.full((8, 2048), -128, jnp.int8)
  w = jnp.full((2048, 128), -128, jnp.int8)
  y = int8_matmul(x, w, out_dtype=jnp.int32, backend="tpu", interpret=True,
                  blocks=Blocks(8, 128, 1024))
  np.testing.assert_array_equal(np.asarray(y), np.full((8, 128), 2048 * 128 * 128))
  rng = np.random.default_rng(4)
  x, w = _ints(rng, (40, 384)), _ints(rng, (384, 260))
  y = int8_matmul(x, w, out_dtype=jnp.int32, backend="tpu", interpret=True,
                  blocks=BLOCKS["tpu"])
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x, np.int64) @ np.asarray(w, np.int64))
  with pytest.raises(ValueError, match="tk <= 1024"):
    int8_matmul(x, w, backend="tpu", interpret=True, blocks=Blocks(32, 128, 2048))


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_fused_epilogue(backend, activation):
  rng = np.random.default_rng(1)
  m, k, n = 37, 320, 200
  x, w = _ints(rng, (m, k)), _ints(rng, (n, k))
  xs = jnp.asarray(rng.uniform(0.001, 0.01, m), jnp.float32)
  ws = jnp.asarray(rng.uniform(0.001, 0.01, n), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
  kw = dict(activation=activation, w_layout="nk")
  ref = int8_matmul_reference(x, w, xs, ws, bias, out_dtype=jnp.float32, **kw)
  y = int8_matmul(x, w, xs, ws, bias, out_dtype=jnp.float32, backend=backend, interpret=True,
                  blocks=BLOCKS[backend], **kw)
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-6, atol=1e-6)
  y16 = int8_matmul(x, w, xs, ws, bias, backend=backend, interpret=True,
                    blocks=BLOCKS[backend], **kw)
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y16, np.float32), np.asarray(ref), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("m,k,n", [(5, 300, 130), (40, 384, 260)])
@pytest.mark.parametrize("dtype,bits", [(jnp.bfloat16, 8), (jnp.float32, 8), (jnp.float32, 4)])
def test_float_x_is_quantized_in_the_kernel(backend, m, k, n, dtype, bits):
  """A float x with per-row scales: the kernel's in-tile quantization gives the same int32
  accumulator as quantizing first (`quantize_rows`, round half to even, values at .5 included)
  and the same scaled output; nothing else is needed from the caller."""
  rng = np.random.default_rng(m + k + bits)
  q = 2 ** (bits - 1) - 1
  x = rng.standard_normal((m, k)).astype(np.float32)
  x[0, :8] = [0.5, 1.5, 2.5, -0.5, -2.5, 3.5, 0.0, -1.5]  # ties, with scale 1 below
  xs = np.abs(x).max(axis=1) / q
  xs[0] = 1.0
  x = jnp.asarray(x, dtype)
  xs = jnp.asarray(xs, jnp.float32)
  w = _ints(rng, (n, k))
  xq = jnp.clip(jnp.round(x.astype(jnp.float32) / xs[:, None]), -q, q).astype(jnp.int8)
  kw = dict(w_layout="nk", x_bits=bits, backend=backend, interpret=True, blocks=BLOCKS[backend])
  acc = int8_matmul(x, w, xs, out_dtype=jnp.int32, **kw)
  np.testing.assert_array_equal(np.asarray(acc), np.asarray(xq, np.int64) @ np.asarray(w, np.int64).T)
  ws = jnp.asarray(rng.uniform(0.001, 0.01, n), jnp.float32)
  y = int8_matmul(x, w, xs, ws, out_dtype=jnp.float32, **kw)
  ref = int8_matmul_reference(xq, w, xs, ws, out_dtype=jnp.float32, w_layout="nk")
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(int8_matmul_reference(
      x, w, xs, ws, out_dtype=jnp.float32, w_layout="nk", x_bits=bits)))


def test_default_blocks_and_xla_path():
  rng = np.random.default_rng(2)
  x, w = _ints(rng, (3, 200)), _ints(rng, (200, 90))
  exact = np.asarray(x, np.int64) @ np.asarray(w, np.int64)
  for backend in ("tpu", "gpu", "xla"):
    y = int8_matmul(x, w, out_dtype=jnp.int32, backend=backend, interpret=True)
    np.testing.assert_array_equal(np.asarray(y), exact)


@pytest.mark.parametrize("args,kwargs,match", [
    (((4, 64), (32, 16)), {}, r"K mismatch"),
    (((4, 64), (64, 16)), {"x_dtype": jnp.float32},
     r"x must be int8, or float with x_scale .*got float32 and no x_scale"),
    (((4, 64), (64, 16)), {"w_dtype": jnp.uint8}, r"w must be int8, got uint8"),
    (((4, 64), (64, 16)), {"w_scale": 8}, r"w_scale must hold 16 values"),
    (((4, 64), (64, 16)), {"layout": "kk"}, r"w_layout must be 'kn' or 'nk'"),
    (((4, 64), (64, 16)), {"int32_with_scale": True}, r"raw accumulator"),
])
def test_bad_input(args, kwargs, match):
  x = jnp.zeros(args[0], kwargs.get("x_dtype", jnp.int8))
  w = jnp.zeros(args[1], kwargs.get("w_dtype", jnp.int8))
  ws = jnp.ones(kwargs["w_scale"]) if "w_scale" in kwargs else None
  extra = {"x_scale": jnp.ones(4), "out_dtype": jnp.int32} if kwargs.get(
      "int32_with_scale") else {}
  with pytest.raises(ValueError, match=match):
    int8_matmul(x, w, w_scale=ws, w_layout=kwargs.get("layout", "kn"), backend="tpu",
                interpret=True, **extra)


def test_backend_switch(monkeypatch):
  x, w = jnp.ones((2, 128), jnp.int8), jnp.ones((128, 128), jnp.int8)
  monkeypatch.setenv("JAXCOMP_KERNEL_BACKEND", "warp")
  with pytest.raises(ValueError, match=r"\$JAXCOMP_KERNEL_BACKEND must be one of"):
    int8_matmul(x, w)
  monkeypatch.setenv("JAXCOMP_KERNEL_BACKEND", "gpu")  # forced on CPU: runs interpreted
  assert int(int8_matmul(x, w, out_dtype=jnp.int32)[0, 0]) == 128
