"""The PTQ job (`configs/smollm2_ptq.py`) end to end on the tiny model, and its errors."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

import jaxcomp as jc
from jaxcomp.eval.perplexity import perplexity
from jaxcomp.experiments.compress import run_ptq

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


def test_variants_build_valid_recipes():
  for variant in smollm2_ptq.VARIANTS:
    config = smollm2_ptq.get_config(variant)
    if config.recipe is not None:
      recipe = jc.Recipe.from_config(config.recipe)
      assert recipe.rules[0].quant == smollm2_ptq.VARIANTS[variant]


@pytest.mark.parametrize("variant", ["gptq_w4g128", "smoothquant_w8a8", "float"])
def test_run_ptq_writes_a_restorable_packed_model(variant, texts, tmp_path):
  config = _config(variant, texts)
  report = run_ptq(config, str(tmp_path / "run"))
  assert np.isfinite(report["ppl"]) and report["eval_tokens"] > 1000
  if variant == "float":
    assert "packed_bytes" not in report
    return
  assert report["quantized_layers"] == 14
  assert report["packed_bits_per_param"] > 0 and report["packed_bytes"] > 0
  layers = json.loads((tmp_path / "run" / "layers.json").read_text())
  assert len(layers) == 14 and all(l["error"] < 0.1 for l in layers)
  from jaxcomp.models.llama import Llama, LlamaConfig  # pylint: disable=import-outside-toplevel
  recipe = jc.Recipe.from_config(config.recipe)
  like = nnx.eval_shape(lambda: jc.packed_skeleton(Llama(LlamaConfig.tiny(),
                                                         rngs=nnx.Rngs(0)), recipe))
  restored = jc.restore_packed(tmp_path / "run" / "packed", like)
  ids = np.frombuffer((texts / "eval.txt").read_bytes(), np.uint8).astype(np.int32)
  r = perplexity(restored, ids[:config.eval.max_tokens], seq_len=64, batch_size=4)
  assert r["ppl"] == pytest.approx(report["ppl"], rel=1e-6)


def test_bad_input_is_one_line(texts, tmp_path):
  config = _config("rtn_w4", texts)
  config.eval.text_path = str(texts / "missing.txt")
  with pytest.raises(FileNotFoundError):
    run_ptq(config, str(tmp_path / "a"))
  assert not (tmp_path / "a").exists()  # nothing written before the inputs are checked
  config = _config("rtn_w4", texts)
  config.calib.dtype = "float16"
  with pytest.raises(ValueError, match="config.calib.dtype must be"):
    run_ptq(config, str(tmp_path / "b"))
  proc = subprocess.run(
      [sys.executable, "-m", "jaxcomp", "--config", "configs/smollm2_ptq.py:gptq_w5",
       "--workdir", str(tmp_path / "c")], cwd=ROOT, capture_output=True, text=True, check=False)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1].startswith("jaxcomp: error: ")
  assert "unknown variant 'gptq_w5'" in proc.stderr


def test_missing_calibration_text_is_one_line_error(texts, tmp_path):
  config = _config("gptq_w4", texts)
  config.calib.text = str(texts / "no_such.txt")
  with pytest.raises(ValueError, match=r"config.calib.text=.*no calibration text at"):
    run_ptq(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("variant", ["sparsegpt_2of4", "wanda_block16_50", "magnitude_50"])
def test_sparse_job_reports_measured_sparsity(variant, texts, tmp_path):
  report = run_ptq(_config(variant, texts, smollm2_sparse), str(tmp_path / "run"))
  assert report["prune_layers"] == 14 and np.isfinite(report["ppl"])
  assert report["sparsity"] == pytest.approx(0.5, abs=1e-9)
  assert "packed_bytes" not in report


def test_lowrank_job_removes_the_budgeted_parameters(texts, tmp_path):
  report = run_ptq(_config("svd_llm_40", texts, smollm2_lowrank), str(tmp_path / "run"))
  matched = 2 * (64 * 64 * 2 + 64 * 32 * 2 + 64 * 128 * 3)
  one_rank = 2 * (2 * 128 + 2 * 96 + 3 * 192)  # sum of (in + out): rank r costs r (in + out)
  removed = report["params_before"] - report["params"]
  assert 0.4 * matched <= removed <= 0.4 * matched + one_rank
  assert report["factorize_layers"] == 14 and np.isfinite(report["ppl"])
  assert 0 < report["factorize_mean_layer_rel_error"] < 1


def test_every_variant_config_builds():
  for module in (smollm2_sparse, smollm2_lowrank):
    for variant in module.VARIANTS:
      jc.Recipe.from_config(module.get_config(variant).recipe)
  with pytest.raises(ValueError, match="unknown variant 'svd_10' of smollm2_lowrank.py"):
    smollm2_lowrank.get_config("svd_10")


def test_scanned_model_gives_the_unrolled_perplexity(texts, tmp_path):
  """`config.model.scan_layers`: the same job on the stacked-blocks Llama (the recipe's
  ``layers/(\\d+/)?...`` pattern takes both), GPTQ walking the stack layer by layer."""
  reports = {}
  for scan in (False, True):
    config = _config("gptq_w4g128", texts)
    config.model.scan_layers = scan
    reports[scan] = run_ptq(config, str(tmp_path / f"run{scan}"))
  assert reports[True]["ppl"] == pytest.approx(reports[False]["ppl"], rel=1e-4)
  layers = json.loads((tmp_path / "runTrue" / "layers.json").read_text())
  assert len(layers) == 14 and layers[0]["path"].startswith("layers[0]/")
