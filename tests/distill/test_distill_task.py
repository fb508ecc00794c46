"""The distillation task end to end on a tiny teacher: students of every variant train, the
2:4 pattern and QAT survive, KD and CE-only differ only in the loss, the teacher is frozen."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from jaxcomp.distill.task import DistillTask, attention_probs, layer_map
from jaxcomp.models import Llama, LlamaConfig
from jaxcomp.train.loop import train

sys.path.insert(0, "configs")
import smollm2_distill  # noqa: E402  pylint: disable=wrong-import-position


def _config(variant, files, tmp_path, **distill):
  cfg = smollm2_distill.get_config(variant)
  cfg.data.files = f"{files[0]},{files[1]}"
  cfg.data.data_dir = str(tmp_path / "tfds")
  cfg.eval.text_path = str(files[2])
  for k, v in distill.items():
    cfg.distill[k] = v
  return cfg


def test_w4_2of4_student_keeps_its_pattern_and_reports(tmp_path, text_files):
  cfg = _config("w4_2of4,tiny", text_files, tmp_path)
  report = train(cfg, str(tmp_path / "run"))
  assert report["sparsity"] == 0.5 and report["steps"] == 12
  assert np.isfinite(report["eval_ppl"]) and np.isfinite(report["teacher_eval_ppl"])
  # The trained student (final checkpoint): every group of 4 consecutive inputs of every
  # projection keeps exactly 2 weights; the QAT steps (LSQ) were trained.
  state = ocp.StandardCheckpointer().restore(tmp_path / "run" / "checkpoints" / "12" / "default")
  layers = state["params"]["student"]["layers"]
  kernels = [m[name]["kernel"] for layer in layers.values() for m in layer.values()
             if isinstance(m, dict) for name in m if name.endswith("_proj")]
  assert len(kernels) == 7 * 2
  for k in kernels:
    k = np.asarray(k["value"] if isinstance(k, dict) else k)
    assert k.ndim == 2, k.shape
    nonzero = (k.reshape(k.shape[0] // 4, 4, k.shape[1]) != 0).sum(1)
    assert (nonzero == 2).all()
  steps = [m[name]["dot_general"]["w_step"] for layer in layers.values() for m in layer.values()
           if isinstance(m, dict) for name in m if name.endswith("_proj")]
  assert len(steps) == 14


def test_kd_and_ce_only_train_differently_and_teacher_ppl_is_the_same(tmp_path, text_files):
  kd = train(_config("depth15,tiny", text_files, tmp_path), str(tmp_path / "kd"))
  ce = train(_config("depth15,tiny,ce", text_files, tmp_path), str(tmp_path / "ce"))
  assert kd["teacher_eval_ppl"] == ce["teacher_eval_ppl"]
  assert kd["eval_ppl"] != ce["eval_ppl"]


def test_hidden_and_attention_terms_train_the_projections(tmp_path, text_files):
  cfg = _config("svd_llm_30,tiny", text_files, tmp_path, hidden_weight=1.0,
                attention_weight=1.0, top_k=8)
  cfg.teacher.dtype = "bfloat16"  # the memory-saving teacher
  task = DistillTask()
  data = task.data(cfg)
  model = task.model(cfg, rngs=nnx.Rngs(0))
  frozen = task.frozen(cfg)
  assert {x.dtype for x in jax.tree.leaves(frozen)} == {jnp.dtype(jnp.bfloat16)}
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  batch = jax.tree.map(jnp.asarray, data.batch_at(0))

  def loss(p):
    return task.loss(nnx.merge(graphdef, p, rest), batch, None, frozen)

  (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params)
  assert set(metrics) == {"kd", "ce", "hidden", "attention"}
  assert all(np.isfinite(float(v)) for v in metrics.values())
  proj_grad = grads["projections"][0]["kernel"][...]
  assert float(jnp.abs(proj_grad).max()) > 0
  # A projection starts as the identity (same width), so the hidden term starts at the
  # student-teacher gap of the factorized layers only.
  np.testing.assert_array_equal(np.asarray(model.projections[0].kernel[...]), np.eye(64))


def test_attention_probs_are_causal_distributions():
  model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
  h = model.embed(jnp.arange(6)[None])
  p = attention_probs(model, h, 0)
  assert p.shape == (1, 4, 6, 6)
  np.testing.assert_allclose(np.asarray(p.sum(-1)), 1.0, rtol=1e-5)
  assert float(jnp.triu(p[0, 0], 1).max()) == 0.0
  assert layer_map(15, 30)[-1] == 29 and layer_map(30, 30) == list(range(30))


def test_bad_distill_config_is_one_line(tmp_path, text_files):
  cfg = _config("depth15,tiny", text_files, tmp_path)
  cfg.teacher.dtype = "int8"
  with pytest.raises(ValueError, match="teacher.dtype must be 'float32' or 'bfloat16'"):
    train(cfg, str(tmp_path / "a"))
  cfg = _config("depth15,tiny", text_files, tmp_path)
  cfg.data.corpus = "c4"
  with pytest.raises(ValueError, match="data.corpus must be one of austen, wikitext2 or 'files'"):
    train(cfg, str(tmp_path / "b"))
  with pytest.raises(ValueError, match="unknown modifier 'kd'"):
    smollm2_distill.get_config("w4_2of4,kd")


def test_scanned_distillation_step_equals_the_unrolled_one(tmp_path, text_files):
  """`config.model.scan_layers`: teacher and student keep stacked blocks (the 2:4 Wanda stage
  walks the stack, the QAT steps gain the stack axis) and the distillation loss and its
  gradients (the step, under `jax.grad` of a merged model) equal the unrolled model's."""
  out = {}
  for scan in (False, True):
    cfg = _config("w4_2of4,tiny", text_files, tmp_path / str(scan))
    cfg.model.scan_layers = scan
    task = DistillTask()
    model = task.model(cfg, rngs=nnx.Rngs(0))
    frozen = task.frozen(cfg)
    batch = {k: jnp.asarray(v) for k, v in task.data(cfg).batch_at(0).items()}
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss = lambda p: task.loss(nnx.merge(graphdef, p, rest), batch, None, frozen)[0]
    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    up = grads["student"]["layers"]
    up = up["mlp"]["up_proj"]["kernel"] if scan else [up[i]["mlp"]["up_proj"]["kernel"]
                                                       for i in range(len(up))]
    out[scan] = float(value), np.stack([np.asarray(g[...]) for g in up]) if not scan else (
        np.asarray(up[...]))
  assert out[True][0] == pytest.approx(out[False][0], rel=1e-5)
  np.testing.assert_allclose(out[True][1], out[False][1], rtol=1e-3, atol=1e-6)


def test_mixed_training_rows_take_exact_counts_from_text_and_the_teacher(tmp_path, text_files):
  """``data.sources`` mixes packed text rows and sequences sampled from the teacher (LLM-QAT's
  data-free KD) in the exact counts of the weights; bad mixes are one-line errors."""
  from jaxcomp.data import calibration, text  # pylint: disable=import-outside-toplevel
  from jaxcomp.distill.task import DistillTask  # pylint: disable=import-outside-toplevel
  cfg = _config("depth15,tiny", text_files, tmp_path)
  cfg.data.sources = "files:1,self:2"
  cfg.data.mix_rows = 9
  cfg.data.generation = dict(temperature=1.0, top_p=0.9, first_token="random", batch_size=4)
  task = DistillTask()
  rows = np.asarray(task.data(cfg).rows.tokens)
  assert rows.shape == (9, cfg.data.seq_len + 1) and rows.dtype == np.int32
  packed = np.asarray(text.packed_tokens(cfg.data.data_dir, text.files_config(
      cfg.data.files_name, {"train": cfg.data.files.split(",")}), "train",
      task._tokenizer, seq_len=cfg.data.seq_len).tokens)  # pylint: disable=protected-access
  assert all(any(np.array_equal(r, p) for p in packed) for r in rows[:3])  # 3 text rows
  sampled = calibration.self_generated(  # 6 rows from the teacher, cached and reused
      task._base, 6, cfg.data.seq_len + 1, seed=cfg.seed + 1,  # pylint: disable=protected-access
      generation=calibration.Generation(top_p=0.9, batch_size=4),
      cache_dir=tmp_path / "tfds" / "jaxcomp_self")
  np.testing.assert_array_equal(rows[3:], sampled)
  cfg.train.update(steps=3, warmup_steps=1, checkpoint_every=3)
  assert np.isfinite(train(cfg, str(tmp_path / "mix"))["eval_ppl"])
  for change, message in ((dict(mix_rows=0), "data.sources needs data.mix_rows"),
                          (dict(sources="files:1,c4:1"), "data.sources names must be one of"),
                          (dict(sources="files:x"), "data.sources: 'files:x' is not name:weight")):
    bad = _config("depth15,tiny", text_files, tmp_path)
    bad.data.sources, bad.data.mix_rows = "files:1", 4
    for k, v in change.items():
      setattr(bad.data, k, v)
    with pytest.raises(ValueError, match=message):
      DistillTask().data(bad)
