"""Models that jaxcomp compresses: a Llama-family decoder and small vision nets.

Every parameter carries logical axis names as ``out_sharding`` Variable
metadata; see :mod:`jaxcomp.models.llama` and :mod:`jaxcomp.models.vision`
for the tables.

Example::

  from flax import nnx
  from jaxcomp import models
  lm = models.Llama(models.LlamaConfig.tiny(), rngs=nnx.Rngs(0))
  cnn = models.CNN(models.CNNConfig(), rngs=nnx.Rngs(0))
"""

from jaxcomp.models.partitioning import constrain
from jaxcomp.models.llama import KVCache
from jaxcomp.models.llama import LOGICAL_AXES
from jaxcomp.models.llama import Llama
from jaxcomp.models.llama import LlamaConfig
from jaxcomp.models.llama import apply_rope
from jaxcomp.models.llama import generate
from jaxcomp.models.llama import sample_tokens
from jaxcomp.models.llama import make_decode_fns
from jaxcomp.models.llama import permute_rope_kernel
from jaxcomp.models.vision import CNN
from jaxcomp.models.vision import CNNConfig
from jaxcomp.models.vision import VISION_LOGICAL_AXES
from jaxcomp.models.vision import ViT
from jaxcomp.models.vision import ViTConfig

__all__ = [
    "CNN",
    "CNNConfig",
    "KVCache",
    "LOGICAL_AXES",
    "Llama",
    "LlamaConfig",
    "VISION_LOGICAL_AXES",
    "ViT",
    "ViTConfig",
    "apply_rope",
    "constrain",
    "generate",
    "sample_tokens",
    "make_decode_fns",
    "permute_rope_kernel",
]
