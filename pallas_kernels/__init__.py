"""Pallas kernels (TPU Mosaic / GPU Triton) for quantized and block-sparse matmuls.

Imports only jax. Each kernel has a TPU variant, a GPU variant and a pure-XLA reference with
the same signature; ``backend=`` (or ``$JAXCOMP_KERNEL_BACKEND``: auto, tpu, gpu, xla) picks
one, defaulting to the device's platform. A Pallas variant forced on a host without its
hardware runs in the Pallas interpreter (``interpret=``, ``$JAXCOMP_KERNEL_INTERPRET``), unless
traced inside `compiling_for` (an ahead-of-time compile for a TPU / GPU that is not here).

* `int8_matmul`: int8 x int8 -> int32 accumulator -> scales / bias / activation.
* `int4_matmul`: w4a16, int4 weights two a byte, group scales, dequantized in-kernel.
* `block_sparse_matmul`: dense x block-sparse (blocked ELL) weights, stored tiles only.

See docs/kernels.md for the tiling (`tiling`) and what is measured where.
"""

from pallas_kernels._common import (BACKENDS, compiling_for, export_for, resolve_backend,
                                     target_platform)
from pallas_kernels.block_sparse_matmul import (block_sparse_matmul,
                                                block_sparse_matmul_reference)
from pallas_kernels.int4_matmul import GROUPS as int4_matmul_groups
from pallas_kernels.int4_matmul import int4_matmul, int4_matmul_reference, pack_kn, unpack_kn
from pallas_kernels.int8_matmul import int8_matmul, int8_matmul_reference
from pallas_kernels.tiling import Blocks

__all__ = [
    "BACKENDS", "Blocks", "block_sparse_matmul", "block_sparse_matmul_reference",
    "compiling_for", "export_for", "int4_matmul", "int4_matmul_reference", "int8_matmul",
    "int8_matmul_reference", "int4_matmul_groups", "pack_kn", "resolve_backend", "target_platform",
    "unpack_kn",
]
