"""Serving form of quantized models: `convert` (packed `QArray` kernels) and packed Orbax
checkpoints (`save_packed`, `restore_packed`, `packed_skeleton`)."""

from jaxcomp.serve.checkpoint import SavedSize
from jaxcomp.serve.checkpoint import packed_skeleton
from jaxcomp.serve.checkpoint import restore_packed
from jaxcomp.serve.checkpoint import save_packed
from jaxcomp.serve.packing import convert
from jaxcomp.serve.packing import pack_kernel
from jaxcomp.serve.packing import packed_named_sharding

__all__ = ["SavedSize", "convert", "pack_kernel", "packed_named_sharding", "packed_skeleton",
           "restore_packed", "save_packed"]
