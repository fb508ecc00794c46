"""Calibration sets as data (jaxcomp/data/calibration.py): mixing weights honoured exactly,
self-generated text deterministic per seed and cached, bad sources in one line."""

import hypothesis
import jax
import hypothesis.strategies as st
import numpy as np
import pytest
import tokenizers
from flax import nnx

from jaxcomp.data import calibration
from jaxcomp.models.io import ByteTokenizer
from jaxcomp.models.llama import Llama, LlamaConfig, generate


@hypothesis.settings(max_examples=100, deadline=None)
@hypothesis.given(st.lists(st.floats(0, 10), min_size=1, max_size=6), st.integers(1, 300))
def test_mix_counts_sum_to_n_and_stay_within_one_of_the_exact_share(weights, n):
  hypothesis.assume(sum(weights) > 0)
  w = {f"s{i}": x for i, x in enumerate(weights)}
  counts = calibration.mix_counts(w, n)
  assert sum(counts.values()) == n
  for k, x in w.items():
    assert abs(counts[k] - n * x / sum(weights)) < 1


def test_each_source_gives_exactly_its_count(tmp_path):
  (tmp_path / "a.txt").write_text("a" * 5000)
  (tmp_path / "b.txt").write_text("b" * 5000)
  (tmp_path / "c.txt").write_text("c" * 5000)
  tok = ByteTokenizer()
  sources = {str(tmp_path / "a.txt"): 3, str(tmp_path / "b.txt"): 1, str(tmp_path / "c.txt"): 0}
  x = calibration.calibration_set(tok, sources, n_seq=20, seq_len=16, seed=3)
  assert x.shape == (20, 16) and x.dtype == np.int32
  firsts = x[:, 0].tolist()
  assert firsts.count(ord("a")) == 15 and firsts.count(ord("b")) == 5
  assert firsts != sorted(firsts)  # shuffled
  np.testing.assert_array_equal(
      x, calibration.calibration_set(tok, sources, n_seq=20, seq_len=16, seed=3))


def test_self_generated_is_deterministic_cached_and_mixable(tmp_path, monkeypatch):
  model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
  gen = calibration.Generation(temperature=1.0, top_p=0.9, batch_size=3)
  a = calibration.self_generated(model, 5, 12, seed=1, generation=gen, cache_dir=tmp_path)
  assert a.shape == (5, 12) and a.dtype == np.int32 and len(list(tmp_path.glob("*.npy"))) == 1
  b = calibration.self_generated(model, 5, 12, seed=1, generation=gen)
  np.testing.assert_array_equal(a, b)  # the same seed, the same tokens (no cache involved)
  c = calibration.self_generated(model, 5, 12, seed=2, generation=gen)
  assert not np.array_equal(a, c)

  def boom(*args, **kwargs):
    raise AssertionError("generated again instead of reading the cache")

  monkeypatch.setattr(calibration, "generate", boom)
  np.testing.assert_array_equal(
      a, calibration.self_generated(model, 5, 12, seed=1, generation=gen, cache_dir=tmp_path))
  monkeypatch.undo()
  greedy = calibration.self_generated(model, 2, 8, generation=calibration.Generation(
      temperature=0.0, first_token=7))
  assert (greedy[:, 0] == 7).all()
  (tmp_path / "t.txt").write_text("z" * 3000)
  mixed = calibration.calibration_set(ByteTokenizer(), {str(tmp_path / "t.txt"): 1, "self": 1},
                                      n_seq=6, seq_len=12, model=model, generation=gen)
  assert (mixed[:, 0] == ord("z")).sum() >= 3 and mixed.shape == (6, 12)


@pytest.mark.parametrize("sources, kw, message", [
    ({"/no/such/file.txt": 1}, {}, "calibration source '/no/such/file.txt': no text file"),
    ({"wikitext2_valid": 1}, {"n_seq": 0}, "n_seq must be a positive int, got 0"),
    ({"self": 1}, {}, "calibration source 'self' needs the float model"),
    ({"wikitext2_valid": 0}, {}, "weights must be >= 0 with a positive sum"),
    ({}, {}, "calibration: no sources"),
])
def test_bad_sources_are_one_line(sources, kw, message):
  with pytest.raises(ValueError, match=message):
    calibration.calibration_set(ByteTokenizer(), sources, **{"n_seq": 4, "seq_len": 8, **kw})


def test_a_text_shorter_than_a_window_is_named(tmp_path):
  (tmp_path / "short.txt").write_text("abc")
  with pytest.raises(ValueError, match="short.txt' has 3 tokens, fewer than one window of 8"):
    calibration.calibration_set(ByteTokenizer(), {str(tmp_path / "short.txt"): 1}, n_seq=2,
                                seq_len=8)


def test_hybrid_greedy_start_and_suppressed_tokens():
  model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
  gen = calibration.Generation(first_token=5, greedy_tokens=3, batch_size=4)
  x = calibration.self_generated(model, 4, 16, seed=0, generation=gen)
  greedy = np.asarray(generate(model, np.full((1, 1), 5, np.int32), 3))
  np.testing.assert_array_equal(x[:, :4], np.repeat(greedy, 4, axis=0))  # LLM-QAT's start
  assert len({tuple(r) for r in x[:, 4:]}) > 1  # then sampled
  banned = sorted(set(x[:, 1:].ravel().tolist()))  # every token the unsuppressed run used
  y = calibration.self_generated(model, 4, 16, seed=0, generation=gen, suppress=banned)
  assert not np.isin(y[:, 1:], banned).any()
  with pytest.raises(ValueError, match="greedy_tokens=15 leaves nothing to sample"):
    calibration.self_generated(model, 1, 16, generation=calibration.Generation(greedy_tokens=15))
  with pytest.raises(ValueError, match="suppress holds ids outside the vocabulary"):
    generate(model, np.zeros((1, 1), np.int32), 2, suppress=[model.config.vocab_size])


def test_temperature_schedule_samples_each_step_at_its_temperature():
  """A schedule [0, 0, 1]: the first two new tokens greedy, the rest sampled at T=1 (the
  same draws as a plain T=1 run from that point on, since each step has its own key)."""
  model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
  prompt = np.full((3, 1), 7, np.int32)
  key = jax.random.key(4)
  x = np.asarray(generate(model, prompt, 10, temperature=[0.0, 0.0, 1.0], key=key))
  greedy = np.asarray(generate(model, prompt, 2))
  np.testing.assert_array_equal(x[:, :3], greedy)
  assert len({tuple(r) for r in x[:, 3:]}) > 1
  cold = calibration.Generation(temperature=1.0, temperature_start=0.0, schedule_tokens=4)
  assert cold.temperatures() == [0.0, 0.25, 0.5, 0.75, 1.0]
  a = calibration.self_generated(model, 4, 12, seed=1, generation=cold)
  np.testing.assert_array_equal(a, calibration.self_generated(model, 4, 12, seed=1,
                                                              generation=cold))
  assert not np.array_equal(a, calibration.self_generated(model, 4, 12, seed=1))
  with pytest.raises(ValueError, match="schedule_tokens and temperature_start must be >= 0"):
    calibration.Generation(schedule_tokens=-1)
  with pytest.raises(ValueError, match="temperature must be >= 0"):
    generate(model, prompt, 2, temperature=[1.0, -1.0], key=key)


def test_special_ids_are_the_added_special_tokens():
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "b": 1}, unk_token="a"))
  tok.add_special_tokens([tokenizers.AddedToken("<s>", special=True)])
  tok.add_tokens([tokenizers.AddedToken("plain", special=False)])
  assert calibration.special_ids(tok) == [2]
  assert calibration.special_ids(ByteTokenizer()) == []
