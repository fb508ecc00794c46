"""The one-shot compression configs (`configs/smollm2_{ptq,sparse,lowrank}.py`) as stage
pipelines on the tiny model: the stages they run, the packed model they save, their errors."""

import json
import pathlib
import subprocess
import sys

from flax import nnx
import numpy as np
import pytest

import jaxcomp as jc
from jaxcomp.eval.perplexity import perplexity
from jaxcomp.experiments import pipeline
from jaxcomp.experiments.compress import summary

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "configs"))
import smollm2_lowrank  # noqa: E402  pylint: disable=wrong-import-position
import smollm2_ptq  # noqa: E402  pylint: disable=wrong-import-position
import smollm2_sparse  # noqa: E402  pylint: disable=wrong-import-position


def _config(variant, texts, module=smollm2_ptq):
  config = module.get_config(variant + ",tiny")
  config.calib.text = str(texts / "train.txt")
  config.eval.text_path = str(texts / "eval.txt")
  return config


def test_every_variant_is_a_stage_list_with_its_recipe():
  for variant, quant in smollm2_ptq.VARIANTS.items():
    config = smollm2_ptq.get_config(variant)
    assert config.task == "pipeline"
    if quant is None:
      assert config.stages == "eval"
    else:
      rotate = "rotate," if variant.endswith("_rot") else ""
      kd = "kd," if variant.endswith("_kd") else ""
      assert config.stages == rotate + "ptq," + kd + "convert,eval"
      assert jc.Recipe.from_config(config.stage.ptq.recipe).rules[0].quant == quant
  for module, kind in ((smollm2_sparse, "prune"), (smollm2_lowrank, "factorize")):
    for variant in module.VARIANTS:
      config = module.get_config(variant)
      assert [s.kind for s in pipeline.plan(config)] == [kind, "eval"]
  with pytest.raises(ValueError, match="unknown variant 'svd_10' of smollm2_lowrank.py"):
    smollm2_lowrank.get_config("svd_10")


def test_kd_variant_distills_the_fp8_model_before_packing_it(texts, tmp_path):
  config = _config("gptq_fp8_w8a8_kd", texts)
  config.data.files = str(texts / "train.txt")
  config.data.data_dir = str(tmp_path / "tfds")
  assert config.stages == "ptq,kd,convert,eval" and config.stage.kd.distill.alpha == 1.0
  pipeline.run_pipeline(config, str(tmp_path / "run"))
  s = summary(tmp_path / "run")
  assert np.isfinite(s["ppl"]) and s["distill_s"] > 0
  kd = json.loads((tmp_path / "run" / "stages" / "1_kd" / "report.json").read_text())
  assert kd["stage_kind"] == "distill" and kd["steps"] == 4
  assert np.isfinite(kd["eval_ppl"]) and np.isfinite(kd["teacher_eval_ppl"])
  assert s["saved"]["packed_bytes"] > 0  # convert packs the distilled model (test_pipeline)


@pytest.fixture(scope="module")
def gptq_w4g128_run(texts, tmp_path_factory):
  """The unrolled gptq_w4g128 run, finished once for the packed-model and the scanned-model
  tests (both only read it)."""
  work = tmp_path_factory.mktemp("gptq_w4g128") / "run"
  config = _config("gptq_w4g128", texts)
  pipeline.run_pipeline(config, str(work))
  return config, work


@pytest.mark.parametrize("variant", ["gptq_w4g128", "smoothquant_w8a8", "float"])
def test_ptq_run_saves_a_restorable_packed_model(variant, texts, tmp_path, request):
  if variant == "gptq_w4g128":
    config, work = request.getfixturevalue("gptq_w4g128_run")
  else:
    config, work = _config(variant, texts), tmp_path / "run"
    pipeline.run_pipeline(config, str(work))
  s = summary(work)
  assert np.isfinite(s["ppl"]) and s["eval_tokens"] > 1000
  if variant == "float":
    assert "saved" not in s and s["bits_per_param"] == 32
    return
  assert s["ptq_layers"] == 14 and s["ptq_rel_error"] < 0.1
  assert s["saved"]["packed_bits_per_param"] > 0 and s["saved"]["packed_bytes"] > 0
  # Eq. 2 per layer beside the convert stage's report.
  layers = json.loads((work / "stages" / "1_convert" / "layers.json").read_text())
  assert len(layers) == 14 and all(0 < l["rel_frobenius"] < 0.2 for l in layers)
  # The serving artifact restores with the public API and gives the same perplexity.
  from jaxcomp.models.llama import Llama, LlamaConfig  # pylint: disable=import-outside-toplevel
  recipe = jc.Recipe.from_config(config.stage.ptq.recipe)
  like = nnx.eval_shape(lambda: jc.packed_skeleton(Llama(LlamaConfig.tiny(),
                                                         rngs=nnx.Rngs(0)), recipe))
  restored = jc.restore_packed(s["packed_dir"], like)
  ids = np.frombuffer((texts / "eval.txt").read_bytes(), np.uint8).astype(np.int32)
  r = perplexity(restored, ids[:config.eval.max_tokens], seq_len=64, batch_size=4)
  assert r["ppl"] == pytest.approx(s["ppl"], rel=1e-6)


@pytest.mark.parametrize("change, message", [
    (dict(text_path="missing.txt"), r"config.eval.text_path=.*missing.txt': no such file"),
    (dict(calib_text="no_such.txt"), r"config.calib.sources: calibration source .*no_such.txt.*: no text file at"),
    (dict(calib_dtype="float16"), r"config.calib.dtype must be 'bfloat16' or 'float32'"),
])
def test_bad_inputs_are_refused_before_anything_runs(texts, tmp_path, change, message):
  config = _config("gptq_w4", texts)
  if "text_path" in change:
    config.eval.text_path = str(texts / change["text_path"])
  if "calib_text" in change:
    config.calib.text = str(texts / change["calib_text"])
  if "calib_dtype" in change:
    config.calib.dtype = change["calib_dtype"]
  with pytest.raises(ValueError, match=message):
    pipeline.run_pipeline(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_unknown_variant_is_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "jaxcomp", "--config", "configs/smollm2_ptq.py:gptq_w5",
       "--workdir", str(tmp_path / "c")], cwd=ROOT, capture_output=True, text=True, check=False)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1].startswith("jaxcomp: error: ")
  assert "unknown variant 'gptq_w5'" in proc.stderr


@pytest.mark.parametrize("variant", ["sparsegpt_2of4", "wanda_block16_50", "magnitude_50"])
def test_sparse_run_reports_measured_sparsity(variant, texts, tmp_path):
  pipeline.run_pipeline(_config(variant, texts, smollm2_sparse), str(tmp_path / "run"))
  s = summary(tmp_path / "run")
  assert s["prune_layers"] == 14 and np.isfinite(s["ppl"])
  assert s["layer_sparsity"] == pytest.approx(0.5, abs=1e-9)
  assert 0.2 < s["sparsity"] < 0.5  # embeddings and norms stay dense
  assert "saved" not in s


def test_lowrank_run_removes_the_budgeted_parameters(texts, tmp_path):
  pipeline.run_pipeline(_config("svd_llm_40", texts, smollm2_lowrank), str(tmp_path / "run"))
  s = summary(tmp_path / "run")
  matched = 2 * (64 * 64 * 2 + 64 * 32 * 2 + 64 * 128 * 3)
  one_rank = 2 * (2 * 128 + 2 * 96 + 3 * 192)  # sum of (in + out): rank r costs r (in + out)
  removed = s["params_before"] - s["params"]
  assert 0.4 * matched <= removed <= 0.4 * matched + one_rank
  assert s["factorize_layers"] == 14 and np.isfinite(s["ppl"])
  assert 0 < s["factorize_rel_error"] < 1


def test_scanned_model_gives_the_unrolled_perplexity(gptq_w4g128_run, texts, tmp_path):
  """`config.model.scan_layers`: the same stages on the stacked-blocks Llama (the recipe's
  ``layers/(\\d+/)?...`` pattern takes both), GPTQ walking the stack layer by layer."""
  unrolled, work = gptq_w4g128_run
  assert not unrolled.model.scan_layers
  config = _config("gptq_w4g128", texts)
  config.model.scan_layers = True
  pipeline.run_pipeline(config, str(tmp_path / "runTrue"))
  ppl = {False: summary(work)["ppl"], True: summary(tmp_path / "runTrue")["ppl"]}
  assert ppl[True] == pytest.approx(ppl[False], rel=1e-4)
  layers = json.loads((tmp_path / "runTrue" / "stages" / "1_convert" / "layers.json").read_text())
  assert len(layers) == 14 and layers[0]["path"].startswith("layers/")


def test_mixed_and_self_generated_calibration_through_the_pipeline(texts, tmp_path):
  config = _config("gptq_w4g128", texts)
  config.calib.sources = f"{texts / 'train.txt'}:1,self:1"
  config.calib.generation.batch_size = 4
  config.calib.cache_dir = str(tmp_path / "calib_cache")
  config.stages = "ptq,eval"
  pipeline.run_pipeline(config, str(tmp_path / "run"))
  assert np.isfinite(summary(tmp_path / "run")["ppl"])
  assert len(list((tmp_path / "calib_cache").glob("self_*.npy"))) == 1
  # Another weight of the same sources is another calibration set: the stage is refused.
  config.calib.sources = f"{texts / 'train.txt'}:3,self:1"
  with pytest.raises(ValueError, match="stage 0 \\(ptq\\)"):
    pipeline.run_pipeline(config, str(tmp_path / "run"))
  bad = _config("gptq_w4g128", texts)
  bad.calib.sources = "wikitext2_valid:x"
  with pytest.raises(ValueError, match="config.calib.sources: 'wikitext2_valid:x' is not name:weight"):
    pipeline.plan(bad)


def test_out_of_domain_text_is_scored_beside_the_in_domain_one(texts, tmp_path):
  config = _config("rtn_w4g128", texts)
  (tmp_path / "ood.txt").write_text("Zebras quietly juggle seventeen violet umbrellas. " * 200)
  config.eval.ood_text = str(tmp_path / "ood.txt")
  config.eval.ood_max_tokens = 1500
  pipeline.run_pipeline(config, str(tmp_path / "run"))
  s = summary(tmp_path / "run")
  assert np.isfinite(s["ood_ppl"]) and s["ood_tokens"] > 1000 and s["ood_ppl"] != s["ppl"]
  assert s["ood_text"].startswith(str(tmp_path / "ood.txt"))
  bad = _config("rtn_w4g128", texts)
  bad.eval.ood_text = str(tmp_path / "missing.txt")
  with pytest.raises(ValueError, match="config.eval.ood_text=.*missing.txt.*no such file"):
    pipeline.plan(bad)
