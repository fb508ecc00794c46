"""Tests for jaxcomp.models.llama: shapes, exact references, RoPE layouts, axes."""

import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcomp.models import llama as llama_lib
from jaxcomp.models.llama import LOGICAL_AXES
from jaxcomp.models.llama import Llama
from jaxcomp.models.llama import LlamaConfig


@nnx.jit(static_argnames="return_hidden")
def _forward(model, tokens, positions=None, return_hidden=False):
  """One jitted forward, cached across tests that share a config."""
  return model(tokens, positions=positions, return_hidden=return_hidden)


def _tokens(shape=(2, 12), seed=1, vocab=256):
  return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


def _np_params(model):
  """{path string: float64 numpy array} for every param of `model`."""
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  return {"/".join(map(str, p)): np.asarray(v[...], np.float64) for p, v in flat}


# --------------------------------------------------------------------------
# numpy float64 reference of the whole model (HF LlamaForCausalLM semantics)
# --------------------------------------------------------------------------


def _np_rope(x, pos, theta):  # x [B, T, H, Dh], half layout
  d = x.shape[-1]
  inv = theta ** (-np.arange(0, d, 2) / d)
  ang = pos[..., None, None] * inv
  cos, sin = np.concatenate([np.cos(ang)] * 2, -1), np.concatenate([np.sin(ang)] * 2, -1)
  rot = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], -1)  # rotate_half
  return x * cos + rot * sin


def _np_rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def _np_llama(cfg, params, tokens):
  hd, g = cfg.resolved_head_dim, cfg.n_heads // cfg.n_kv_heads
  b, t = tokens.shape
  pos = np.broadcast_to(np.arange(t), (b, t))
  h = params["embed/embedding"][tokens]
  silu = lambda z: z / (1 + np.exp(-z))
  for i in range(cfg.n_layers):
    p = lambda name: params[f"layers/{i}/{name}"]
    x = _np_rms(h, p("attn_norm/scale"), cfg.norm_eps)
    q = (x @ p("attn/q_proj/kernel")).reshape(b, t, cfg.n_heads, hd)
    k = (x @ p("attn/k_proj/kernel")).reshape(b, t, cfg.n_kv_heads, hd)
    v = (x @ p("attn/v_proj/kernel")).reshape(b, t, cfg.n_kv_heads, hd)
    q, k = _np_rope(q, pos, cfg.rope_theta), _np_rope(k, pos, cfg.rope_theta)
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)  # HF repeat_kv
    s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(hd)
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = np.einsum("bhts,bshd->bthd", a, v).reshape(b, t, -1)
    h = h + o @ p("attn/o_proj/kernel")
    x = _np_rms(h, p("mlp_norm/scale"), cfg.norm_eps)
    m = silu(x @ p("mlp/gate_proj/kernel")) * (x @ p("mlp/up_proj/kernel"))
    h = h + m @ p("mlp/down_proj/kernel")
  h = _np_rms(h, params["norm/scale"], cfg.norm_eps)
  if cfg.tie_embeddings:
    return h @ params["embed/embedding"].T
  return h @ params["lm_head/kernel"]


def _randomize_norms(model, seed=0):
  """Non-trivial norm scales, so the reference check covers them."""
  norms = [n for _, n in nnx.iter_graph(model) if isinstance(n, llama_lib.RMSNorm)]
  for i, norm in enumerate(norms):
    key = jax.random.fold_in(jax.random.key(seed), i)
    norm.scale[...] = 1.0 + 0.5 * jax.random.normal(key, norm.scale.shape)


# --------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, tie", [(jnp.float32, False), (jnp.bfloat16, True)])
def test_output_shape_and_dtype(dtype, tie):
  cfg = LlamaConfig.tiny(dtype=dtype, tie_embeddings=tie)
  model = Llama(cfg, rngs=nnx.Rngs(0))
  logits, hiddens = _forward(model, _tokens((3, 10)), return_hidden=True)
  assert logits.shape == (3, 10, cfg.vocab_size)
  assert logits.dtype == dtype
  assert len(hiddens) == cfg.n_layers
  assert all(h.shape == (3, 10, cfg.dim) and h.dtype == dtype for h in hiddens)
  assert np.isfinite(np.asarray(logits, np.float32)).all()


@pytest.mark.parametrize("tie", [False, True])
def test_matches_float64_numpy_reference(tie):
  cfg = LlamaConfig.tiny(tie_embeddings=tie)
  model = Llama(cfg, rngs=nnx.Rngs(0))
  _randomize_norms(model)
  tokens = _tokens()
  got = np.asarray(_forward(model, tokens))
  want = _np_llama(cfg, _np_params(model), np.asarray(tokens))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


def test_causal():
  model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
  tokens = _tokens((2, 12))
  t = 5
  changed = tokens.at[:, t].set((tokens[:, t] + 1) % 256)
  a, b = np.asarray(_forward(model, tokens)), np.asarray(_forward(model, changed))
  np.testing.assert_array_equal(a[:, :t], b[:, :t])
  assert (np.abs(a[:, t:] - b[:, t:]).max(axis=-1) > 1e-6).all()


def test_tied_uses_embedding_and_untied_has_lm_head():
  tied = Llama(LlamaConfig.tiny(tie_embeddings=True), rngs=nnx.Rngs(0))
  untied = Llama(LlamaConfig.tiny(tie_embeddings=False), rngs=nnx.Rngs(0))
  assert not hasattr(tied, "lm_head")
  assert untied.lm_head.kernel.shape == (64, 256)
  n_tied = sum(x.size for x in jax.tree.leaves(nnx.state(tied, nnx.Param)))
  n_untied = sum(x.size for x in jax.tree.leaves(nnx.state(untied, nnx.Param)))
  assert n_untied - n_tied == 64 * 256

  tokens = _tokens()
  logits, hiddens = _forward(tied, tokens, return_hidden=True)
  h = tied.norm(hiddens[-1])
  np.testing.assert_allclose(logits, h @ tied.embed.embedding[...].T, atol=1e-6)


def test_gqa_equals_mha_with_repeated_kv_heads():
  gqa_cfg = LlamaConfig.tiny(n_heads=4, n_kv_heads=2)
  mha_cfg = dataclasses.replace(gqa_cfg, n_kv_heads=4)
  gqa = Llama(gqa_cfg, rngs=nnx.Rngs(0))
  mha = Llama(mha_cfg, rngs=nnx.Rngs(1))
  hd, g = gqa_cfg.resolved_head_dim, 2
  state = nnx.state(gqa, nnx.Param)
  for i in range(gqa_cfg.n_layers):
    for name in ("k_proj", "v_proj"):
      kernel = state["layers"][i]["attn"][name]["kernel"]
      heads = kernel[...].reshape(gqa_cfg.dim, gqa_cfg.n_kv_heads, hd)
      state["layers"][i]["attn"][name]["kernel"] = kernel.replace(
          jnp.repeat(heads, g, axis=1).reshape(gqa_cfg.dim, -1))
  nnx.update(mha, state)
  tokens = _tokens()
  np.testing.assert_allclose(_forward(mha, tokens), _forward(gqa, tokens), atol=1e-6)


def test_rope_half_equals_interleaved_with_permuted_qk():
  half_cfg = LlamaConfig.tiny(rope_style="half")
  inter_cfg = LlamaConfig.tiny(rope_style="interleaved")
  inter = Llama(inter_cfg, rngs=nnx.Rngs(0))
  half = Llama(half_cfg, rngs=nnx.Rngs(1))
  state = nnx.state(inter, nnx.Param)
  for i in range(inter_cfg.n_layers):
    attn = state["layers"][i]["attn"]
    for name, heads in (("q_proj", inter_cfg.n_heads), ("k_proj", inter_cfg.n_kv_heads)):
      kernel = attn[name]["kernel"]
      attn[name]["kernel"] = kernel.replace(
          llama_lib.permute_rope_kernel(kernel[...], heads, to="half"))
  nnx.update(half, state)
  tokens = _tokens()
  a, b = _forward(half, tokens), _forward(inter, tokens)
  np.testing.assert_allclose(a, b, atol=1e-5)
  # Not vacuous: without the permutation the two layouts disagree.
  nnx.update(half, nnx.state(inter, nnx.Param))
  assert np.abs(np.asarray(_forward(half, tokens)) - np.asarray(b)).max() > 1e-3


def test_permute_rope_kernel_roundtrip_and_pairs():
  kernel = np.arange(3 * 2 * 8).reshape(3, 16)  # 2 heads of Dh=8
  half = llama_lib.permute_rope_kernel(kernel, 2, to="half")
  np.testing.assert_array_equal(
      llama_lib.permute_rope_kernel(half, 2, to="interleaved"), kernel)
  # Interleaved pair (2i, 2i+1) of head h lands at (i, i + Dh/2).
  for h in range(2):
    for i in range(4):
      np.testing.assert_array_equal(half[:, h * 8 + i], kernel[:, h * 8 + 2 * i])
      np.testing.assert_array_equal(half[:, h * 8 + 4 + i], kernel[:, h * 8 + 2 * i + 1])


def test_rope_is_relative_in_positions():
  model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
  tokens = _tokens()
  shifted = jnp.broadcast_to(jnp.arange(12) + 37, tokens.shape)
  np.testing.assert_allclose(_forward(model, tokens, positions=shifted),
                             _forward(model, tokens), atol=1e-4)
  scaled = jnp.broadcast_to(jnp.arange(12) * 2, tokens.shape)
  assert np.abs(np.asarray(_forward(model, tokens, positions=scaled))
                - np.asarray(_forward(model, tokens))).max() > 1e-4


def test_module_paths_are_stable():
  model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
  linears = {p for p, n in nnx.iter_graph(model) if isinstance(n, nnx.Linear)}
  expected = {("layers", i, "attn", f"{x}_proj") for i in range(2) for x in "qkvo"}
  expected |= {("layers", i, "mlp", f"{x}_proj") for i in range(2)
               for x in ("gate", "up", "down")}
  assert linears == expected | {("lm_head",)}
  assert isinstance(model.embed, nnx.Embed)
  assert isinstance(model.layers, nnx.List)


@pytest.mark.parametrize("tie", [False, True])
def test_every_projection_goes_through_its_dot_general(tie):
  """A rewrite swaps `dot_general` on each nnx.Linear; all of them must be used."""
  model = Llama(LlamaConfig.tiny(tie_embeddings=tie), rngs=nnx.Rngs(0))
  called = []
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Linear):
      def recording_dot_general(*args, _path=path, **kwargs):
        called.append(_path)
        return jax.lax.dot_general(*args, **kwargs)
      node.dot_general = recording_dot_general
  tokens = _tokens((1, 4))
  want = np.asarray(_forward(model, tokens))
  n_linear = 7 * 2 + (0 if tie else 1)
  assert len(called) == len(set(called)) == n_linear
  # Zeroing one projection through the injection point changes the logits.
  model.layers[1].mlp.down_proj.dot_general = (
      lambda *a, **k: 0 * jax.lax.dot_general(*a, **k))
  assert np.abs(np.asarray(_forward(model, tokens)) - want).max() > 1e-6


@pytest.mark.parametrize("tie", [False, True])
def test_every_param_has_logical_axes(tie):
  model = Llama(LlamaConfig.tiny(tie_embeddings=tie), rngs=nnx.Rngs(0))
  flat = nnx.to_flat_state(nnx.state(model))
  assert len(flat) > 0
  found = {}
  for path, var in flat:
    names = var.get_metadata("out_sharding")
    assert isinstance(names, tuple) and len(names) == var[...].ndim, path
    assert set(names) <= set(LOGICAL_AXES), (path, names)
    found["/".join(map(str, path))] = names
  assert found["embed/embedding"] == ("vocab", "embed")
  assert found["layers/1/attn/q_proj/kernel"] == ("embed", "q_heads")
  assert found["layers/1/attn/k_proj/kernel"] == ("embed", "kv_heads")
  assert found["layers/1/attn/v_proj/kernel"] == ("embed", "kv_heads")
  assert found["layers/1/attn/o_proj/kernel"] == ("q_heads", "embed")
  assert found["layers/0/mlp/gate_proj/kernel"] == ("embed", "mlp")
  assert found["layers/0/mlp/up_proj/kernel"] == ("embed", "mlp")
  assert found["layers/0/mlp/down_proj/kernel"] == ("mlp", "embed")
  assert found["layers/0/attn_norm/scale"] == ("norm",)
  assert found["norm/scale"] == ("norm",)
  assert ("lm_head/kernel" in found) == (not tie)
  if not tie:
    assert found["lm_head/kernel"] == ("embed", "vocab")


def test_partition_specs_follow_rules():
  model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
  rules = (("vocab", "model"), ("embed", "fsdp"), ("q_heads", "model"),
           ("kv_heads", "model"), ("mlp", "model"), ("norm", None))
  with nnx.logical_axis_rules(rules):
    specs = nnx.get_partition_spec(nnx.state(model))
  P = jax.sharding.PartitionSpec
  assert specs["layers"][0]["attn"]["o_proj"]["kernel"].get_value() == P("model", "fsdp")
  assert specs["embed"]["embedding"].get_value() == P("model", "fsdp")
  assert specs["norm"]["scale"].get_value() == P(None)


def test_smollm2_135m_param_count():
  cfg = LlamaConfig.smollm2_135m()
  model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert n == 134_515_008
  assert model.layers[0].attn.k_proj.kernel.shape == (576, 192)


def test_bf16_params_track_float32():
  ref = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
  cfg = LlamaConfig.tiny(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
  assert model.layers[0].attn.q_proj.kernel.dtype == jnp.bfloat16
  nnx.update(model, jax.tree.map(lambda x: x.astype(jnp.bfloat16),
                                 nnx.state(ref, nnx.Param)))
  tokens = _tokens()
  got = np.asarray(_forward(model, tokens), np.float32)
  want = np.asarray(_forward(ref, tokens))
  assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


@pytest.mark.parametrize("overrides, field", [
    (dict(n_heads=4, n_kv_heads=3), "n_heads"),
    (dict(dim=66, n_heads=4), "dim"),
    (dict(head_dim=15), "head_dim"),
    (dict(head_dim=0), "head_dim"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(n_layers=-1), "n_layers"),
    (dict(ffn_dim=2.5), "ffn_dim"),
    (dict(rope_style="neox"), "rope_style"),
    (dict(rope_theta=0.0), "rope_theta"),
    (dict(norm_eps=-1.0), "norm_eps"),
    (dict(max_seq_len=0), "max_seq_len"),
    (dict(dtype=jnp.int32), "dtype"),
    (dict(param_dtype="not-a-dtype"), "param_dtype"),
])
def test_bad_config_names_the_field(overrides, field):
  with pytest.raises(ValueError, match=rf"^LlamaConfig\.{field}\b") as err:
    LlamaConfig.tiny(**overrides)
  assert "\n" not in str(err.value)


def test_config_is_frozen_and_keyword_only():
  cfg = LlamaConfig.tiny()
  assert cfg.resolved_head_dim == 16
  assert LlamaConfig.tiny(head_dim=8).resolved_head_dim == 8
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.dim = 8  # type: ignore[misc]
  with pytest.raises(TypeError):
    LlamaConfig(256, 64, 2, 4, 2, 128)  # type: ignore[misc]


def test_bad_inputs_raise():
  model = Llama(LlamaConfig.tiny(max_seq_len=8), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="max_seq_len"):
    model(jnp.zeros((1, 9), jnp.int32))
  with pytest.raises(ValueError, match="positions"):
    model(jnp.zeros((1, 4), jnp.int32), positions=jnp.arange(4))
