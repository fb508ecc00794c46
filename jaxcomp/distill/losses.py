"""Knowledge-distillation losses on arrays (no Flax): logits, top-k logits, hidden states,
attention maps.

Every loss takes an optional ``mask`` (``[B, T]``, 1 where a token counts) and returns the
mean over counted tokens, so padding never dilutes it.

* `logit_kd`: Hinton et al. (2015): ``T^2 KL(softmax(t / T) || softmax(s / T))``; the ``T^2``
  keeps its gradient scale independent of the temperature. `kd_loss` mixes it with the
  cross-entropy on the labels: ``alpha * KD + (1 - alpha) * CE``.
* `topk_logit_kd`: the same KL restricted to the teacher's ``k`` most likely tokens (teacher
  probabilities renormalised over them, student log-probabilities from its full softmax):
  what a stored top-k teacher cache allows.
* `hidden_loss`: a student hidden state, mapped by a learned projection to the teacher's
  width, matched to the teacher's (MSE, or 1 - cosine similarity) (Sun et al. 2019,
  Jiao et al. 2020).
* `attention_loss`: KL between teacher and student attention distributions of a layer,
  averaged over heads and queries (Wang et al. 2020, MiniLM).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _masked_mean(per_token: Array, mask: Array | None) -> Array:
  if mask is None:
    return jnp.mean(per_token)
  mask = mask.astype(per_token.dtype)
  return jnp.sum(per_token * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _check_vocab(student: Array, teacher: Array) -> None:
  if student.shape[-1] != teacher.shape[-1]:
    raise ValueError(f"distillation: student vocabulary ({student.shape[-1]}) differs from the "
                     f"teacher's ({teacher.shape[-1]}); logit distillation needs one vocabulary")


def logit_kd(student_logits: Array, teacher_logits: Array, *, temperature: float = 1.0,
             mask: Array | None = None) -> Array:
  """``T^2 KL(p_teacher^T || p_student^T)`` per token, averaged.

  Args:
    student_logits, teacher_logits: ``[..., V]`` (the teacher is not differentiated).
    temperature: softening ``T > 0``.
    mask: ``[...]`` token weights (0/1), or None.

  Returns:
    Scalar float32.

  Example:
    >>> s = jnp.array([[1.0, 2.0, 3.0]])
    >>> float(logit_kd(s, s))
    0.0
  """
  _check_vocab(student_logits, teacher_logits)
  if temperature <= 0:
    raise ValueError(f"distillation temperature must be > 0, got {temperature}")
  t = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature
  s = student_logits.astype(jnp.float32) / temperature
  log_pt, log_ps = jax.nn.log_softmax(t, -1), jax.nn.log_softmax(s, -1)
  kl = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), -1)
  return temperature**2 * _masked_mean(kl, mask)


def cross_entropy(logits: Array, labels: Array, *, mask: Array | None = None) -> Array:
  """Next-token cross-entropy, ``logits [..., V]``, ``labels int[...]``, averaged.

  Example:
    >>> float(cross_entropy(jnp.zeros((1, 4)), jnp.array([2])))  # log 4
    1.386...
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
  nll = -jnp.take_along_axis(logp, labels[..., None], -1)[..., 0]
  return _masked_mean(nll, mask)


def kd_loss(student_logits: Array, teacher_logits: Array, labels: Array, *,
            temperature: float = 2.0, alpha: float = 0.5,
            mask: Array | None = None) -> tuple[Array, dict[str, Array]]:
  """``alpha * logit_kd + (1 - alpha) * cross_entropy`` and both parts.

  Args:
    student_logits, teacher_logits: ``[B, T, V]``.
    labels: ``int[B, T]`` next tokens.
    temperature: KD softening; alpha: weight of the KD term in [0, 1] (0: plain fine-tuning).
    mask: ``[B, T]`` or None.

  Returns:
    ``(loss, {"kd": ..., "ce": ...})``.

  Example:
    >>> logits = jnp.zeros((1, 2, 4))
    >>> loss, parts = kd_loss(logits, logits, jnp.array([[0, 1]]), alpha=0.5)
    >>> round(float(loss), 4), round(float(parts["kd"]), 4)
    (0.6931, 0.0)
  """
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"distillation alpha must be in [0, 1], got {alpha}")
  kd = logit_kd(student_logits, teacher_logits, temperature=temperature, mask=mask)
  ce = cross_entropy(student_logits, labels, mask=mask)
  return alpha * kd + (1.0 - alpha) * ce, {"kd": kd, "ce": ce}


def topk_logit_kd(student_logits: Array, teacher_logits: Array, *, k: int,
                  temperature: float = 1.0, mask: Array | None = None) -> Array:
  """KL over the teacher's top ``k`` tokens (renormalised there), ``T^2``-scaled.

  Example:
    >>> t = jnp.array([[4.0, 3.0, -9.0, -9.0]])
    >>> round(float(topk_logit_kd(t, t, k=2)), 4)  # almost no mass outside the top 2
    0.0
    >>> round(float(topk_logit_kd(jnp.zeros((1, 4)), t, k=2)), 4)  # uniform student
    0.8041
  """
  _check_vocab(student_logits, teacher_logits)
  if not 0 < k <= teacher_logits.shape[-1]:
    raise ValueError(f"top-k distillation: k must be in [1, {teacher_logits.shape[-1]}], got {k}")
  t = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature
  top, idx = jax.lax.top_k(t, k)
  log_pt = jax.nn.log_softmax(top, -1)
  log_ps = jnp.take_along_axis(
      jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, -1), idx, -1)
  kl = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), -1)
  return temperature**2 * _masked_mean(kl, mask)


def hidden_loss(student_hidden: Array, teacher_hidden: Array, projection: Array | None = None,
                *, kind: str = "mse", mask: Array | None = None) -> Array:
  """Distance of ``student_hidden @ projection`` to ``teacher_hidden``, per token, averaged.

  Args:
    student_hidden: ``[B, T, Ds]``; teacher_hidden: ``[B, T, Dt]``.
    projection: ``[Ds, Dt]`` (learned), or None when ``Ds == Dt``.
    kind: "mse" (mean squared error over features) or "cosine" (1 - cosine similarity).

  Example:
    >>> h = jnp.ones((1, 2, 3))
    >>> float(hidden_loss(h, 2 * h, kind="cosine"))
    0.0
  """
  if projection is not None:
    student_hidden = student_hidden.astype(jnp.float32) @ projection.astype(jnp.float32)
  if student_hidden.shape[-1] != teacher_hidden.shape[-1]:
    raise ValueError(f"hidden-state distillation: student width {student_hidden.shape[-1]} != "
                     f"teacher width {teacher_hidden.shape[-1]}; give a projection")
  s = student_hidden.astype(jnp.float32)
  t = jax.lax.stop_gradient(teacher_hidden).astype(jnp.float32)
  if kind == "mse":
    per_token = jnp.mean((s - t) ** 2, -1)
  elif kind == "cosine":
    cos = jnp.sum(s * t, -1) / (jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(t, axis=-1) + 1e-8)
    per_token = 1.0 - cos
  else:
    raise ValueError(f"hidden-state distillation kind must be 'mse' or 'cosine', got {kind!r}")
  return _masked_mean(per_token, mask)


def attention_loss(student_probs: Array, teacher_probs: Array, *,
                   mask: Array | None = None) -> Array:
  """``KL(teacher || student)`` of attention rows, averaged over heads and queries.

  Args:
    student_probs, teacher_probs: ``[B, H, T, S]`` attention distributions (rows sum to 1);
      head counts may differ only if one divides the other (heads are averaged in groups
      down to the smaller count).
    mask: ``[B, T]`` query weights, or None.

  Example:
    >>> p = jnp.full((1, 2, 3, 3), 1 / 3)
    >>> float(attention_loss(p, p))
    0.0
  """
  hs, ht = student_probs.shape[1], teacher_probs.shape[1]
  if max(hs, ht) % min(hs, ht):
    raise ValueError(f"attention distillation: {hs} student heads and {ht} teacher heads: one "
                     "count must divide the other")

  def pool(p, h):  # average groups of heads down to h
    b, n, t, s = p.shape
    return p.reshape(b, h, n // h, t, s).mean(2)

  h = min(hs, ht)
  s = pool(student_probs.astype(jnp.float32), h)
  t = pool(jax.lax.stop_gradient(teacher_probs).astype(jnp.float32), h)
  eps = 1e-9
  kl = jnp.sum(t * (jnp.log(t + eps) - jnp.log(s + eps)), -1)  # [B, H, T]
  return _masked_mean(jnp.mean(kl, 1), mask)
