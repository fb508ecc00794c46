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
  ``"llama3_8b"`` has shapes only (`abstract_model`).

  Example::

    model, tokenizer = load_model(ml_collections.ConfigDict(
        {"seed": 0, "model": {"name": "tiny", "cache_dir": ""}}))
  """
  name = config.model.name
  scan = bool(config.model.get("scan_layers", False))
  model_config(config)  # an unknown name fails here
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
  raise ValueError(f"config.model.name={name!r} has no weights here (shapes only: use it "
                   "with --compile_only)")


MODELS = ("smollm2_135m", "tiny", "llama3_8b")


def model_config(config: ml_collections.ConfigDict) -> Any:
  """The `jaxcomp.models.llama.LlamaConfig` of ``config.model.name`` (no file is read):
  SmolLM2-135M as `load_model` builds it from its GGUF (attention one sequence at a time),
  the tiny test model, or Llama-3-8B's shapes.

  Example::

    model_config(ml_collections.ConfigDict({"model": {"name": "llama3_8b"}})).dim   # 4096
  """
  from jaxcomp.models import llama  # pylint: disable=import-outside-toplevel
  name = config.model.name
  scan = bool(config.model.get("scan_layers", False))
  if name == "smollm2_135m":
    return llama.LlamaConfig.smollm2_135m(attn_batch_chunk=1, scan_layers=scan)
  if name == "tiny":
    return llama.LlamaConfig.tiny(scan_layers=scan)
  if name == "llama3_8b":
    return llama.LlamaConfig.llama3_8b(scan_layers=scan)
  raise ValueError(f"config.model.name must be one of {', '.join(MODELS)}, got {name!r}")


def abstract_model(config: ml_collections.ConfigDict) -> nnx.Module:
  """``config.model``'s Llama with shapes, dtypes and logical axes but no values
  (``nnx.eval_shape``): what a compile-only dry run needs, nothing fetched or allocated.

  Example::

    model = abstract_model(config)      # model.embed.embedding[...] is a ShapeDtypeStruct
  """
  from jaxcomp.models import llama  # pylint: disable=import-outside-toplevel
  cfg = model_config(config)
  return nnx.eval_shape(lambda: llama.Llama(cfg, rngs=nnx.Rngs(0)))
