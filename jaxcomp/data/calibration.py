"""Calibration sets as data: named text sources mixed by weight, and text the model writes itself.

A calibration set is ``n_seq`` windows of ``seq_len`` tokens. `calibration_set` draws them from
a mixture of sources with exact counts (`mix_counts`: the weights, normalized, times ``n_seq``,
rounded by largest remainder, so the counts sum to ``n_seq``):

* ``"wikitext2_valid"``: WikiText-2's validation split (../shared/data/wikitext-2);
* ``"austen"``: the six Jane Austen novels (Debian's ``r-cran-janeaustenr``, fetched once);
* any other name: a UTF-8 text file at that path;
* ``"self"``: sequences sampled from the float model itself (`self_generated`; data-free
  calibration, as LLM-QAT generates its distillation data), cached on disk.

Windows of a text source start at seeded random positions (GPTQ's sampling of C4); the mixed
set is then shuffled by the same seed. A missing file, an unknown source, zero sequences or a
text too short is a one-line ValueError naming it.

Example::

  tokens = calibration_set(tok, {"wikitext2_valid": 0.5, "self": 0.5}, n_seq=128,
                           seq_len=512, model=model)          # int32[128, 512]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcomp.eval import perplexity as ppl_lib
from jaxcomp.models.llama import generate

TEXT_SOURCES = ("wikitext2_valid", "austen")
SELF = "self"


@dataclasses.dataclass(frozen=True)
class Generation:
  """How `self_generated` samples: softmax ``temperature`` (0: greedy), nucleus ``top_p``,
  ``first_token`` ("random": uniform over the vocabulary, as LLM-QAT starts its samples; an
  int: that token, e.g. BOS), ``greedy_tokens`` tokens after it taken greedily before sampling
  starts (LLM-QAT's hybrid; Liu et al., 2023), ``suppress_special``: never sample the
  tokenizer's special (control) tokens, rows per generation call ``batch_size``. With
  ``schedule_tokens`` > 0 the first that many sampled tokens follow a linear temperature
  schedule from ``temperature_start`` towards ``temperature`` (self-calibration's schedule:
  varied starts, then fluent text; Williams et al., 2025)."""

  temperature: float = 1.0
  top_p: float = 1.0
  first_token: str | int = "random"
  greedy_tokens: int = 0
  suppress_special: bool = True
  batch_size: int = 16
  temperature_start: float = 1.0
  schedule_tokens: int = 0

  def __post_init__(self):
    if self.temperature < 0 or not 0 < self.top_p <= 1:
      raise ValueError(f"Generation: temperature must be >= 0 and top_p in (0, 1]; got "
                       f"{self.temperature}, {self.top_p}")
    if self.first_token != "random" and (isinstance(self.first_token, bool) or
                                         not isinstance(self.first_token, int)):
      raise ValueError(f"Generation.first_token must be 'random' or a token id, got "
                       f"{self.first_token!r}")
    if self.greedy_tokens < 0:
      raise ValueError(f"Generation.greedy_tokens must be >= 0, got {self.greedy_tokens}")
    if self.batch_size < 1:
      raise ValueError(f"Generation.batch_size must be >= 1, got {self.batch_size}")
    if self.schedule_tokens < 0 or self.temperature_start < 0:
      raise ValueError(f"Generation: schedule_tokens and temperature_start must be >= 0; got "
                       f"{self.schedule_tokens}, {self.temperature_start}")

  def temperatures(self) -> list[float]:
    """The temperature of each sampled token in turn (the last holds for the rest): the
    schedule's ``schedule_tokens`` values, then ``temperature``.

    Example:
      >>> Generation(temperature=1.0, temperature_start=2.0, schedule_tokens=4).temperatures()
      [2.0, 1.75, 1.5, 1.25, 1.0]
    """
    n, t0, t1 = self.schedule_tokens, self.temperature_start, self.temperature
    return [t0 + (t1 - t0) * i / n for i in range(n)] + [t1]

  def suppressed(self, tokenizer: Any) -> list[int]:
    """The ids `self_generated` must not sample: ``tokenizer``'s special ids
    (`special_ids`) with ``suppress_special``, else none."""
    return special_ids(tokenizer) if self.suppress_special else []


def parse_sources(spec: str, field: str) -> dict[str, float]:
  """``"name:weight,..."`` -> ``{name: weight}`` (a name without a weight weighs 1); a
  malformed part is a one-line ValueError naming ``field``.

  Example:
    >>> parse_sources("wikitext2_valid:3, austen", "calib.sources")
    {'wikitext2_valid': 3.0, 'austen': 1.0}
  """
  out: dict[str, float] = {}
  for part in [p.strip() for p in str(spec).split(",") if p.strip()]:
    name, weight = part.rsplit(":", 1) if ":" in part else (part, "1")
    try:
      out[name.strip()] = float(weight)
    except ValueError:
      raise ValueError(f"{field}: {part!r} is not name:weight") from None
  return out


def mix_counts(weights: Mapping[str, float], n: int) -> dict[str, int]:
  """Sequences per source: ``n * w / sum(w)`` rounded by largest remainder (ties: the order
  given), so the counts sum to ``n`` exactly.

  Example:
    >>> mix_counts({"a": 1, "b": 1, "c": 1}, 8)
    {'a': 3, 'b': 3, 'c': 2}
  """
  if not weights:
    raise ValueError("calibration: no sources")
  bad = [k for k, w in weights.items() if not (isinstance(w, (int, float)) and w >= 0)]
  if bad or sum(weights.values()) <= 0:
    raise ValueError(f"calibration: source weights must be >= 0 with a positive sum; got "
                     f"{dict(weights)}")
  total = float(sum(weights.values()))
  exact = {k: n * w / total for k, w in weights.items()}
  counts = {k: int(np.floor(v)) for k, v in exact.items()}
  order = sorted(exact, key=lambda k: -(exact[k] - counts[k]))  # stable: ties keep order
  for k in order[:n - sum(counts.values())]:
    counts[k] += 1
  return counts


def text_windows(ids: np.ndarray, n_seq: int, seq_len: int, seed: int, name: str) -> np.ndarray:
  """``n_seq`` windows of ``seq_len`` tokens of ``ids`` at seeded random starts, int32."""
  if len(ids) < seq_len + 1:
    raise ValueError(f"calibration source {name!r} has {len(ids)} tokens, fewer than one "
                     f"window of {seq_len}")
  starts = np.random.default_rng(seed).integers(0, len(ids) - seq_len, n_seq)
  return np.stack([ids[s:s + seq_len] for s in starts]).astype(np.int32).reshape(n_seq, seq_len)


def source_text(name: str) -> str:
  """The text of a named source or a file path (one-line ValueError when missing)."""
  if name == "wikitext2_valid":
    path = ppl_lib.WIKITEXT2_DIR / "valid.txt"
  elif name == "austen":
    from jaxcomp.data.austen import austen_text  # pylint: disable=import-outside-toplevel
    return austen_text()
  else:
    path = pathlib.Path(name)
  if not path.is_file():
    raise ValueError(f"calibration source {name!r}: no text file at {path} (sources: "
                     f"{', '.join(TEXT_SOURCES)}, {SELF!r} or a path)")
  return path.read_text(encoding="utf-8")


def _model_digest(model: nnx.Module) -> str:
  """A digest of the model's parameter shapes and values (sums of each leaf, float64)."""
  h = hashlib.sha256()
  for path, leaf in sorted(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                           key=lambda kv: str(kv[0])):
    x = leaf.get_value()
    h.update(f"{path}{x.shape}{x.dtype}".encode())
    h.update(np.asarray(jnp.sum(jnp.abs(x.astype(jnp.float32))), np.float64).tobytes())
    h.update(np.asarray(jnp.sum(x.astype(jnp.float32)), np.float64).tobytes())
  return h.hexdigest()


def self_generated(model: Any, n_seq: int, seq_len: int, *, seed: int = 0,
                   generation: Generation = Generation(), suppress: Sequence[int] = (),
                   cache_dir: str | os.PathLike | None = None) -> np.ndarray:
  """``n_seq`` sequences of ``seq_len`` tokens sampled from ``model`` itself (data-free
  calibration): each starts from a first token (`Generation.first_token`) and continues
  with `jaxcomp.models.generate` (KV cache, ``temperature`` / ``top_p``), ``batch_size`` rows
  a call; the ``suppress`` ids are never sampled (`calibration_set` passes the tokenizer's
  special tokens when `Generation.suppress_special`). The same seed gives the same tokens.
  With ``cache_dir`` the result is stored as ``self_<digest>.npy`` (the digest covers the
  model's parameters, the settings, ``suppress`` and the seed) and later calls read it back
  instead of generating.

  Returns:
    int32 [n_seq, seq_len].

  Example::

    calib = self_generated(model, 128, 512, generation=Generation(top_p=0.95))
  """
  if n_seq < 1 or seq_len < 2:
    raise ValueError(f"self_generated: n_seq must be >= 1 and seq_len >= 2; got {n_seq}, {seq_len}")
  if generation.greedy_tokens >= seq_len - 1:
    raise ValueError(f"self_generated: greedy_tokens={generation.greedy_tokens} leaves nothing "
                     f"to sample in {seq_len} tokens")
  suppress = sorted(set(int(i) for i in suppress))
  path = None
  if cache_dir is not None:
    settings = dataclasses.asdict(generation)
    del settings["suppress_special"]  # ``suppress`` holds its effect
    if not settings["greedy_tokens"]:
      del settings["greedy_tokens"]  # the keys written before the field existed stay valid
    if not settings["schedule_tokens"]:
      del settings["schedule_tokens"], settings["temperature_start"]  # (the same)
    key = json.dumps({"model": _model_digest(model), "n_seq": n_seq, "seq_len": seq_len,
                      "seed": seed, **settings}, sort_keys=True)
    if suppress:
      key += json.dumps({"suppress": suppress})
    path = pathlib.Path(cache_dir) / f"self_{hashlib.sha256(key.encode()).hexdigest()[:16]}.npy"
    if path.is_file():
      return np.load(path)
  vocab = model.config.vocab_size
  rng = jax.random.key(seed)
  rows = []
  for start in range(0, n_seq, generation.batch_size):
    b = min(generation.batch_size, n_seq - start)
    rng, k_first, k_gen = jax.random.split(rng, 3)
    if generation.first_token == "random":
      first = jax.random.randint(k_first, (b, 1), 0, vocab, jnp.int32)
    else:
      first = jnp.full((b, 1), generation.first_token, jnp.int32)
    if generation.greedy_tokens:
      first = generate(model, first, generation.greedy_tokens, suppress=suppress)
    temps = generation.temperatures()
    rows.append(np.asarray(generate(model, first, seq_len - first.shape[1],
                                    temperature=temps, top_p=generation.top_p,
                                    key=k_gen if max(temps) > 0 else None,
                                    suppress=suppress)))
  out = np.concatenate(rows).astype(np.int32)
  if path is not None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, out)
    os.replace(tmp, path)  # never a half-written cache entry
  return out


def special_ids(tokenizer: Any) -> list[int]:
  """The ids of ``tokenizer``'s special (control) tokens: a Hugging Face ``tokenizers``
  tokenizer's added tokens marked special (`gguf_tokenizer` marks the GGUF's control tokens);
  none for a tokenizer without added tokens (`ByteTokenizer`).

  Example::

    special_ids(gguf_tokenizer(path))   # SmolLM2: [0, 1, ..., 16]
  """
  added = getattr(tokenizer, "get_added_tokens_decoder", None)
  return [] if added is None else sorted(i for i, t in added().items() if t.special)


def calibration_set(tokenizer: Any, sources: Mapping[str, float], *, n_seq: int, seq_len: int,
                    seed: int = 0, model: Any = None, generation: Generation = Generation(),
                    cache_dir: str | os.PathLike | None = None) -> np.ndarray:
  """A calibration set of ``n_seq`` windows of ``seq_len`` tokens mixed from ``sources``
  (name -> weight; counts from `mix_counts`), shuffled by ``seed``.

  Args:
    tokenizer: ``encode(text).ids`` (text sources).
    sources: e.g. ``{"wikitext2_valid": 1.0}``, ``{"austen": 1, "self": 1}``, a file path.
    n_seq, seq_len: the set's shape.
    seed: window starts, generation and the final shuffle.
    model: the float model, for ``"self"``.
    generation, cache_dir: for ``"self"`` (`self_generated`).

  Returns:
    int32 [n_seq, seq_len].

  Example::

    tokens = calibration_set(tok, {"wikitext2_valid": 3, "austen": 1}, n_seq=128, seq_len=512)
  """
  if not isinstance(n_seq, int) or n_seq < 1:
    raise ValueError(f"calibration: n_seq must be a positive int, got {n_seq!r}")
  counts = mix_counts(dict(sources), n_seq)
  parts = []
  for i, (name, count) in enumerate(counts.items()):
    if count == 0:
      continue
    if name == SELF:
      if model is None:
        raise ValueError("calibration source 'self' needs the float model (model=)")
      parts.append(self_generated(model, count, seq_len, seed=seed + i, generation=generation,
                                  suppress=generation.suppressed(tokenizer),
                                  cache_dir=cache_dir))
    else:
      ids = np.asarray(tokenizer.encode(source_text(name)).ids, np.int32)
      parts.append(text_windows(ids, count, seq_len, seed + i, name))
  out = np.concatenate(parts)
  return out[np.random.default_rng(seed).permutation(len(out))]
