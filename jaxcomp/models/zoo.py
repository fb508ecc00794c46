"""Named models for experiments and tests: ``config.model.name`` -> (model, tokenizer)."""

from __future__ import annotations

from typing import Any

from flax import nnx
import ml_collections


def load_model(config: ml_collections.ConfigDict) -> tuple[nnx.Module, Any]:
  """``config.model``'s Llama and tokenizer: SmolLM2-135M from its GGUF, or a tiny random one
  with the byte tokenizer (``name="tiny"``, seeded by ``config.seed``). With
  ``config.model.scan_layers`` the blocks are stacked and run by ``nnx.scan``
  (`jaxcomp.models.llama.LlamaConfig.scan_layers`; recipes then name ``layers/attn/q_proj``).

  Example::

    model, tokenizer = load_model(ml_collections.ConfigDict(
        {"seed": 0, "model": {"name": "tiny", "cache_dir": ""}}))
  """
  name = config.model.name
  scan = bool(config.model.get("scan_layers", False))
  if name == "smollm2_135m":
    from jaxcomp.models import io  # pylint: disable=import-outside-toplevel
    path = io.fetch_smollm2(config.model.cache_dir or None)
    return (io.load_gguf(path, attn_batch_chunk=1, scan_layers=scan),
            io.gguf_tokenizer(path))
  if name == "tiny":
    from jaxcomp.models import llama  # pylint: disable=import-outside-toplevel
    from jaxcomp.models.io.tokenizer import ByteTokenizer  # pylint: disable=import-outside-toplevel
    model = llama.Llama(llama.LlamaConfig.tiny(), rngs=nnx.Rngs(config.seed))
    return (llama.scan_layers(model) if scan else model), ByteTokenizer()  # same weights
  raise ValueError(f"config.model.name must be 'smollm2_135m' or 'tiny', got {name!r}")
