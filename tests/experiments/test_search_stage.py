"""The pipeline's ``search`` stage (`configs/smollm2_search.py`, tiny model): the later stage
applies the searched recipe, the packed model has the bits the search predicted, a rerun
restores it, scores are reused at another budget, OWL and rank allocation keep their totals,
and every misuse is one line before anything runs."""

import dataclasses
import json
import pathlib
import sys

from flax import nnx
import numpy as np
import pytest

import jaxcomp as jc
from jaxcomp.experiments import pipeline
from jaxcomp.layers.lowrank import LowRankLinear
from jaxcomp.models.zoo import load_model
from jaxcomp.quant.qarray import QArray
from jaxcomp.rewrite import engine

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "configs"))
import smollm2_search  # noqa: E402  pylint: disable=wrong-import-position


# The tiny config's grids and ranks, cut to what the assertions need (each candidate costs one
# GPTQ or SVD-LLM compile per kernel shape): per group and per channel, low and high widths;
# ranks on both sides of the budget, and dense.
MIXED = ("w2g32", "w3", "w3g32", "w8")
RANKS = ("r20", "r40", "r60", "dense")


def _subset(variant, names):
  cands = smollm2_search.get_config(variant + ",tiny").stage.search.candidates
  return {n: cands[n] for n in names}


def _config(variant, texts, **search):
  config = smollm2_search.get_config(variant + ",tiny")
  config.calib.text = str(texts / "train.txt")
  config.eval.text_path = str(texts / "eval.txt")
  for k, v in search.items():
    config.stage.search[k] = v
  return config


def _packed_bits(model):
  """Bits of the packed kernels' values, scales and zero points, and the weights they hold."""
  bits = params = 0
  for _, v in nnx.to_flat_state(nnx.state(model)):
    q = v.get_value()
    if isinstance(q, QArray):
      leaves = [q.values, q.scale] + ([q.zero_point] if q.zero_point is not None else [])
      bits += sum(8 * np.asarray(x).nbytes for x in leaves)
      params += int(np.prod(q.shape))
  return bits, params


@pytest.fixture(scope="module")
def mixed(texts, tmp_path_factory):
  work = tmp_path_factory.mktemp("mixed")
  config = _config("mixed", texts, budget=4.0, kl_n_seq=2, candidates=_subset("mixed", MIXED))
  return config, work, pipeline.run_pipeline(config, str(work))


def test_mixed_precision_applies_the_searched_recipe_within_budget(mixed):
  config, work, report = mixed
  assert [s["name"] for s in report["stages"]] == ["search", "gptq", "convert", "eval"]
  d = work / "stages" / "0_search"
  search = json.loads((d / "report.json").read_text())
  assert search["bits_per_param"] <= 4.0 and search["layers"] == 14
  assert set(search["spearman"]) == {"hessian", "fisher"}
  assert set(search["spearman"]["fisher"]) == {"w3g32"} and search["estimator"] == "fisher"
  assert (d / "allocation.png").stat().st_size > 0
  per_layer = json.loads((d / "layers.json").read_text())
  assert len(set(per_layer.values())) > 1  # mixed, not uniform
  # The ptq stage quantized each layer with the grid the search chose ...
  recipe = jc.Recipe.from_config(json.loads((d / "recipe.json").read_text()))
  cands = smollm2_search.candidates(tiny=True)
  packed = pipeline.final_model(work)[0]
  for path, layer in engine.iter_layers(packed):
    if path in per_layer:
      q = getattr(layer, engine.kernel_axes(layer).name)[...]
      spec = cands[per_layer[path]]
      assert recipe.match(path).quant == spec
      assert q.bits == spec.w_bits, path
  # ... and the packed arrays hold exactly the bits the search predicted.
  bits, params = _packed_bits(packed)
  assert bits / params == pytest.approx(search["bits_per_param"])


def test_rerun_resumes_and_scores_are_reused_at_another_budget(mixed, texts, tmp_path):
  config, work, report = mixed
  again = pipeline.run_pipeline(config, str(work))  # finished: gathers the reports
  assert again["quality"]["ppl"] == report["quality"]["ppl"]
  scores = work / "stages" / "0_search" / "sensitivity.json"
  cheaper = _config("mixed", texts, budget=3.25, scores=str(scores),
                    candidates=_subset("mixed", MIXED))
  r = pipeline.run_pipeline(cheaper, str(tmp_path / "cheaper"))
  search = json.loads((tmp_path / "cheaper" / "stages" / "0_search" / "report.json").read_text())
  assert search["scores_from"] == str(scores) and search["bits_per_param"] <= 3.25
  bits, params = _packed_bits(pipeline.final_model(tmp_path / "cheaper")[0])
  assert bits / params == pytest.approx(search["bits_per_param"])
  assert r["size"]["bytes"] < report["size"]["bytes"]
  # Other candidates than the scores file's: refused.
  other = _config("mixed", texts, budget=3.25, scores=str(scores),
                  candidates=_subset("mixed", MIXED))
  del other.stage.search.candidates["w8"]
  with pytest.raises(ValueError, match="scored other candidates"):
    pipeline.run_pipeline(other, str(tmp_path / "other"))


def test_owl_keeps_the_total_sparsity(texts, tmp_path):
  pipeline.run_pipeline(_config("owl", texts), str(tmp_path))
  per_layer = json.loads((tmp_path / "stages" / "0_search" / "layers.json").read_text())
  pruned = pipeline.final_model(tmp_path)[0]
  zeros = total = 0
  for path, layer in engine.iter_layers(pruned):
    if path in per_layer:
      k = np.asarray(layer.kernel[...])
      assert (k == 0).mean() == pytest.approx(per_layer[path], abs=2 / k.shape[0]), path
      zeros, total = zeros + (k == 0).sum(), total + k.size
  assert len(set(np.round(list(per_layer.values()), 6))) > 1
  assert zeros / total == pytest.approx(0.5, abs=0.01)


def test_rank_allocation_fits_the_budget(texts, tmp_path):
  pipeline.run_pipeline(_config("ranks", texts, budget=0.7 * 32,
                                candidates=_subset("ranks", RANKS)), str(tmp_path))
  search = json.loads((tmp_path / "stages" / "0_search" / "report.json").read_text())
  per_layer = json.loads((tmp_path / "stages" / "0_search" / "layers.json").read_text())
  model = pipeline.final_model(tmp_path)[0]
  base = load_model(_config("ranks", pathlib.Path(".")))[0]
  dense = {p: int(np.prod(l.kernel[...].shape)) for p, l in engine.iter_layers(base)
           if p in per_layer}
  stored = 0
  for path, layer in engine.iter_layers(model):
    if path in dense:
      stored += (layer.a[...].size + layer.b[...].size if isinstance(layer, LowRankLinear)
                 else layer.kernel[...].size)
  assert stored / sum(dense.values()) <= 0.7 + 1e-9
  assert stored / sum(dense.values()) == pytest.approx(search["bits_per_param"] / 32)
  assert search["counts"]["dense"] < len(dense)


@pytest.mark.parametrize("change, message", [
    (lambda c: setattr(c.stage.gptq, "recipe_from", "nope"),
     r"recipe_from='nope' is not a search stage before it"),
    (lambda c: setattr(c, "stages", "gptq,search,convert,eval"),
     r"recipe_from='search' is not a search stage before it"),
    (lambda c: setattr(c.stage.search, "space", "owl"),
     r"unknown field 'budget' for space 'owl'"),
    (lambda c: setattr(c.stage.search, "budget", 0),
     r"budget must be bits per weight > 0"),
    (lambda c: setattr(c.stage.search, "estimator", "kl"),
     r"estimator 'kl' needs kl_n_seq > 0"),
    (lambda c: c.stage.search.candidates.update({"w3a8": {"w_bits": 3, "a_bits": 8}}),
     r"candidate 'w3a8' quantizes activations"),
    (lambda c: c.stage.search.candidates.update({"bad": {"w_bits": 3, "grup": 8}}),
     r"candidate 'bad': "),
    (lambda c: setattr(c.stage.search, "scores", "/nonexistent/s.json"),
     r"scores='/nonexistent/s.json': no such file"),
    (lambda c: setattr(c.calib, "n_seq", 0), r"\(search\) scores layers on calibration data"),
    (lambda c: setattr(c.stage.gptq, "recipe", c.stage.search.candidates.to_dict()),
     r"has both recipe and recipe_from"),
])
def test_misuse_is_one_line_before_anything_runs(texts, tmp_path, change, message):
  config = _config("mixed", texts)
  change(config)
  with pytest.raises(ValueError, match=message) as e:
    pipeline.run_pipeline(config, str(tmp_path))
  assert "\n" not in str(e.value)
  assert not (tmp_path / "stages").exists()


def test_a_search_after_quantization_and_a_mismatched_target_are_refused(texts, tmp_path):
  config = _config("mixed", texts)
  config.stage.first = dict(kind="ptq", recipe=jc.Recipe(
      [jc.Rule(".*_proj", quant=jc.Quant(w_bits=8))]).to_config())
  config.stages = "first,search,gptq,convert,eval"
  with pytest.raises(ValueError, match=r"\(search\) must come before stage 'first'"):
    pipeline.plan(config)
  owl = _config("owl", texts)
  owl.stage.q = dict(kind="ptq", recipe_from="search")
  owl.stages = "search,q,eval"
  with pytest.raises(ValueError, match=r"search 'search' chooses space 'owl', whose recipe a "
                     r"prune stage applies"):
    pipeline.plan(owl)


def test_mixed_full_searches_the_same_grids_on_the_full_signed_range():
  search = smollm2_search.get_config("mixed_full").stage.search
  cands = {n: jc.Quant.from_dict(c) for n, c in search.candidates.items()}
  symmetric = smollm2_search.candidates()
  assert sorted(n[:-1] for n in cands) == sorted(symmetric)
  for name, quant in cands.items():
    assert quant.full_range and quant == dataclasses.replace(symmetric[name[:-1]], full_range=True)
  assert list(search.kl_candidates) == ["w3g128f"]


def test_mixed_grids_takes_each_width_on_its_better_grid():
  cands = {n: jc.Quant.from_dict(c)
           for n, c in smollm2_search.get_config("mixed_grids").stage.search.candidates.items()}
  assert len(cands) == len(smollm2_search.candidates())
  for name, quant in cands.items():
    assert quant.full_range == smollm2_search.GRIDS[quant.w_bits]
    assert name.endswith("f") == quant.full_range
  assert {"w2g128f", "w3g128", "w4g128f", "w8"} <= set(cands)
