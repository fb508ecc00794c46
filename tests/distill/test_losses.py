"""Distillation losses against direct formulas, their gradients, masks and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcomp import distill

KEY = jax.random.key(0)
S = jax.random.normal(jax.random.key(1), (2, 5, 11)) * 3
T = jax.random.normal(jax.random.key(2), (2, 5, 11)) * 3


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_logit_kd_is_t2_kl_and_its_gradient_is_t_times_prob_difference(temperature):
  s, t = np.asarray(S, np.float64), np.asarray(T, np.float64)
  ps, pt = _softmax(s / temperature), _softmax(t / temperature)
  want = temperature**2 * np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), -1))
  got = distill.logit_kd(S, T, temperature=temperature)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  grad = jax.grad(lambda x: distill.logit_kd(x, T, temperature=temperature))(S)
  np.testing.assert_allclose(np.asarray(grad), temperature * (ps - pt) / 10, rtol=1e-4,
                             atol=1e-6)
  assert not np.any(jax.grad(lambda t: distill.logit_kd(S, t))(T))  # teacher is frozen


def test_kd_loss_mixes_kd_and_cross_entropy():
  labels = jax.random.randint(KEY, (2, 5), 0, 11)
  ce = distill.cross_entropy(S, labels)
  logp = jax.nn.log_softmax(S, -1)
  np.testing.assert_allclose(float(ce), -float(jnp.mean(jnp.take_along_axis(
      logp, labels[..., None], -1))), rtol=1e-6)
  for alpha in (0.0, 0.3, 1.0):
    loss, parts = distill.kd_loss(S, T, labels, temperature=2.0, alpha=alpha)
    np.testing.assert_allclose(float(loss), alpha * float(parts["kd"])
                               + (1 - alpha) * float(parts["ce"]), rtol=1e-6)
  np.testing.assert_allclose(float(distill.kd_loss(S, T, labels, alpha=0.0)[0]), float(ce),
                             rtol=1e-6)


def test_mask_ignores_padding_tokens():
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
  garbage = S.at[0, 3:].set(1e4)  # masked positions may hold anything
  got = distill.logit_kd(garbage, T, mask=mask)
  kept = jnp.concatenate([S[0, :3], S[1]])[None]
  want = distill.logit_kd(kept, jnp.concatenate([T[0, :3], T[1]])[None])
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


def test_topk_with_the_whole_vocabulary_is_logit_kd():
  np.testing.assert_allclose(float(distill.topk_logit_kd(S, T, k=11, temperature=2.0)),
                             float(distill.logit_kd(S, T, temperature=2.0)), rtol=1e-5)
  assert float(distill.topk_logit_kd(S, T, k=3)) >= 0


def test_hidden_loss_mse_and_cosine():
  hs = jax.random.normal(KEY, (2, 5, 6))
  ht = jax.random.normal(jax.random.key(3), (2, 5, 8))
  proj = jax.random.normal(jax.random.key(4), (6, 8))
  want = np.mean((np.asarray(hs) @ np.asarray(proj) - np.asarray(ht)) ** 2)
  np.testing.assert_allclose(float(distill.hidden_loss(hs, ht, proj)), want, rtol=1e-5)
  np.testing.assert_allclose(float(distill.hidden_loss(ht, 3 * ht, kind="cosine")), 0.0,
                             atol=1e-6)
  np.testing.assert_allclose(float(distill.hidden_loss(ht, -ht, kind="cosine")), 2.0, rtol=1e-6)


def test_attention_loss_pools_heads():
  logits = jax.random.normal(KEY, (1, 4, 3, 3))
  p4 = jax.nn.softmax(logits, -1)
  p2 = p4.reshape(1, 2, 2, 3, 3).mean(2)
  assert float(distill.attention_loss(p4, p2)) == pytest.approx(0.0, abs=1e-6)
  assert float(distill.attention_loss(p4, jax.nn.softmax(-logits, -1))) > 0.01


@pytest.mark.parametrize("call,match", [
    (lambda: distill.logit_kd(S, T[..., :7]), r"student vocabulary \(11\) differs from the "
     r"teacher's \(7\)"),
    (lambda: distill.kd_loss(S, T, jnp.zeros((2, 5), jnp.int32), alpha=1.5),
     r"alpha must be in \[0, 1\], got 1.5"),
    (lambda: distill.logit_kd(S, T, temperature=0.0), "temperature must be > 0"),
    (lambda: distill.topk_logit_kd(S, T, k=0), r"k must be in \[1, 11\], got 0"),
    (lambda: distill.hidden_loss(S, T, kind="l1"), "kind must be 'mse' or 'cosine'"),
    (lambda: distill.hidden_loss(S, T[..., :4]), "student width 11 != teacher width 4"),
    (lambda: distill.attention_loss(jnp.ones((1, 3, 2, 2)), jnp.ones((1, 2, 2, 2))),
     "3 student heads and 2 teacher heads"),
])
def test_bad_input_is_one_line(call, match):
  with pytest.raises(ValueError, match=match):
    call()
