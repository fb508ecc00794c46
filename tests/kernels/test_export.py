"""Every kernel lowers for real hardware from this CPU host: `jax.export` for TPU (the module
holds the Mosaic ``tpu_custom_call``) and for CUDA (the Triton custom call). Compiling the
kernel itself only happens on the device."""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import block_sparse_matmul, export_for, int4_matmul, int8_matmul
from pallas_kernels._common import CUSTOM_CALL_TARGETS

S = jax.ShapeDtypeStruct

KERNELS = {
    "int8": (lambda b: lambda x, w, xs, ws: int8_matmul(
        x, w, xs, ws, w_layout="nk", backend=b, interpret=False),
             (S((16, 1024), jnp.int8), S((512, 1024), jnp.int8), S((16,), jnp.float32),
              S((512,), jnp.float32))),
    "int8_ragged": (lambda b: lambda x, w: int8_matmul(
        x, w, out_dtype=jnp.int32, backend=b, interpret=False),
                    (S((5, 300), jnp.int8), S((300, 130), jnp.int8))),
    "int4_g128": (lambda b: lambda x, w, s: int4_matmul(
        x, w, s, group=128, backend=b, interpret=False),
                  (S((16, 2048), jnp.bfloat16), S((1024, 512), jnp.int8),
                   S((16, 512), jnp.float32))),
    "int4_g32_ragged": (lambda b: lambda x, w, s: int4_matmul(
        x, w, s, group=32, backend=b, interpret=False),
                        (S((3, 576), jnp.bfloat16), S((288, 200), jnp.int8),
                         S((18, 200), jnp.float32))),
    "int4_g64_zeros": (lambda b: lambda x, w, s, z: int4_matmul(
        x, w, s, group=64, zeros=z, backend=b, interpret=False),
                       (S((5, 1024), jnp.bfloat16), S((512, 260), jnp.int8),
                        S((16, 260), jnp.float32), S((16, 260), jnp.float32))),
    "block_sparse": (lambda b: lambda x, v, i, c: block_sparse_matmul(
        x, v, i, c, n=512, backend=b, interpret=False),
                     (S((16, 1024), jnp.bfloat16), S((4, 3, 128, 128), jnp.bfloat16),
                      S((4, 3), jnp.int32), S((4,), jnp.int32))),
}


@pytest.mark.parametrize("platform,backend", [("tpu", "tpu"), ("cuda", "gpu")])
@pytest.mark.parametrize("name", sorted(KERNELS))
def test_lowers_to_the_backend_custom_call(name, platform, backend):
  make, avals = KERNELS[name]
  text = export_for(make(backend), *avals, platform=platform)
  assert CUSTOM_CALL_TARGETS[platform] in text
  assert "jaxcomp_" in text  # our kernel, by name
