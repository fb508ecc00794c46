"""Structured Llama pruning: shrunk arrays, logits equal to the masked model, depth pruning."""

import jax
import numpy as np
import pytest
from flax import nnx

from jaxcomp.models.llama import Llama, LlamaConfig
from jaxcomp.models.llama_surgery import (drop_blocks, llama_structured_keep, mask_llama,
                                        shrink_llama)

TOKENS = jax.random.randint(jax.random.key(3), (2, 12), 0, 256)


@pytest.fixture(scope="module")
def model():
  return Llama(LlamaConfig.tiny(n_heads=6, n_kv_heads=2, head_dim=16, n_layers=3),
               rngs=nnx.Rngs(0))


@pytest.mark.parametrize("ffn,heads", [(0.5, 0.0), (0.0, 1 / 3), (0.25, 2 / 3)])
def test_shrunk_model_has_smaller_arrays_and_the_masked_logits(model, ffn, heads):
  before = np.asarray(model.layers[0].mlp.up_proj.kernel[...]).copy()
  keep = llama_structured_keep(model, ffn_sparsity=ffn, head_sparsity=heads)
  small = shrink_llama(model, keep)
  masked = mask_llama(model, keep)
  f_keep, h_keep = 128 - round(ffn * 128), 2 * (3 - round(heads * 3))
  assert small.config.ffn_dim == f_keep and small.config.n_heads == h_keep
  assert small.layers[1].mlp.down_proj.kernel[...].shape == (f_keep, 64)
  assert small.layers[1].attn.q_proj.kernel[...].shape == (64, h_keep * 16)
  assert small.layers[1].attn.o_proj.kernel[...].shape == (h_keep * 16, 64)
  n_params = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
  assert n_params(small) < n_params(model) or (ffn, heads) == (0.0, 0.0)
  np.testing.assert_allclose(np.asarray(small(TOKENS)), np.asarray(masked(TOKENS)),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(model.layers[0].mlp.up_proj.kernel[...]), before)
  # Each KV group keeps the same number of query heads.
  assert all(len(set(np.asarray(h) // 3)) == 2 for h in keep.heads)


def test_pruned_channels_are_the_lowest_scoring(model):
  keep = llama_structured_keep(model, ffn_sparsity=0.5)
  block = model.layers[0].mlp
  sq = lambda a: np.square(np.asarray(a[...]))
  score = sq(block.gate_proj.kernel).sum(0) + sq(block.up_proj.kernel).sum(0) + sq(
      block.down_proj.kernel).sum(1)
  assert set(keep.ffn[0]) == set(np.argsort(score)[64:])


def test_drop_blocks(model):
  shallow = drop_blocks(model, [1])
  assert shallow.config.n_layers == 2
  np.testing.assert_array_equal(np.asarray(shallow.layers[1].mlp.up_proj.kernel[...]),
                                np.asarray(model.layers[2].mlp.up_proj.kernel[...]))
  hidden = model(TOKENS, return_hidden=True)[1]
  assert shallow(TOKENS).shape == (2, 12, 256) and len(hidden) == 3


def test_errors(model):
  with pytest.raises(ValueError, match="would prune every query head"):
    llama_structured_keep(model, head_sparsity=0.9)
  with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\)"):
    llama_structured_keep(model, ffn_sparsity=1.0)
  with pytest.raises(ValueError, match="block indices must be in"):
    drop_blocks(model, [3])
  with pytest.raises(ValueError, match="cannot drop every block"):
    drop_blocks(model, [0, 1, 2])
  with pytest.raises(TypeError, match="expected a jaxcomp.models.Llama"):
    shrink_llama(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), None)


def test_scanned_model_goes_through_the_same_surgery(model):
  from jaxcomp.models.llama import scan_layers  # pylint: disable=import-outside-toplevel
  scanned = scan_layers(model)
  keep = llama_structured_keep(scanned, ffn_sparsity=0.5)
  ref_keep = llama_structured_keep(model, ffn_sparsity=0.5)
  for a, b in zip(keep.ffn, ref_keep.ffn):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  small = shrink_llama(scanned, keep)  # every block keeps the same number of channels
  assert small.config.scan_layers and small.layers.mlp.down_proj.kernel[...].shape == (3, 64, 64)
  np.testing.assert_allclose(np.asarray(small(TOKENS)),
                             np.asarray(shrink_llama(model, ref_keep)(TOKENS)), rtol=1e-5,
                             atol=1e-5)
  shallow = drop_blocks(scanned, [1])
  assert shallow.config.n_layers == 2 and shallow.layers.mlp.up_proj.kernel[...].shape[0] == 2
  np.testing.assert_allclose(np.asarray(shallow(TOKENS)),
                             np.asarray(drop_blocks(model, [1])(TOKENS)), rtol=1e-5, atol=1e-5)
