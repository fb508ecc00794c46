"""Every Pallas kernel, as a function of its backend and the abstract arguments of one call: the
cases that `test_export.py` lowers and `test_aot.py` compiles for each TPU and GPU target (the
roofline tile table's shapes, ragged ones, float activations quantized in the int8 kernel, every
int4 group (32, 64, 128, per channel), zero points, block-sparse)."""

import jax
import jax.numpy as jnp

from pallas_kernels import block_sparse_matmul, int4_matmul, int8_matmul

S = jax.ShapeDtypeStruct


def _int8(m, k, n, x_dtype=jnp.int8, **kw):
  return (lambda b: lambda x, w, xs, ws: int8_matmul(x, w, xs, ws, w_layout="nk", backend=b, **kw),
          (S((m, k), x_dtype), S((n, k), jnp.int8), S((m,), jnp.float32), S((n,), jnp.float32)))


def _int4(m, k, n, group, zeros=False):
  groups = 1 if group is None else k // group
  avals = (S((m, k), jnp.bfloat16), S((k // 2, n), jnp.int8), S((groups, n), jnp.float32))
  if zeros:
    return (lambda b: lambda x, w, s, z: int4_matmul(x, w, s, group=group, zeros=z, backend=b),
            avals + (S((groups, n), jnp.float32),))
  return (lambda b: lambda x, w, s: int4_matmul(x, w, s, group=group, backend=b), avals)


KERNELS = {
    # The tile table's decode and prefill shapes (docs/kernels.md), then ragged ones.
    "int8_decode": _int8(16, 4096, 4096),
    "int8_prefill": _int8(512, 4096, 4096, activation="silu"),
    "int8_ragged": (lambda b: lambda x, w: int8_matmul(x, w, out_dtype=jnp.int32, backend=b),
                    (S((5, 300), jnp.int8), S((300, 130), jnp.int8))),
    # bf16 activations quantized per row inside the kernel (the packed W8A8 layers' call).
    "int8_quantizing_prefill": _int8(512, 4096, 4096, x_dtype=jnp.bfloat16),
    "int8_quantizing_ragged": _int8(5, 576, 200, x_dtype=jnp.bfloat16),
    "int4_channel": _int4(16, 4096, 4096, None),
    "int4_g32_ragged": _int4(3, 576, 200, 32),
    "int4_g64_zeros": _int4(5, 1024, 260, 64, zeros=True),
    "int4_g128": _int4(16, 2048, 512, 128),
    "int4_g128_prefill": _int4(512, 4096, 4096, 128),
    "block_sparse": (lambda b: lambda x, v, i, c: block_sparse_matmul(x, v, i, c, n=512, backend=b),
                     (S((16, 1024), jnp.bfloat16), S((4, 3, 128, 128), jnp.bfloat16),
                      S((4, 3), jnp.int32), S((4,), jnp.int32))),
}
