"""Bad checkpoint files give one-line errors naming the file (and the tensor or field): a
truncated GGUF or safetensors file, an invalid or incomplete ``config.json`` or index, and
tensors holding a NaN or inf (refused at load, naming the tensor)."""

import json
import os

import hypothesis
import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from jaxcomp.models.io import gguf_config, gguf_tokenizer, hf_config, load_gguf, load_safetensors
from test_safetensors import write_hf


def _one_line(e, path):
  message = str(e.value)
  assert "\n" not in message, message
  assert message.startswith(str(path)), message
  return message


@pytest.fixture
def gguf_bytes(tiny_gguf):
  path = tiny_gguf()
  with open(path, "rb") as f:
    return path, f.read()


@hypothesis.settings(max_examples=15, deadline=None,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(fraction=st.floats(0.0, 0.9999))
def test_a_truncated_gguf_is_one_line_naming_the_file(gguf_bytes, tmp_path, fraction):
  _, data = gguf_bytes
  cut = tmp_path / "cut.gguf"
  cut.write_bytes(data[:int(len(data) * fraction)])
  for load in (load_gguf, gguf_config, gguf_tokenizer):
    with pytest.raises(ValueError) as e:
      load(str(cut))
    _one_line(e, cut)


def test_a_gguf_cut_in_the_tensor_data_names_the_tensor(gguf_bytes, tmp_path):
  _, data = gguf_bytes
  cut = tmp_path / "model.gguf"
  cut.write_bytes(data[:-10])
  with pytest.raises(ValueError, match=r"model\.gguf: tensor blk\.\d+\.\w+\.weight needs \d+ "
                                       rf"bytes at offset \d+, the file has {len(data) - 10} "
                                       r"bytes \(truncated\?\)$") as e:
    load_gguf(str(cut))
  _one_line(e, cut)


def test_a_file_that_is_no_gguf_is_one_line(tmp_path):
  path = tmp_path / "text.gguf"
  path.write_bytes(b"hello, this is not a model" * 10)
  with pytest.raises(ValueError, match="not a readable GGUF file") as e:
    load_gguf(str(path))
  _one_line(e, path)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("scan", [False, True])
def test_a_non_finite_gguf_tensor_is_refused_naming_it(tiny_gguf, tiny_model, bad, scan):
  v = np.array(tiny_model.layers[1].attn.v_proj.kernel[...], np.float32).T  # GGUF: (out, in)
  v[3, 5] = bad
  path = tiny_gguf(replace={"blk.1.attn_v.weight": v})
  with pytest.raises(ValueError) as e:
    load_gguf(path, scan_layers=scan)
  assert _one_line(e, path) == (
      f"{path}: tensor blk.1.attn_v.weight (our layers/1/attn/v_proj/kernel) has a non-finite "
      f"value ({float(bad)!r}) at index (5, 3); the loader refuses non-finite weights")


# --------------------------------------------------------------------------- Hugging Face


@pytest.fixture
def hf_folder(tmp_path):
  from jaxcomp.models.llama import Llama, LlamaConfig  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  return write_hf(tmp_path / "hf", Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(3)))


@pytest.mark.parametrize("text,match", [
    ('{"model_type": "llama",, }', r"invalid JSON at line 1 column 24: Expecting property name"),
    ('{"model_type": "llama"', r"invalid JSON at line 1 column 23"),
    ("[1, 2]", "expected a JSON object, got a list"),
    ("", "invalid JSON at line 1 column 1: Expecting value"),
], ids=["syntax", "cut", "list", "empty"])
def test_an_invalid_config_json_names_the_path(hf_folder, text, match):
  path = hf_folder / "config.json"
  path.write_text(text)
  for load in (hf_config, load_safetensors):
    with pytest.raises(ValueError, match=match) as e:
      load(hf_folder)
    _one_line(e, path)


@pytest.mark.parametrize("change,match", [
    (lambda c: c.pop("hidden_size"), "field 'hidden_size' is missing"),
    (lambda c: c.update(vocab_size="many"), "field 'vocab_size' must be an integer, got 'many'"),
    (lambda c: c.update(num_hidden_layers=2.5), "field 'num_hidden_layers' must be an integer"),
    (lambda c: c.update(rms_norm_eps=[1e-5]), "field 'rms_norm_eps' must be a number"),
    (lambda c: c.update(model_type="gpt2"), "model_type='gpt2' is not supported"),
])
def test_a_bad_config_field_names_the_path_and_the_field(hf_folder, change, match):
  path = hf_folder / "config.json"
  config = json.loads(path.read_text())
  change(config)
  path.write_text(json.dumps(config))
  with pytest.raises(ValueError, match=match) as e:
    load_safetensors(hf_folder)
  _one_line(e, path)


def test_a_missing_config_json_names_the_path(hf_folder):
  os.remove(hf_folder / "config.json")
  with pytest.raises(ValueError, match=r"config\.json: cannot read \(No such file") as e:
    hf_config(hf_folder)
  _one_line(e, hf_folder / "config.json")


def test_a_bad_index_names_the_path(hf_folder):
  index = hf_folder / "model.safetensors.index.json"
  for text, match in [("{nope", "invalid JSON"), ('{"weight_map": [1]}', "weight_map")]:
    index.write_text(text)
    with pytest.raises(ValueError, match=match) as e:
      load_safetensors(hf_folder)
    _one_line(e, index)


@pytest.mark.parametrize("keep", [0.001, 0.5, 0.999])
def test_a_truncated_safetensors_shard_is_one_line(hf_folder, keep):
  shard = hf_folder / "model.safetensors"
  data = shard.read_bytes()
  shard.write_bytes(data[:int(len(data) * keep)])
  with pytest.raises(ValueError) as e:
    load_safetensors(hf_folder)
  assert "\n" not in str(e.value) and str(hf_folder) in str(e.value), str(e.value)


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_a_non_finite_safetensors_tensor_is_refused_naming_it(hf_folder, dtype):
  shard = hf_folder / "model.safetensors"
  tensors = safetensors.numpy.load_file(str(shard))
  bad = tensors["model.layers.0.mlp.up_proj.weight"].astype(np.float32)
  bad[7, 2] = np.nan
  tensors["model.layers.0.mlp.up_proj.weight"] = bad.astype(dtype)
  safetensors.numpy.save_file(tensors, str(shard))
  with pytest.raises(ValueError) as e:
    load_safetensors(hf_folder)
  assert _one_line(e, hf_folder) == (
      f"{hf_folder}: tensor model.layers.0.mlp.up_proj.weight (our layers/0/mlp/up_proj/kernel) "
      "has a non-finite value (nan) at index (2, 7); the loader refuses non-finite weights")
