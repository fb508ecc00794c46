"""Quant specs and recipes: validation with the field named, matching, ConfigDict round trips."""

import ml_collections
import pytest

import jaxcomp as jc


@pytest.mark.parametrize("kwargs,field", [
    (dict(w_bits=0), "Quant.w_bits"),
    (dict(w_bits=9), "Quant.w_bits"),
    (dict(w_bits="x"), "Quant.w_bits"),
    (dict(w_bits=True), "Quant.w_bits"),
    (dict(a_bits=3), "Quant.a_bits"),
    (dict(a_bits=9), "Quant.a_bits"),
    (dict(a_bits=8, g_bits=2), "Quant.g_bits"),
    (dict(g_bits=8), "Quant.g_bits"),
    (dict(group=0), "Quant.group"),
    (dict(group=-128), "Quant.group"),
    (dict(group=128, granularity="tensor"), "Quant.group"),
    (dict(granularity="group"), "Quant.group"),
    (dict(granularity="row"), "Quant.granularity"),
    (dict(a_granularity="channel"), "Quant.a_granularity"),
    (dict(calibration="kl"), "Quant.calibration"),
    (dict(percentile=0.0), "Quant.percentile"),
    (dict(percentile=101), "Quant.percentile"),
    (dict(learn_scale="yes"), "Quant.learn_scale"),
    (dict(learn_scale=True, w_symmetric=False), "Quant.learn_scale"),
    (dict(w_symmetric=1), "Quant.w_symmetric"),
])
def test_quant_rejects_bad_fields(kwargs, field):
  with pytest.raises(jc.SpecError) as e:
    jc.Quant(**kwargs)
  msg = str(e.value)
  assert msg.startswith(field) or field in msg
  assert "\n" not in msg


def test_quant_group_implies_group_granularity_and_roundtrips():
  q = jc.Quant(w_bits=4, group=128)
  assert q.granularity == "group"
  assert jc.Quant.from_dict(q.to_dict()) == q
  with pytest.raises(jc.SpecError, match="Quant has no field 'wbits'"):
    jc.Quant.from_dict({"wbits": 4})


def test_quant_is_frozen_and_keyword_only():
  q = jc.Quant()
  with pytest.raises(AttributeError):
    q.w_bits = 4  # type: ignore[misc]
  with pytest.raises(TypeError):
    jc.Quant(8)  # type: ignore[misc]


def test_rule_validation():
  with pytest.raises(jc.RecipeError, match=r"Rule.pattern 'attn\[' is not a valid regex"):
    jc.Rule("attn[", quant=jc.Quant())
  with pytest.raises(jc.RecipeError, match="does nothing"):
    jc.Rule(".*")
  with pytest.raises(jc.RecipeError, match="skip=True excludes quant=, sparsity= and lowrank="):
    jc.Rule(".*", skip=True, quant=jc.Quant())
  with pytest.raises(jc.RecipeError, match="Rule.quant must be a jaxcomp.Quant"):
    jc.Rule(".*", quant={"w_bits": 4})
  with pytest.raises(jc.RecipeError, match="share the label"):
    jc.Recipe([jc.Rule(".*", skip=True), jc.Rule(".*", quant=jc.Quant())])


def test_first_match_wins_and_fullmatch():
  recipe = jc.Recipe([
      jc.Rule(r"lm_head|embed", skip=True),
      jc.Rule(r".*attn/(q|k|v|o)_proj", quant=jc.Quant(w_bits=8, a_bits=8)),
      jc.Rule(r".*", quant=jc.Quant(w_bits=4, group=32)),
  ])
  assert recipe.match("embed").skip
  assert recipe.match("layers/0/attn/q_proj").quant.a_bits == 8
  assert recipe.match("layers/0/mlp/up_proj").quant.w_bits == 4
  # fullmatch: "embed" does not take "layers/0/embed_proj".
  assert recipe.match("layers/0/embed_proj").quant.w_bits == 4
  assert recipe.match("layers/0/attn/q_proj_extra").quant.w_bits == 4


def test_recipe_config_roundtrip_and_override():
  recipe = jc.Recipe([
      jc.Rule(r"lm_head", skip=True, name="head"),
      jc.Rule(r".*mlp/.*", quant=jc.Quant(w_bits=4, group=128), name="mlp"),
      jc.Rule(r".*", quant=jc.Quant(w_bits=8, a_bits=8, learn_scale=True)),
  ])
  cfg = recipe.to_config()
  assert isinstance(cfg, ml_collections.ConfigDict)
  assert jc.Recipe.from_config(cfg) == recipe
  cfg.rules.mlp.quant.w_bits = 3  # what --config.recipe.rules.mlp.quant.w_bits=3 does
  assert jc.Recipe.from_config(cfg).match("a/mlp/up").quant.w_bits == 3
  # A plain dict with a list of rules works too.
  plain = {"rules": [{"pattern": ".*", "quant": {"w_bits": 4}}]}
  assert jc.Recipe.from_config(plain).rules[0].quant.w_bits == 4


@pytest.mark.parametrize("cfg,message", [
    ({"rules": {}, "extra": 1}, "recipe has no field 'extra'"),
    ({}, "recipe.rules is missing"),
    ({"rules": {"mlp": {"pattern": ".*", "quant": {"wbits": 4}}}},
     "recipe.rules.mlp: Quant has no field 'wbits'"),
    ({"rules": {"mlp": {"pattern": ".*", "quantt": {}}}}, "recipe.rules.mlp has no field 'quantt'"),
    ({"rules": {"mlp": {"pattern": ".*", "quant": {"w_bits": 9}}}},
     "recipe.rules.mlp: Quant.w_bits must be an int in"),
    ({"rules": [{"quant": {"w_bits": 4}}]}, r"recipe.rules\[0\].pattern is missing"),
    ({"rules": "all"}, "recipe.rules must be a mapping or a list"),
])
def test_recipe_config_errors_name_the_field(cfg, message):
  with pytest.raises(jc.RecipeError, match=message) as e:
    jc.Recipe.from_config(ml_collections.ConfigDict(cfg) if cfg and "rules" in cfg and
                          isinstance(cfg["rules"], dict) else cfg)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("args,kwargs,message", [
    (("4:2",), {}, r"Sparsity.pattern '4:2': N:M needs 0 < N <= M"),
    (("0:4",), {}, r"N:M needs 0 < N <= M"),
    (("2-4",), {}, "Sparsity.pattern must be"),
    ((), dict(sparsity=1.0), r"Sparsity.sparsity must be a number in \[0, 1\)"),
    ((), dict(sparsity=-0.5), r"Sparsity.sparsity must be a number in \[0, 1\)"),
    ((), dict(method="random"), "Sparsity.method must be one of"),
    (("block",), dict(block=(16,)), "Sparsity.block must be two positive ints"),
    (("block",), dict(block=(0, 16)), "Sparsity.block must be two positive ints"),
    (("block",), dict(method="sparsegpt"), "supports patterns 'unstructured' and 'N:M'"),
])
def test_sparsity_rejects_bad_fields(args, kwargs, message):
  with pytest.raises(jc.SpecError, match=message):
    jc.Sparsity(*args, **kwargs)


def test_sparsity_rules_roundtrip_through_config():
  recipe = jc.Recipe([
      jc.Rule(r".*mlp/.*", sparsity=jc.Sparsity("2:4", method="wanda"), name="mlp"),
      jc.Rule(r".*attn/.*", quant=jc.Quant(w_bits=8), sparsity=jc.Sparsity(
          "block", sparsity=0.75, block=(8, 128)), name="attn"),
  ])
  cfg = recipe.to_config()
  assert cfg.rules.mlp.sparsity.pattern == "2:4"
  cfg.rules.attn.sparsity.sparsity = 0.5
  back = jc.Recipe.from_config(cfg)
  assert back.rules[0].sparsity == jc.Sparsity("2:4", method="wanda")
  assert back.rules[1].sparsity.block == (8, 128) and back.rules[1].sparsity.sparsity == 0.5
  assert back.rules[1].sparsity.fraction == 0.5 and back.rules[0].sparsity.fraction == 0.5
  cfg.rules.mlp.sparsity.method = "obs"
  with pytest.raises(jc.RecipeError, match=r"recipe.rules.mlp: Sparsity.method must be"):
    jc.Recipe.from_config(cfg)
  with pytest.raises(jc.RecipeError, match="skip=True excludes"):
    jc.Rule(".*", skip=True, sparsity=jc.Sparsity())


def test_config_keeps_rule_order_although_configdict_sorts_keys():
  recipe = jc.Recipe([jc.Rule("z.*", skip=True, name="zeta"),
                      jc.Rule(".*", quant=jc.Quant(w_bits=8), name="alpha")])
  cfg = recipe.to_config()
  assert list(cfg.rules.keys()) == ["alpha", "zeta"]  # sorted by ConfigDict
  back = jc.Recipe.from_config(cfg)
  assert [r.name for r in back.rules] == ["zeta", "alpha"]
  assert back.match("zq").skip
  del cfg["order"]
  with pytest.raises(jc.RecipeError, match="recipe.order is missing"):
    jc.Recipe.from_config(cfg)
  cfg.order = ["zeta"]
  with pytest.raises(jc.RecipeError, match="must list each name of recipe.rules"):
    jc.Recipe.from_config(cfg)
