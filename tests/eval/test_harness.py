"""The evaluation harness on tiny models: LM and classifier reports, sizes of packed and
sparse models, FLOPs, Linen pairs, derived scores and the comparison's table and plots."""

import json
import os
import pathlib
import subprocess
import sys
import time

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcomp as jc
from jaxcomp.eval import compare, harness
from jaxcomp.models.llama import Llama, LlamaConfig
from jaxcomp.models.vision import CNN, CNNConfig

PROJ = r".*(q|k|v|o|gate|up|down)_proj"


@pytest.fixture(scope="module")
def lm():
  return Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def ids():
  return np.random.default_rng(0).integers(0, 256, 600).astype(np.int32)


def test_lm_report_has_every_section_and_consistent_numbers(lm, ids):
  sentences = [list(ids[i:i + 7]) for i in range(0, 560, 7)]
  items = harness.cloze_items(sentences, n_items=8, seed=1)
  r = harness.evaluate_lm(lm, ids, seq_len=64, batch_size=4, cloze=items, latency_repeats=2)
  q = r["quality"]
  assert q["ppl"] == pytest.approx(np.exp(q["nll"]))
  assert 0.0 <= q["accuracy"] <= 1.0 and 0.0 <= q["cloze_accuracy"] <= 1.0
  assert r["size"]["params"] == sum(x.size for x in jax.tree.leaves(nnx.state(lm, nnx.Param)))
  assert r["size"]["bits_per_param"] == 32.0
  assert r["speed"]["p50_ms"] > 0 and r["speed"]["env"]["backend"] == "cpu"
  assert set(r["robustness"]) == {"substitute", "delete", "score"}
  assert 0.0 < r["robustness"]["score"] <= 1.0
  again = harness.evaluate_lm(lm, ids, seq_len=64, batch_size=4, rates=(), latency_repeats=1)
  assert again["quality"] == {k: q[k] for k in ("ppl", "nll", "accuracy", "tokens")}
  d = harness.derived_scores(r, r)
  assert (d["quality_ratio"], d["lat"], d["pe"], d["band"]) == (1.0, 1.0, 1.0, "low")
  assert d["pareto_score"] == pytest.approx(0.5)


def test_cloze_scores_each_choice_by_its_own_mean_log_likelihood(lm, ids):
  sentences = [list(ids[i:i + 3 + i % 5]) for i in range(0, 400, 8)]
  items = harness.cloze_items(sentences, n_items=12, n_choices=3, seed=2)

  def mean_loglik(context, choice):  # one unpadded row at its own length
    row = jnp.asarray([context + choice], jnp.int32)
    logp = jax.nn.log_softmax(lm(row).astype(jnp.float32)[0, :-1], axis=-1)
    picked = np.asarray(jnp.take_along_axis(logp, row[0, 1:, None], axis=-1)[:, 0])
    return picked[len(context) - 1:].mean()

  expected = np.mean([np.argmax([mean_loglik(it["context"], c) for c in it["choices"]])
                      == it["answer"] for it in items])
  # rows (at most 14 tokens) are scored at width 16, not seq_len, and agree with the reference
  assert harness.cloze_accuracy(lm, items, seq_len=256, batch_size=8) == expected
  assert harness.cloze_accuracy(lm, items, seq_len=16, batch_size=5) == expected


def test_side_by_side_latency_interleaves_the_calls():
  log = []

  def call(name, seconds):
    def fn(x):
      log.append(name)
      time.sleep(seconds)
      return x
    return fn, (jnp.zeros(2),)
  speeds = harness.measure_latency_side_by_side(
      {"a": call("a", 0.0), "b": call("b", 0.02)}, items_per_call=4, warmup=1, repeats=3)
  assert log == ["a", "b"] + ["a", "b"] * 3  # warm-up, then one of each per round
  assert speeds["b"]["calls"] == 3 and speeds["b"]["p50_ms"] >= 20.0  # sleep is a lower bound
  assert speeds["a"]["interleaved_with"] == ["b"] and speeds["a"]["env"]["backend"] == "cpu"
  with pytest.raises(ValueError, match="repeats must be >= 1"):
    harness.measure_latency_side_by_side({"a": call("a", 0.0)}, items_per_call=1, repeats=0)


def test_next_token_accuracy_of_a_model_that_knows_the_text():
  class Oracle(nnx.Module):  # predicts token + 1 (mod V): right on an arithmetic stream
    def __call__(self, tokens):
      return jax.nn.one_hot((tokens + 1) % 16, 16) * 10.0
  ids = np.arange(200) % 16
  assert harness.evaluate_lm(Oracle(), ids, seq_len=32, rates=(), latency_repeats=1,
                             vocab_size=16)["quality"]["accuracy"] == 1.0
  # Substituted inputs, clean targets: a fraction of the predictions go wrong.
  noisy = jc.eval.perplexity.perplexity(
      Oracle(), ids, seq_len=32, input_ids=harness.perturb_tokens(ids, 0.5, kind="substitute",
                                                                  vocab_size=16))
  assert 0.3 < noisy["accuracy"] < 0.7


def test_size_of_packed_and_sparse_models(lm, ids):
  calib = ids[:512].reshape(8, 64)
  recipe = jc.Recipe([jc.Rule(PROJ, quant=jc.Quant(w_bits=4, group=32))])
  packed = jc.convert(jc.ptq(lm, recipe, calib))
  dense, small = harness.stored_size(lm), harness.stored_size(packed)
  assert small["params"] == dense["params"]
  proj = sum(v.size for p, v in nnx.to_flat_state(nnx.state(lm, nnx.Param))
             if p[-2].endswith("_proj"))
  # 4-bit codes (two a byte) + one f32 scale per 32 weights of each projection.
  expected = dense["bytes"] - 4 * proj + proj // 2 + 4 * proj // 32
  assert small["bytes"] == expected
  pruned = jc.prune(lm, jc.Recipe([jc.Rule(PROJ, sparsity=jc.Sparsity("2:4"))]), calib)
  s = harness.stored_size(pruned)
  assert s["params"] - s["nonzero_params"] == proj // 2
  f_dense, f_sparse = harness.flops_per_token(lm), harness.flops_per_token(pruned)
  assert f_dense - f_sparse == pytest.approx(2 * proj / 2)


def test_flops_count_a_tied_head_and_attention():
  cfg = LlamaConfig.tiny(tie_embeddings=True)
  m = Llama(cfg, rngs=nnx.Rngs(0))
  mats = sum(2 * v.size for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))
             if p[-1] == "kernel")
  assert harness.flops_per_token(m) == mats + 2 * cfg.vocab_size * cfg.dim
  hd = cfg.dim // cfg.n_heads
  assert harness.flops_per_token(m, context=63) - harness.flops_per_token(m) == (
      cfg.n_layers * 4 * cfg.n_heads * hd * 32)


class LinenLM(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    h = nn.Embed(32, 16)(tokens)
    return nn.Dense(32)(nn.relu(nn.Dense(24)(h)))


def test_a_linen_pair_is_evaluated_like_an_nnx_model():
  module = LinenLM()
  tokens = jnp.zeros((1, 8), jnp.int32)
  variables = module.init(jax.random.key(0), tokens)
  ids = np.random.default_rng(0).integers(0, 32, 300)
  r = harness.evaluate_lm((module, variables), ids, seq_len=32, vocab_size=32,
                          latency_repeats=1)
  logits = module.apply(variables, jnp.asarray(ids[None, :32]))
  nll = -jax.nn.log_softmax(logits[0, :-1])[np.arange(31), ids[1:32]]
  assert r["size"]["params"] == 32 * 16 + 16 * 24 + 24 + 24 * 32 + 32
  assert r["flops_per_token"] == 2 * (16 * 24 + 24 * 32)
  first = jc.eval.perplexity.perplexity((harness.as_nnx((module, variables))),
                                        ids[:32], seq_len=32)
  assert first["nll"] == pytest.approx(float(nll.mean()), rel=1e-5)
  with pytest.raises(TypeError, match="Linen \\(module, variables\\) pair"):
    harness.as_nnx(module)


def test_classifier_report_and_comparison_plots(tmp_path):
  cnn = CNN(CNNConfig.tiny(), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  images = rng.normal(size=(40, 28, 28, 1)).astype(np.float32)
  labels = rng.integers(0, 10, 40)
  base = harness.evaluate_classifier(cnn, images, labels, batch_size=16, latency_repeats=2)
  assert base["quality"]["examples"] == 40
  assert set(base["robustness"]["noise"]) == {"0.1", "0.2", "0.4"}
  pruned = jc.prune(cnn, jc.Recipe([jc.Rule("fc1", sparsity=jc.Sparsity("unstructured", sparsity=0.9))]))
  small = harness.evaluate_classifier(pruned, images, labels, batch_size=16,
                                      latency_repeats=2)
  assert small["size"]["sparsity"] > 0.5
  for name, r in (("dense", base), ("pruned", small)):
    harness.write_report(r, tmp_path / name, title=name)
  reports = {n: compare.find_report(tmp_path / n) for n in ("dense", "pruned")}
  rows = compare.compare(reports, out_dir=tmp_path / "cmp")
  assert [r["run"] for r in rows] == ["dense", "pruned"]
  assert rows[0]["quality_ratio"] == 1.0  # the largest run is the baseline
  assert any(r["frontier"] for r in rows)
  for png in ("quality_vs_size.png", "quality_vs_latency.png"):
    data = (tmp_path / "cmp" / png).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
  table = (tmp_path / "cmp" / "comparison.md").read_text()
  assert "| dense |" in table and "| pruned |" in table
  assert json.loads((tmp_path / "cmp" / "comparison.json").read_text())[1]["run"] == "pruned"
  # The same through the CLI.
  cli = subprocess.run(
      [sys.executable, "-m", "jaxcomp", "compare", str(tmp_path / "dense"),
       str(tmp_path / "pruned"), "--out", str(tmp_path / "cli"), "--weights", "1,0,0"],
      cwd=pathlib.Path(__file__).parents[2], env={**os.environ, "JAX_PLATFORMS": "cpu"},
      capture_output=True, text=True, check=False)
  assert cli.returncode == 0, cli.stderr[-2000:]
  assert "frontier:" in cli.stdout and (tmp_path / "cli" / "quality_vs_size.png").is_file()
  bad = subprocess.run(
      [sys.executable, "-m", "jaxcomp", "compare", str(tmp_path / "missing")],
      cwd=pathlib.Path(__file__).parents[2], env={**os.environ, "JAX_PLATFORMS": "cpu"},
      capture_output=True, text=True, check=False)
  assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0
  assert "no evaluation report" in bad.stderr
  with pytest.raises(ValueError, match="no evaluation report"):
    compare.find_report(tmp_path / "missing")
  with pytest.raises(ValueError, match="baseline 'x' is not one of the runs"):
    compare.compare(reports, baseline="x")


def test_packed_stacked_layers_count_like_the_unrolled_model():
  """Scanned blocks: the packed kernels' leaves carry the stack axis (`dequantize_stacked`)."""
  from jaxcomp.models.llama import scan_layers  # pylint: disable=import-outside-toplevel
  recipe = jc.Recipe([jc.Rule(r"layers/(\d+/)?(attn|mlp)/\w+_proj",
                              quant=jc.Quant(w_bits=4, group=32))])
  model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
  flat = jc.convert(jc.quantize(model, recipe))
  stacked = jc.convert(jc.quantize(scan_layers(model), recipe))
  assert harness.stored_size(stacked) == harness.stored_size(flat)
  assert harness.flops_per_token(stacked) == pytest.approx(harness.flops_per_token(flat))
  w = harness.dequantize_stacked(stacked.layers.attn.q_proj.kernel[...])
  np.testing.assert_array_equal(np.asarray(w[1]),
                                np.asarray(flat.layers[1].attn.q_proj.kernel[...].dequantize()))
