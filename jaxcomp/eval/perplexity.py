r"""Language-model perplexity over a token stream, in fixed-length windows.

The stream ``x_0 .. x_{N-1}`` is cut into windows of at most ``seq_len``
tokens; each window is run through the model on its own (no state carried
between windows), and token ``x_t`` is scored in exactly one window ``w(t)``:

.. math::
  \mathrm{nll} = \frac{1}{|S|} \sum_{t \in S}
      -\log p_\theta(x_t \mid x_{b(t)}, \dots, x_{t-1}),
  \qquad \mathrm{ppl} = e^{\mathrm{nll}}

with ``b(t)`` the first token of ``w(t)`` and ``S`` the scored tokens.

* ``stride=None`` -- non-overlapping windows ``[0, L), [L, 2L), ...``; the first
  token of every window has no context and is not scored (Hugging Face's
  convention with ``stride == max_length``), so ``|S| = N - #windows``.
* ``stride=s`` (``1 <= s <= L``) -- Hugging Face's strided perplexity
  (https://huggingface.co/docs/transformers/perplexity): windows start at
  ``0, s, 2s, ...`` and each scores only the tokens that the previous window
  did not reach (its last ``s``); the first window scores all but its first
  token. For ``s < L`` every token but ``x_0`` is scored once, with at least
  ``L - s`` tokens of context, ``|S| = N - 1``; ``s = L`` is the
  non-overlapping case.

Windows are padded to ``seq_len`` and masked, so the jitted forward pass
compiles once per ``(batch_size, seq_len)``; the log-softmax is float32
whatever the model's dtype.

Example::

  model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
  ids = np.random.default_rng(0).integers(0, 256, 1000)
  perplexity(model, ids, seq_len=128, batch_size=4)
  # {'ppl': 257.26..., 'nll': 5.550..., 'tokens': 992}
"""

from __future__ import annotations

import functools
import math
import os
import pathlib
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "WIKITEXT2_DIR",
    "perplexity",
    "read_text",
    "wikitext2",
    "window_spans",
]

# WikiText-2 (tokenized variant: `<unk>`, ` @-@ `), one file per split.
WIKITEXT2_DIR = pathlib.Path("/work/shared/data/wikitext-2")


def window_spans(n_tokens: int, seq_len: int,
                 stride: int | None = None) -> list[tuple[int, int, int]]:
  """The windows :func:`perplexity` evaluates, as ``(begin, end, first_scored)``.

  Window ``k`` feeds tokens ``[begin, end)`` and scores the tokens at
  positions ``begin + first_scored .. end - 1`` (``first_scored >= 1``).
  Windows that would score nothing are left out.

  Example::

    window_spans(10, 4)               # [(0, 4, 1), (4, 8, 1), (8, 10, 1)]
    window_spans(10, 4, stride=2)     # [(0, 4, 1), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
  """
  if seq_len < 2:
    raise ValueError(f"seq_len must be >= 2, got {seq_len}")
  if stride is not None and not 1 <= stride <= seq_len:
    raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
  spans = []
  if stride is None:
    for begin in range(0, n_tokens, seq_len):
      end = min(begin + seq_len, n_tokens)
      if end - begin >= 2:
        spans.append((begin, end, 1))
    return spans
  prev_end = 0
  for begin in range(0, n_tokens, stride):
    end = min(begin + seq_len, n_tokens)
    first = max(prev_end - begin, 1)
    if first < end - begin:
      spans.append((begin, end, first))
    prev_end = end
    if end == n_tokens:
      break
  return spans


# Positions per output-head chunk: the [rows, V] float32 logits of one chunk stay small
# (128 x 49152 x 4 B = 25 MB for SmolLM2), instead of [B, L, V] at once (0.8 GB at B=8,
# L=512), which made the log-softmax memory-bound (1.4x slower evaluation on CPU).
_HEAD_ROWS = 128


def _nll_terms(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``-log softmax(logits)[targets]`` in float32 and whether the arg-max is the target:
  ``[..., V], int[...] -> ([...], bool[...])``."""
  logits = logits.astype(jnp.float32)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return (jax.nn.logsumexp(logits, axis=-1) - target_logit,
          jnp.argmax(logits, axis=-1) == targets)


@functools.partial(jax.jit, static_argnums=0)
def _window_nll(graphdef: nnx.GraphDef, state: nnx.State, inputs: jax.Array, tokens: jax.Array,
                mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Summed NLL, arg-max hits and count of the masked tokens of ``tokens: int32[B, L]``.

  The model reads ``inputs: int32[B, L]`` (``tokens`` itself, or a perturbed copy whose
  predictions are scored against the clean ``tokens``). ``mask: bool[B, L]`` marks the scored
  tokens; position ``j`` is predicted by the logits at ``j - 1`` (``mask[:, 0]`` is ignored). A
  model with a ``head(hidden) -> logits`` method and ``return_hidden=True`` (e.g.
  :class:`~jaxcomp.models.Llama`) is run to its last hidden state and the head
  is applied ``_HEAD_ROWS`` positions at a time; any other model's full logits
  are used.
  """
  model = nnx.merge(graphdef, state)
  b, length = tokens.shape
  # Position j predicts token j + 1; the last position predicts nothing (masked out).
  targets = jnp.concatenate([tokens[:, 1:], jnp.zeros((b, 1), tokens.dtype)], axis=1)
  m = jnp.concatenate([mask[:, 1:], jnp.zeros((b, 1), bool)], axis=1)
  if not callable(getattr(model, "head", None)):
    nll, hit = _nll_terms(model(inputs), targets)
    return jnp.sum(jnp.where(m, nll, 0.0)), jnp.sum(m & hit), jnp.sum(m)
  _, hiddens = model(inputs, return_hidden=True)
  h = hiddens[-1].reshape(b * length, -1)
  pad = -(b * length) % _HEAD_ROWS
  chunks = lambda a: jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)).reshape(
      (-1, _HEAD_ROWS) + a.shape[1:])
  nll, hit = jax.lax.map(lambda a: _nll_terms(model.head(a[0]), a[1]),
                         (chunks(h), chunks(targets.reshape(-1))))
  m = chunks(m.reshape(-1))
  return jnp.sum(jnp.where(m, nll, 0.0)), jnp.sum(m & hit), jnp.sum(m)


def perplexity(model: nnx.Module, token_ids: Any, *, seq_len: int,
               stride: int | None = None, batch_size: int = 8,
               input_ids: Any = None) -> dict[str, float | int]:
  """Perplexity of ``model`` on the token stream ``token_ids`` (see the module docstring).

  Args:
    model: maps ``int32[B, T]`` tokens to ``[B, T, V]`` logits (e.g.
      :class:`~jaxcomp.models.Llama`, quantized or not).
    token_ids: ``int[N]`` token stream (list, numpy or jax array).
    seq_len: ``L``, tokens fed per window.
    stride: ``None`` for non-overlapping windows, else the HF sliding-window
      stride ``1 <= stride <= seq_len``.
    batch_size: windows per forward pass; the last batch is padded.
    input_ids: ``int[N]``, what the model reads in place of ``token_ids`` (a perturbed copy,
      for robustness); predictions are scored against ``token_ids``. None: ``token_ids``.

  Returns:
    ``{"ppl": exp(nll), "nll": mean NLL in nats, "accuracy": next-token arg-max accuracy,
    "tokens": |S|}``.

  Example::

    perplexity(model, ids, seq_len=512)                 # non-overlapping
    perplexity(model, ids, seq_len=512, stride=256)     # sliding window
  """
  ids = np.asarray(token_ids)
  if ids.ndim != 1:
    raise ValueError(f"token_ids must be 1-D, got shape {ids.shape}")
  fed = ids if input_ids is None else np.asarray(input_ids)
  if fed.shape != ids.shape:
    raise ValueError(f"input_ids must have token_ids' shape {ids.shape}, got {fed.shape}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  max_len = getattr(getattr(model, "config", None), "max_seq_len", None)
  if max_len is not None and seq_len > max_len:
    raise ValueError(f"seq_len={seq_len} exceeds the model's max_seq_len={max_len}")
  spans = window_spans(len(ids), seq_len, stride)
  if not spans:
    raise ValueError(f"need at least 2 tokens to score, got {len(ids)}")
  n_windows = -(-len(spans) // batch_size) * batch_size
  tokens = np.zeros((n_windows, seq_len), np.int32)
  inputs = np.zeros((n_windows, seq_len), np.int32)
  mask = np.zeros((n_windows, seq_len), bool)
  for k, (begin, end, first) in enumerate(spans):
    tokens[k, :end - begin] = ids[begin:end]
    inputs[k, :end - begin] = fed[begin:end]
    mask[k, first:end - begin] = True

  graphdef, state = nnx.split(model)
  total, hits, count = 0.0, 0, 0
  for k in range(0, n_windows, batch_size):
    rows = slice(k, k + batch_size)
    nll, hit, n = _window_nll(graphdef, state, jnp.asarray(inputs[rows]),
                              jnp.asarray(tokens[rows]), jnp.asarray(mask[rows]))
    total += float(nll)
    hits += int(hit)
    count += int(n)
  mean = total / count
  return {"ppl": math.exp(mean), "nll": mean, "accuracy": hits / count, "tokens": count}


def read_text(path: str | os.PathLike) -> str:
  """The UTF-8 contents of a text file, unchanged (newlines kept).

  Example::

    text = read_text("/work/shared/data/wikitext-2/valid.txt")
  """
  return pathlib.Path(path).read_text(encoding="utf-8")


def wikitext2(split: str = "test", *, root: str | os.PathLike = WIKITEXT2_DIR) -> str:
  """WikiText-2 ``split`` (``"valid"`` or ``"test"``) as one string, file contents as is.

  The files are the tokenized variant (``<unk>`` for rare words, `` @-@ ``
  for hyphens, a space around punctuation), lines joined by ``\\n``;
  perplexities on it are not comparable to ones on ``wikitext-2-raw``.

  Example::

    text = wikitext2("test")          # 1.26M characters, 4358 lines
  """
  if split not in ("valid", "test"):
    raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
  path = pathlib.Path(root) / f"{split}.txt"
  if not path.is_file():
    raise ValueError(f"WikiText-2 split {split!r} not found at {path}")
  return read_text(path)
