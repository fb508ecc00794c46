"""Named models for experiments and tests: ``config.model.name`` -> (model, tokenizer)."""

from __future__ import annotations

from typing import Any

from flax import nnx
import ml_collections


def load_model(config: ml_collections.ConfigDict) -> tuple[nnx.Module, Any]:
  """``config.model``'s Llama and tokenizer: SmolLM2-135M from its GGUF, or a tiny random one
  with the byte tokenizer (``name="tiny"``, seeded by ``config.seed``).

  Example::

    model, tokenizer = load_model(ml_collections.ConfigDict(
        {"seed": 0, "model": {"name": "tiny", "cache_dir": ""}}))
  """
  name = config.model.name
  if name == "smollm2_135m":
    from jaxcomp.models import io  # pylint: disable=import-outside-toplevel
    path = io.fetch_smollm2(config.model.cache_dir or None)
    return io.load_gguf(path, attn_batch_chunk=1), io.gguf_tokenizer(path)
  if name == "tiny":
    from jaxcomp.models.llama import Llama, LlamaConfig  # pylint: disable=import-outside-toplevel
    from jaxcomp.models.io.tokenizer import ByteTokenizer  # pylint: disable=import-outside-toplevel
    return Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(config.seed)), ByteTokenizer()
  raise ValueError(f"config.model.name must be 'smollm2_135m' or 'tiny', got {name!r}")
