"""Stage pipelines (`configs/smollm2_pipeline.py`, `jaxcomp.experiments.pipeline`) on the tiny
model: orders, resume, invalidation and one-line errors."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

from flax import nnx
import jax
import numpy as np
import pytest

import jaxcomp as jc
from jaxcomp.eval import compare
from jaxcomp.experiments import pipeline
from jaxcomp.models.zoo import load_model

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "configs"))
import smollm2_pipeline  # noqa: E402  pylint: disable=wrong-import-position
import smollm2_ptq  # noqa: E402  pylint: disable=wrong-import-position


def _config(variant, texts, **overrides):
  config = smollm2_pipeline.get_config(variant + ",tiny")
  config.calib.text = str(texts / "train.txt")
  config.eval.text_path = str(texts / "eval.txt")
  config.eval.rates = (0.1,)
  for k, v in overrides.items():
    setattr(config, k, v)
  return config


def _restored(workdir, config, upto):
  """The model saved by stage ``upto``, restored through the stages' structures."""
  base, _ = load_model(config)
  return pipeline.restore_stage_output(base, pipeline.plan(config),
                                       pathlib.Path(workdir) / "stages", upto)


def _proj_kernels(model):
  return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
          if "_proj" in "/".join(map(str, p)) and p[-1] == "kernel"}


@pytest.fixture(scope="module")
def pq_run(texts, tmp_path_factory):
  """An uninterrupted in-process run of p_q on the tiny model: its workdir and report."""
  work = tmp_path_factory.mktemp("pq_run") / "p_q"
  return work, pipeline.run_pipeline(_config("p_q", texts), str(work))


def test_two_orders_give_the_expected_models(texts, pq_run, tmp_path):
  work, pq = pq_run
  q = pipeline.run_pipeline(_config("q_only", texts), str(tmp_path / "q_only"))
  assert [s["name"] for s in pq["stages"]] == ["prune", "gptq", "convert", "eval"]
  # 2:4 zeros survive GPTQ and packing: half the projection weights are exactly zero.
  pruned = _restored(work, _config("p_q", texts), 0)
  for k in _proj_kernels(pruned).values():
    assert (k == 0).mean() == pytest.approx(0.5)
  solved = _restored(work, _config("p_q", texts), 1)
  for path, k in _proj_kernels(solved).items():
    assert np.all(k[_proj_kernels(pruned)[path] == 0] == 0), path
  packed = _restored(work, _config("p_q", texts), 2)
  tokens = np.arange(32, dtype=np.int32)[None] % 200
  np.testing.assert_array_equal(np.asarray(packed(tokens)), np.asarray(jc.convert(solved)(tokens)))
  assert pq["size"]["sparsity"] > q["size"]["sparsity"] + 0.2
  assert pq["size"]["bytes"] == q["size"]["bytes"]  # same packed format
  for r in (pq, q):
    assert r["scores"]["quality_ratio"] == pytest.approx(r["baseline"]["ppl"] / r["quality"]["ppl"])
  # The finished runs compare.
  for w, r in ((work, pq), (tmp_path / "q_only", q)):
    (w / "report.json").write_text(json.dumps(r))
  rows = compare.compare({"p_q": compare.find_report(work),
                          "q_only": compare.find_report(tmp_path / "q_only")})
  assert {r["run"] for r in rows} == {"p_q", "q_only"}
  # `python -m jaxcomp eval --workdir` re-evaluates the final (packed) model of a run.
  again = pipeline.evaluate_workdir(str(work))
  assert again["quality"] == pq["quality"]
  assert (work / "eval" / "report.json").is_file()


def test_an_interrupted_run_resumes_at_its_first_unfinished_stage(texts, pq_run, tmp_path):
  _, full = pq_run
  # Interrupted after stage 1: the first two stages' outputs are on disk, nothing else.
  part = pipeline.run_pipeline(_config("p_q", texts, stages="prune,gptq"), str(tmp_path / "two"))
  assert [s["name"] for s in part["stages"]] == ["prune", "gptq"]
  marker = tmp_path / "two" / "stages" / "0_prune" / "done.json"
  before = marker.stat().st_mtime_ns
  resumed = pipeline.run_pipeline(_config("p_q", texts), str(tmp_path / "two"))
  assert marker.stat().st_mtime_ns == before  # stage 0 was not run again
  assert resumed["quality"] == full["quality"]
  assert resumed["size"] == full["size"]
  # A changed stage is refused, naming it; redo runs it and every later stage.
  changed = _config("p_q", texts)
  changed.stage.gptq.recipe = jc.Recipe([jc.Rule(smollm2_pipeline.PROJ, quant=jc.Quant(
      w_bits=3, group=32, method="gptq", options={"keep_zeros": True}))]).to_config()
  with pytest.raises(ValueError, match=r"stage 1 \(gptq\) changed since it ran .* redo stages 1-3"):
    pipeline.run_pipeline(changed, str(tmp_path / "two"))
  changed.redo = True
  redone = pipeline.run_pipeline(changed, str(tmp_path / "two"))
  assert marker.stat().st_mtime_ns == before
  assert redone["quality"]["ppl"] != full["quality"]["ppl"]


@pytest.mark.parametrize("change, message", [
    (dict(stages="prune,nope"), r"stage 1 'nope' has no section config.stage.nope"),
    (dict(stages="convert,eval"), r"stage 0 'convert': convert needs a ptq or quantize stage"),
    (dict(stages=""), r"config.stages is empty"),
])
def test_bad_stage_lists_are_refused_before_anything_runs(texts, tmp_path, change, message):
  with pytest.raises(ValueError, match=message):
    pipeline.run_pipeline(_config("p_q", texts, **change), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_unknown_kind_and_missing_calibration(texts, tmp_path):
  config = _config("p_q", texts)
  config.stage.prune.kind = "shrink"
  with pytest.raises(ValueError, match=r"unknown kind 'shrink' \(kinds: prune, structured, rotate, search, "
                     r"factorize"):
    pipeline.plan(config)
  config = _config("p_q", texts)
  config.calib.n_seq = 0
  with pytest.raises(ValueError, match=r"stage 0 'prune' \(prune\) uses a calibrated method but "
                     r"config.calib.n_seq is not set"):
    pipeline.plan(config)
  config = _config("p_q", texts)
  config.stage.gptq.recipe = None
  with pytest.raises(ValueError, match=r"needs config.stage.gptq.recipe"):
    pipeline.plan(config)


def _kd_config(variant, texts):
  config = _config(variant, texts)
  config.data.files = str(texts / "train.txt")
  config.data.data_dir = str(texts / "tfds")
  return config


@pytest.fixture(scope="module")
def kd_runs(texts, tmp_path_factory):
  """Uninterrupted in-process runs of p_kd_q and p_q_kd on the tiny model."""
  root = tmp_path_factory.mktemp("kd_runs")
  reports = {v: pipeline.run_pipeline(_kd_config(v, texts), str(root / v))
             for v in ("p_kd_q", "p_q_kd")}
  return root, reports


def test_distill_between_prune_and_quantize_in_both_orders(texts, kd_runs):
  root, runs = kd_runs
  for variant in ("p_kd_q", "p_q_kd"):
    assert [s["name"] for s in runs[variant]["stages"]][-2:] == ["convert", "eval"]
  # p_kd_q: the 2:4 zeros survive distillation and GPTQ.
  cfg = _kd_config("p_kd_q", texts)
  pruned = _restored(root / "p_kd_q", cfg, 0)
  distilled = _restored(root / "p_kd_q", cfg, 1)
  solved = _restored(root / "p_kd_q", cfg, 2)
  for path, k in _proj_kernels(pruned).items():
    zero = k == 0
    assert zero.mean() == pytest.approx(0.5)
    assert np.all(_proj_kernels(distilled)[path][zero] == 0), path
    assert np.all(_proj_kernels(solved)[path][zero] == 0), path
    assert not np.array_equal(_proj_kernels(distilled)[path], k)  # it trained
  # p_q_kd: convert after distillation equals the distilled fake-quant model.
  cfg = _kd_config("p_q_kd", texts)
  qat = _restored(root / "p_q_kd", cfg, 2)
  packed = _restored(root / "p_q_kd", cfg, 3)
  tokens = np.arange(32, dtype=np.int32)[None] % 200
  np.testing.assert_array_equal(np.asarray(packed(tokens)), np.asarray(jc.convert(qat)(tokens)))
  report = json.loads((root / "p_q_kd" / "stages" / "2_kd" / "report.json").read_text())
  assert np.isfinite(report["eval_ppl"]) and report["steps"] == cfg.stage.kd.train.steps


def _cli(workdir, texts, *extra, config="configs/smollm2_pipeline.py:p_q_kd,tiny"):
  return [sys.executable, "-m", "jaxcomp", f"--config={config}", f"--workdir={workdir}",
          f"--config.calib.text={texts / 'train.txt'}",
          f"--config.eval.text_path={texts / 'eval.txt'}", "--config.eval.rates=(0.1,)",
          f"--config.data.files={texts / 'train.txt'}",
          f"--config.data.data_dir={texts / 'tfds'}", *extra]


def test_sigkill_during_the_third_stage_then_rerun_is_bitwise_the_uninterrupted_run(
    texts, kd_runs, tmp_path):
  """CLI run of prune -> qat -> kd -> convert -> eval killed inside stage 2 (kd, the third)
  after its first checkpoint; the rerun resumes there and ends equal to the in-process run."""
  root, runs = kd_runs
  work = tmp_path / "killed"
  env = dict(os.environ)  # the same devices and compilation cache as the in-process run
  proc = subprocess.Popen(_cli(work, texts), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  ckpts = work / "stages" / "2_kd" / "train" / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None and not (
      ckpts.is_dir() and any(d.name.isdigit() for d in ckpts.iterdir())):
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed in stage 2"
  assert not (work / "stages" / "2_kd" / "done.json").exists()
  finished = {d: (work / "stages" / d / "done.json").stat().st_mtime_ns
              for d in ("0_prune", "1_qat")}
  resumed = subprocess.run(_cli(work, texts), cwd=ROOT, env=env, capture_output=True, text=True,
                           check=False)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resuming at stage 2 (kd)" in resumed.stderr and "resumed from" in resumed.stderr
  assert finished == {d: (work / "stages" / d / "done.json").stat().st_mtime_ns
                      for d in finished}  # stages 0 and 1 did not run again
  report = json.loads((work / "report.json").read_text())
  assert report["quality"] == runs["p_q_kd"]["quality"]
  cfg = _kd_config("p_q_kd", texts)
  a, b = (nnx.to_pure_dict(nnx.state(_restored(w, cfg, 3))) for w in (root / "p_q_kd", work))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # `python -m jaxcomp eval --workdir` re-evaluates the run's final (packed) model.
  ev = subprocess.run([sys.executable, "-m", "jaxcomp", "eval", f"--workdir={work}"],
                      cwd=ROOT, env=env, capture_output=True, text=True, check=False)
  assert ev.returncode == 0, ev.stderr[-2000:]
  assert "| quality.ppl |" in ev.stdout
  assert json.loads((work / "eval" / "report.json").read_text())["quality"] == report["quality"]


def test_cli_errors_are_one_line(texts, tmp_path):
  env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
  bad = subprocess.run(_cli(tmp_path / "bad", texts, "--config.stages=prune,convert"),
                       cwd=ROOT, env=env, capture_output=True, text=True, check=False)
  assert bad.returncode == 1
  assert bad.stderr.strip().splitlines()[-1] == (
      "jaxcomp: error: stage 1 'convert': convert needs a ptq or quantize stage before it")
  assert not (tmp_path / "bad").exists()
  none = subprocess.run([sys.executable, "-m", "jaxcomp", "eval", f"--workdir={tmp_path}"],
                        cwd=ROOT, env=env, capture_output=True, text=True, check=False)
  assert none.returncode == 1 and "holds no pipeline run (no config.json)" in none.stderr


def _refused(config, section, change, message):
  """``plan`` refuses ``config`` with ``change`` applied to ``config.stage.<section>``."""
  for k, v in change.items():
    setattr(config.stage[section], k, v)
  with pytest.raises(ValueError, match=message):
    pipeline.plan(config)


@pytest.mark.parametrize("change, message", [
    (dict(teacher=""), r"stage 1 'kd' \(distill\) has no teacher"),
    (dict(teacher="gptq"), r"teacher 'gptq' is neither 'original' nor an earlier stage"),
])
def test_distill_without_a_teacher_is_refused(texts, change, message):
  _refused(_kd_config("p_kd_q", texts), "kd", change, message)
  config = _kd_config("p_kd_q", texts)
  config.stages = "prune,gptq,convert,kd"
  with pytest.raises(ValueError, match=r"a packed model \(after convert\) cannot be trained"):
    pipeline.plan(config)


def test_structured_stage_shrinks_then_distills_and_resumes_into_the_smaller_shapes(texts,
                                                                                   tmp_path):
  config = _kd_config("s_kd_q", texts)
  config.stage.structured.keep_layers = 1
  config.stage.kd.train.update(steps=4, checkpoint_every=4, log_every=2)
  report = pipeline.run_pipeline(config, str(tmp_path / "s"))
  assert [s["name"] for s in report["stages"]] == ["structured", "kd", "gptq", "convert", "eval"]
  small = _restored(tmp_path / "s", config, 0)
  assert (small.config.n_layers, small.config.ffn_dim, small.config.n_heads) == (1, 96, 2)
  base, _ = load_model(config)
  # The kept block is the last one, its kept channels / heads hold the original weights.
  done = json.loads((tmp_path / "s" / "stages" / "0_structured" / "done.json").read_text())
  keep = done["info"]["structure"]
  assert keep["layers"] == [1]
  np.testing.assert_array_equal(
      np.asarray(small.layers[0].mlp.up_proj.kernel[...]),
      np.asarray(base.layers[1].mlp.up_proj.kernel[...])[:, keep["ffn"][0]])
  stage = json.loads((tmp_path / "s" / "stages" / "0_structured" / "report.json").read_text())
  assert stage["size"]["params"] < stage["params_before"] and "structure" not in stage
  # The later stages restore into the smaller shapes (packed, after distillation).
  packed = _restored(tmp_path / "s", config, 3)
  assert np.isfinite(np.asarray(packed(np.arange(16, dtype=np.int32)[None]))).all()
  assert report["size"]["params"] < json.loads(
      (tmp_path / "s" / "baseline" / "report.json").read_text())["size"]["params"]


@pytest.mark.parametrize("change, message", [
    (dict(ffn_sparsity=1.5), r"stage 0 'structured' \(structured\): ffn_sparsity must be in"),
    (dict(ffn_sparsity=0.0, head_sparsity=0.0), r"removes nothing"),
    (dict(width=3), r"unknown field 'width'"),
])
def test_bad_structured_stages_are_refused(texts, change, message):
  _refused(_kd_config("s_kd_q", texts), "structured", change, message)
  config = _kd_config("s_kd_q", texts)
  config.stages = "gptq,structured,convert"
  with pytest.raises(ValueError, match=r"stage 1 'structured' \(structured\) must come before "
                     r"stage 'gptq'"):
    pipeline.plan(config)


def test_rotate_stage_keeps_the_function_and_resumes_into_the_rotated_structure(texts,
                                                                                tmp_path):
  config = smollm2_ptq.get_config("gptq_w4a8g128_rot,tiny")
  config.calib.text = str(texts / "train.txt")
  config.eval.text_path = str(texts / "eval.txt")
  assert config.stages == "rotate,ptq,convert,eval"
  config.stages = "rotate,ptq,convert"
  pipeline.run_pipeline(config, str(tmp_path / "r"))
  base, _ = load_model(config)
  rotated = _restored(tmp_path / "r", config, 0)
  assert rotated.config.ffn_hadamard and not rotated.config.tie_embeddings
  tokens = np.arange(32, dtype=np.int32)[None] % base.config.vocab_size
  np.testing.assert_allclose(np.asarray(rotated(tokens)), np.asarray(base(tokens)), atol=2e-4)
  # The packed weights are compared with the rotated float weights they approximate.
  convert = json.loads((tmp_path / "r" / "stages" / "2_convert" / "report.json").read_text())
  assert convert["weight_error"]["mean_rel_frobenius"] < 0.3
  packed = _restored(tmp_path / "r", config, 2)  # rotate -> ptq skeleton -> convert
  assert packed.config.ffn_hadamard and np.isfinite(np.asarray(packed(tokens))).all()
  config.stages = "ptq,rotate,convert,eval"
  with pytest.raises(ValueError, match=r"stage 1 'rotate' \(rotate\) must come before stage "
                     r"'ptq'"):
    pipeline.plan(config)
  config.stages = "rotate,ptq,convert,eval"
  config.stage.rotate.angle = 3
  with pytest.raises(ValueError, match=r"stage 0 'rotate' \(rotate\): unknown field 'angle'"):
    pipeline.plan(config)


def test_image_pipeline_trains_prunes_distills_quantizes_and_packs(data_dir, tmp_path):
  """configs/fmnist_pipeline.py on the tiny CNN: dense -> block prune -> KD -> QAT w4a8 ->
  KD -> convert -> eval, scored against the dense stage."""
  sys.path.insert(0, str(ROOT / "configs"))
  import fmnist_pipeline  # pylint: disable=import-outside-toplevel
  config = fmnist_pipeline.get_config("p_kd_q,tiny")
  config.data.data_dir = data_dir
  report = pipeline.run_pipeline(config, str(tmp_path / "run"))
  names = [s["name"] for s in report["stages"]]
  assert names == ["dense", "prune", "kd", "qat", "kd_q", "convert", "eval"]
  assert report["kind"] == "classifier" and report["baseline"]["name"] == "dense"
  stages = pipeline.plan(config)
  base, _ = pipeline.load_base(config)
  out = lambda i: pipeline.restore_stage_output(base, stages, tmp_path / "run" / "stages", i)
  pruned, distilled, qat_kd, packed = out(1), out(2), out(4), out(5)
  # The dense model learned the task; the baseline is it, not the random initialisation.
  base_report = json.loads((tmp_path / "run" / "baseline" / "report.json").read_text())
  assert base_report["quality"]["accuracy"] > 0.5
  # 90% of fc1's tiles pruned, and they stay zero through both distillations.
  zero = np.asarray(pruned.fc1.kernel[...]) == 0
  assert zero.mean() == pytest.approx(0.9, abs=0.02)
  assert np.all(np.asarray(distilled.fc1.kernel[...])[zero] == 0)
  assert not np.array_equal(np.asarray(distilled.fc1.kernel[...]), np.asarray(
      pruned.fc1.kernel[...]))
  # The packed model is the distilled fake-quant model exactly, with the pruned tiles.
  x = pipeline.image.images(config, "test", 16)[0]
  np.testing.assert_array_equal(np.asarray(packed(x)), np.asarray(jc.convert(qat_kd)(x)))
  assert np.all(np.asarray(packed.fc1.kernel[...].dequantize())[zero] == 0)
  assert report["size"]["bytes"] < base_report["size"]["bytes"] / 4
  assert 0 < report["robustness"]["score"] <= 1.0 + 1e-9
  # A baseline that is no earlier stage is refused before anything runs.
  config.eval.baseline = "kd_q2"
  with pytest.raises(ValueError, match=r"config.eval.baseline='kd_q2' is neither 'original' nor"):
    pipeline.plan(config)
