"""Hugging Face GPTQ checkpoints (jaxcomp/models/io/gptq.py): a packed tiny Llama written in the
GPTQ layout and read back bit for bit; the layout checked by hand; bad input in one line."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import jaxcomp as jc
from jaxcomp.models.io import gptq
from jaxcomp.models.io import hf_config
from jaxcomp.models.llama import Llama, LlamaConfig


def _packed(bits=4, group=32, scale_dtype="float16", **kw):
  model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, 256)
  recipe = jc.Recipe([jc.Rule(r".*_proj", quant=jc.Quant(
      w_bits=bits, group=group, method="gptq", scale_dtype=scale_dtype, **kw))])
  packed = jc.convert(jc.ptq(model, recipe, calib=tokens))
  like = nnx.eval_shape(lambda: jc.packed_skeleton(Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0)),
                                                   recipe))
  return packed, like, tokens


@pytest.mark.parametrize("bits, group, full", [(4, 32, False), (4, None, True), (2, 32, True),
                                               (8, None, False)])
def test_round_trip_is_bit_exact(tmp_path, bits, group, full):
  packed, like, tokens = _packed(bits, group, full_range=full)
  gptq.save_gptq(packed, tmp_path / "ckpt")
  again = gptq.load_gptq(tmp_path / "ckpt", like)
  for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(packed)),
                               nnx.to_flat_state(nnx.state(again))):
    for x, y in zip(jax.tree.leaves(a.get_value()), jax.tree.leaves(b.get_value())):
      np.testing.assert_array_equal(x, y, err_msg=str(path))
  np.testing.assert_array_equal(again(tokens), packed(tokens))
  config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
  assert config["quantization_config"] == {
      "quant_method": "gptq", "bits": bits, "group_size": group or -1, "desc_act": False,
      "sym": True, "checkpoint_format": "gptq"}
  assert hf_config(tmp_path / "ckpt").n_layers == LlamaConfig.tiny().n_layers


def test_the_layout_dequantizes_as_the_format_says(tmp_path):
  packed, _, _ = _packed(4, 32)
  gptq.save_gptq(packed, tmp_path / "ckpt")
  t = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
  name = "model.layers.1.mlp.down_proj"
  qweight, qzeros, scales, g_idx = (t[f"{name}.{s}"] for s in ("qweight", "qzeros", "scales", "g_idx"))
  k, n = packed.layers[1].mlp.down_proj.kernel[...].shape
  assert qweight.dtype == np.int32 and qweight.shape == (k // 8, n)
  assert scales.dtype == np.float16 and scales.shape == (k // 32, n)
  words = qweight.view(np.uint32)
  q = np.stack([(words >> (4 * j)) & 15 for j in range(8)], axis=1).reshape(k, n)  # by hand
  z = np.stack([(qzeros.view(np.uint32) >> (4 * j)) & 15 for j in range(8)], axis=2).reshape(k // 32, n)
  q, z = q.astype(np.int64), z.astype(np.int64)
  w = scales[g_idx].astype(np.float32) * (q - (z[g_idx] + 1))
  np.testing.assert_array_equal(w, packed.layers[1].mlp.down_proj.kernel[...].dequantize())
  assert t["model.embed_tokens.weight"].shape == (256, LlamaConfig.tiny().dim)


def test_bad_input_is_one_line(tmp_path):
  packed, like, _ = _packed(4, 32, scale_dtype="float32")
  with pytest.raises(ValueError, match=r"scale float16 cannot hold .* Quant\(scale_dtype='float16'\)"):
    gptq.save_gptq(packed, tmp_path / "a")
  assert not (tmp_path / "a").exists() and not (tmp_path / "a.tmp").exists()
  asym, _, _ = _packed(4, 32, w_symmetric=False)
  with pytest.raises(ValueError, match="with zero points; GPTQ checkpoints hold symmetric"):
    gptq.save_gptq(asym, tmp_path / "b")
  three, _, _ = _packed(3, 32)
  with pytest.raises(ValueError, match="3-bit int grid; GPTQ checkpoints hold symmetric integer grids of 2, 4, 8"):
    gptq.save_gptq(three, tmp_path / "c")
  good, like, _ = _packed(4, 32)
  gptq.save_gptq(good, tmp_path / "d")
  with pytest.raises(FileExistsError):
    gptq.save_gptq(good, tmp_path / "d")
  t = load_file(str(tmp_path / "d" / "model.safetensors"))
  t["model.layers.0.mlp.up_proj.g_idx"] = t["model.layers.0.mlp.up_proj.g_idx"][::-1].copy()
  save_file(t, str(tmp_path / "d" / "model.safetensors"))
  with pytest.raises(ValueError, match=r"model.layers.0.mlp.up_proj.g_idx reorders the inputs"):
    gptq.load_gptq(tmp_path / "d", like)
  cfg = json.loads((tmp_path / "d" / "config.json").read_text())
  cfg["quantization_config"]["quant_method"] = "awq"
  (tmp_path / "d" / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match="is not a GPTQ \\(v1\\) checkpoint"):
    gptq.load_gptq(tmp_path / "d", like)
