"""The solver registry: method names and options come from it, old configs still load, and a
new solver is one `Solver` record plus its registration."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import jaxcomp as jc
from jaxcomp.oneshot import registry
from jaxcomp.oneshot.solver import Solver, check_option, options_of
from jaxcomp.quant import spec as spec_module
from jaxcomp.quantizers import gptq


@pytest.mark.parametrize("kind,make", [
    ("quant", lambda m: jc.Quant(w_bits=8, a_bits=8 if m == "smoothquant" else None, method=m)),
    ("sparsity", lambda m: jc.Sparsity(method=m)),
    ("lowrank", lambda m: jc.LowRank(rank=2, method=m)),
])
def test_specs_accept_exactly_the_registered_methods(kind, make):
  for name in registry.names(kind):
    assert make(name).method == name
  with pytest.raises(jc.SpecError) as e:
    make("no_such_solver")
  assert ", ".join(registry.names(kind)) in str(e.value) and "\n" not in str(e.value)


def test_options_have_one_default_each_and_are_validated():
  spec = jc.Quant(w_bits=4, method="gptq", options={"act_order": True})
  o = options_of(spec)
  assert (o.act_order, o.damp, o.block_size) == (True, gptq.Options().damp, 128)
  assert options_of(jc.Quant(w_bits=4)) is None  # rtn has no options
  assert hash(spec) == hash(jc.Quant(w_bits=4, method="gptq", options={"act_order": True}))
  cases = [
      (dict(method="gptq", options={"act_ordr": True}),
       r"Quant.options has no 'act_ordr' for method 'gptq' \(options: act_order, damp, block_size, keep_zeros, float_acts\)"),
      (dict(method="gptq", options={"damp": 0.0}),
       r"Quant.options: gptq option damp must be a number in \(0, 1\], got 0.0"),
      (dict(method="gptq", options={"act_order": "yes"}), "gptq option act_order must be a bool"),
      (dict(method="smoothquant", a_bits=8, options={"alpha": 1.5}), "smoothquant option alpha"),
      (dict(options={"act_order": True}), "for method 'rtn' \\(it takes no options\\)"),
      (dict(method="gptq", options={"act_order": [1]}), "must be a bool, number or string"),
  ]
  for kwargs, message in cases:
    with pytest.raises(jc.SpecError, match=message) as e:
      jc.Quant(w_bits=4, **kwargs)
    assert "\n" not in str(e.value)
  with pytest.raises(jc.SpecError, match="asvd option alpha must be a number in"):
    jc.LowRank(rank=2, method="asvd", options={"alpha": -1})
  with pytest.raises(jc.SpecError, match="sparsegpt option block_size must be an int"):
    jc.Sparsity(method="sparsegpt", options={"block_size": 0})


def test_old_fields_load_from_stored_configs_and_name_the_new_place_in_code():
  # What an earlier version's to_dict() stored: every old field, defaults included.
  old = {"w_bits": 4, "method": "gptq", "act_order": True, "damp": 0.05, "smooth_alpha": 0.5}
  assert jc.Quant.from_dict(old) == jc.Quant(
      w_bits=4, method="gptq", options={"act_order": True, "damp": 0.05})
  old_rtn = {"w_bits": 4, "method": "rtn", "act_order": False, "damp": 0.01, "smooth_alpha": 0.5}
  assert jc.Quant.from_dict(old_rtn) == jc.Quant(w_bits=4)  # ignored by rtn then, dropped now
  assert jc.LowRank.from_dict({"rank": 2, "method": "asvd", "asvd_alpha": 0.25}).options == {
      "alpha": 0.25}
  with pytest.raises(jc.SpecError, match=r"Quant.act_order is now an option of method 'gptq': "
                     r"write Quant\(method='gptq', options=\{'act_order': True\}\)"):
    jc.Quant(w_bits=4, method="gptq", act_order=True)  # pylint: disable=unexpected-keyword-arg
  with pytest.raises(jc.SpecError, match="LowRank.asvd_alpha is now an option of method 'asvd'"):
    jc.LowRank(rank=2, method="asvd", asvd_alpha=0.3)  # pylint: disable=unexpected-keyword-arg


def test_options_round_trip_through_configdict_and_overrides():
  recipe = jc.Recipe([jc.Rule(".*", name="proj", quant=jc.Quant(
      w_bits=4, group=32, method="gptq", options={"act_order": True}))])
  cfg = recipe.to_config()
  assert jc.Recipe.from_config(cfg) == recipe
  cfg.rules.proj.quant.options.damp = 0.1  # what --config.recipe.rules.proj.quant.options.damp=0.1 does
  assert options_of(jc.Recipe.from_config(cfg).rules[0].quant).damp == 0.1
  cfg.rules.proj.quant.options.dampp = 0.1
  with pytest.raises(jc.RecipeError, match="recipe.rules.proj: Quant.options has no 'dampp'"):
    jc.Recipe.from_config(cfg)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _RowOptions:
  keep_every: int = 2

  def __post_init__(self):
    check_option("rows", "keep_every", self.keep_every, int, 1)


def _prune_rows(w, stats, spec):
  del stats
  keep = (jnp.arange(w.shape[0]) % options_of(spec).keep_every == 0)[:, None]
  return jnp.where(keep, w, 0.0)


def test_a_new_solver_is_one_record_plus_its_registration(monkeypatch):
  rows = Solver("rows", "sparsity", calibrated=False, layers=(nnx.Linear,), solve=_prune_rows,
                options=_RowOptions)
  # The registry's two steps for a new line: the SOLVERS entry, and entering it for the specs.
  monkeypatch.setattr(registry, "SOLVERS", registry.SOLVERS + (rows,))
  monkeypatch.setitem(spec_module._METHODS, "sparsity", dict(spec_module._METHODS["sparsity"]))
  spec_module.register_method("sparsity", rows)

  model = nnx.Sequential(nnx.Linear(6, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 3, rngs=nnx.Rngs(1)))
  recipe = jc.Recipe([jc.Rule(".*", sparsity=jc.Sparsity(method="rows",
                                                         options={"keep_every": 3}))])
  pruned, results = jc.prune(model, recipe, progress=False, return_report=True)
  assert [r.method for r in results] == ["rows", "rows"]
  w = np.asarray(pruned.layers[0].kernel[...])
  np.testing.assert_array_equal(w[[1, 2, 4, 5]], 0.0)
  np.testing.assert_array_equal(w[[0, 3]], np.asarray(model.layers[0].kernel[...])[[0, 3]])
  x = jax.random.normal(jax.random.key(0), (2, 6))
  assert pruned(x).shape == (2, 3)
  with pytest.raises(jc.SpecError, match="rows option keep_every must be an int in"):
    jc.Sparsity(method="rows", options={"keep_every": 0})


def test_configdict_default_options_are_empty_and_specs_take_configdicts():
  cfg = ml_collections.ConfigDict(jc.Recipe([jc.Rule(".*", quant=jc.Quant())]).to_config())
  assert cfg.rules.rule0.quant.options.to_dict() == {}
  # A spec stored in a config file as a ConfigDict (what configs/smollm2_distill.py does).
  stored = ml_collections.ConfigDict({"student": jc.LowRank(
      rank=2, method="asvd", options={"alpha": 0.25}).to_dict()})
  assert jc.LowRank(**stored.student).options == {"alpha": 0.25}
  assert jc.Sparsity(**ml_collections.ConfigDict(jc.Sparsity("2:4").to_dict())).nm == (2, 4)
