"""Layers stacked the way the Flax NNX docs scan over layers (`nnx.vmap` to build L copies of a
block, `nnx.scan` to run them): the transforms treat each stacked layer as L layers, and the
results equal the same model written as a Python loop over unstacked blocks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxcomp as jc

DEPTH = 3


class Block(nnx.Module):

  def __init__(self, rngs):
    self.up = nnx.Linear(16, 32, rngs=rngs)
    self.mix = nnx.Einsum("btd,df->btf", (32, 16), rngs=rngs)
    self.out = nnx.LinearGeneral(16, (2, 8), rngs=rngs)

  def __call__(self, x):
    h = self.mix(jax.nn.gelu(self.up(x)))
    return x + self.out(h).reshape(x.shape)


class ScannedLM(nnx.Module):
  """A tiny LM in the NNX docs' scan-over-layers style."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(50, 16, rngs=rngs)

    @nnx.split_rngs(splits=DEPTH)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return Block(rngs)

    self.blocks = make(rngs)
    self.head = nnx.Linear(16, 50, rngs=rngs)

  def __call__(self, tokens):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def forward(x, block):
      return block(x)

    return self.head(forward(self.embed(tokens), self.blocks))


class LoopLM(nnx.Module):
  """The same weights as a Python loop over unstacked blocks (the per-layer reference)."""

  def __init__(self, scanned):
    self.embed, self.head = scanned.embed, scanned.head
    graphdef, state = nnx.split(scanned.blocks)
    self.blocks = nnx.List([nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
                            for i in range(DEPTH)])

  def __call__(self, tokens):
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x)
    return self.head(x)


@pytest.fixture(scope="module")
def models():
  scanned = ScannedLM(nnx.Rngs(0))
  loop = LoopLM(nnx.clone(scanned))
  tokens = jax.random.randint(jax.random.key(1), (2, 5), 0, 50)
  np.testing.assert_allclose(np.asarray(scanned(tokens)), np.asarray(loop(tokens)), rtol=1e-5,
                             atol=1e-6)  # scan and loop compile differently: last-ulp only
  return scanned, loop, tokens


def _recipes(payload, layers=r"\w+"):
  return (jc.Recipe([jc.Rule(rf"blocks/{layers}", **payload)]),
          jc.Recipe([jc.Rule(rf"blocks/\d+/{layers}", **payload)]))


@pytest.mark.parametrize("spec", [
    jc.Quant(w_bits=8, a_bits=8),
    jc.Quant(w_bits=4, group=16),
    jc.Quant(w_bits=4, group=8, learn_scale=True),
], ids=["w8a8", "w4g16", "lsq"])
def test_quantize_and_convert_equal_the_per_layer_model(models, tmp_path, spec):
  scanned, loop, tokens = models
  before = jax.tree.map(np.asarray, nnx.state(scanned, nnx.Param))
  stacked_recipe, loop_recipe = _recipes(dict(quant=spec))
  q = jc.quantize(scanned, stacked_recipe, strict=True)
  ref = jc.quantize(loop, loop_recipe, strict=True)
  np.testing.assert_allclose(np.asarray(q(tokens)), np.asarray(ref(tokens)), rtol=1e-6, atol=1e-6)
  if spec.learn_scale:
    assert q.blocks.up.dot_general.w_step.shape == (DEPTH, 2, 32)  # the step gains the stack axis
  packed = jc.convert(q)
  qa = packed.blocks.up.kernel[...]
  assert isinstance(qa, jc.QArray) and qa.values.shape[0] == DEPTH
  np.testing.assert_allclose(np.asarray(packed(tokens)), np.asarray(q(tokens)), rtol=1e-5,
                             atol=1e-5)
  if not spec.learn_scale:  # save / restore through the skeleton of a fresh model
    jc.save_packed(packed, tmp_path / "packed")
    like = nnx.eval_shape(lambda: jc.packed_skeleton(ScannedLM(nnx.Rngs(0)), stacked_recipe))
    back = jc.restore_packed(tmp_path / "packed", like)
    np.testing.assert_array_equal(np.asarray(back(tokens)), np.asarray(packed(tokens)))
  after = jax.tree.map(np.asarray, nnx.state(scanned, nnx.Param))
  jax.tree.map(np.testing.assert_array_equal, before, after)


def test_report_names_each_stacked_layer_once_with_its_depth_and_the_float_layers(models):
  scanned, _, _ = models
  rep = jc.report(scanned, jc.Recipe([jc.Rule(r"blocks/\w+", quant=jc.Quant(w_bits=8))]))
  assert rep.matched[r"blocks/\w+"] == ["blocks/mix", "blocks/out", "blocks/up"]
  assert rep.depth == {"blocks/mix": DEPTH, "blocks/out": DEPTH, "blocks/up": DEPTH}
  assert "blocks/up x3" in str(rep)

  class Norm(nnx.Module):  # a custom layer a rule matches: reported as left in float

    def __init__(self):
      self.scale = nnx.Param(jnp.ones(4))

  model = nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), Norm())
  text = str(jc.report(model, jc.Recipe([jc.Rule(".*", quant=jc.Quant(w_bits=8))])))
  assert "left in float, not supported: layers/1 (Norm)" in text


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_magnitude_pruning_ranks_each_stacked_layer_on_its_own(models, pattern):
  scanned, loop, tokens = models
  payload = dict(sparsity=jc.Sparsity(pattern, sparsity=0.5))
  stacked_recipe, loop_recipe = _recipes(payload, "(up|out)")  # pruning takes no Einsum
  pruned = jc.prune(scanned, stacked_recipe, progress=False, strict=True)
  ref = jc.prune(loop, loop_recipe, progress=False, strict=True)
  zeros = jnp.mean(pruned.blocks.up.kernel[...] == 0, axis=(1, 2))
  np.testing.assert_array_equal(np.asarray(zeros), 0.5)  # per layer, not pooled over the stack
  for i in range(DEPTH):
    np.testing.assert_array_equal(np.asarray(pruned.blocks.up.kernel[...][i]),
                                  np.asarray(ref.blocks[i].up.kernel[...]))
  np.testing.assert_allclose(np.asarray(pruned(tokens)), np.asarray(ref(tokens)), rtol=1e-6,
                             atol=1e-6)


def test_rtn_ptq_on_a_stack_equals_the_per_layer_model(models):
  scanned, loop, tokens = models
  stacked_recipe, loop_recipe = _recipes(dict(quant=jc.Quant(w_bits=4, group=16)))
  q = jc.ptq(scanned, stacked_recipe, progress=False)
  np.testing.assert_allclose(np.asarray(q(tokens)),
                             np.asarray(jc.ptq(loop, loop_recipe, progress=False)(tokens)),
                             rtol=1e-6, atol=1e-6)


# Symmetric GPTQ and Wanda 2:4 on a stack: tests/models/test_llama_scan.py and the scanned
# distillation test (its 2:4 Wanda student).
CALIBRATED = [
    ("gptq_asym", dict(quant=jc.Quant(w_bits=3, group=16, method="gptq", w_symmetric=False,
                                      options={"act_order": True}))),
    ("awq", dict(quant=jc.Quant(w_bits=4, group=16, method="awq"))),
    ("smoothquant", dict(quant=jc.Quant(w_bits=8, a_bits=8, method="smoothquant"))),
    ("wanda", dict(sparsity=jc.Sparsity(sparsity=0.5, method="wanda"))),
    ("sparsegpt_2:4", dict(sparsity=jc.Sparsity("2:4", method="sparsegpt"))),
]


@pytest.mark.parametrize("payload", [p for _, p in CALIBRATED], ids=[n for n, _ in CALIBRATED])
def test_calibrated_methods_walk_the_stack_layer_by_layer(models, payload):
  """Each stacked layer is sliced out, calibrated on the outputs of the layers before it
  (already solved), solved and stacked back: the same results as the unstacked model."""
  scanned, loop, _ = models
  before = jax.tree.map(np.asarray, nnx.state(scanned, nnx.Param))
  calib = jax.random.randint(jax.random.key(5), (8, 12), 0, 50)
  transform = jc.ptq if "quant" in payload else jc.prune
  stacked_recipe, loop_recipe = _recipes(payload, "(up|out)")
  kw = dict(progress=False, return_report=True, calib_dtype=None, strict=True)
  new, results = transform(scanned, stacked_recipe, calib, **kw)
  ref, ref_results = transform(loop, loop_recipe, calib, **kw)
  errors = {r.path.replace("[", "/").replace("]", ""): r.error for r in results}
  ref_errors = {r.path: r.error for r in ref_results}
  assert sorted(errors) == sorted(ref_errors) == sorted(
      f"blocks/{i}/{n}" for i in range(DEPTH) for n in ("up", "out"))
  np.testing.assert_allclose([errors[k] for k in sorted(errors)],
                             [ref_errors[k] for k in sorted(errors)], rtol=1e-3, atol=1e-6)
  for i in range(DEPTH):
    for name in ("up", "out"):
      np.testing.assert_allclose(np.asarray(getattr(new.blocks, name).kernel[...][i]),
                                 np.asarray(getattr(ref.blocks[i], name).kernel[...]),
                                 rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(new(calib)), np.asarray(ref(calib)), rtol=1e-4,
                             atol=1e-4)
  if "quant" in payload:
    packed = jc.convert(new)
    np.testing.assert_allclose(np.asarray(packed(calib)), np.asarray(new(calib)), rtol=1e-4,
                               atol=1e-4)
  after = jax.tree.map(np.asarray, nnx.state(scanned, nnx.Param))
  jax.tree.map(np.testing.assert_array_equal, before, after)


@pytest.mark.parametrize("spec", [jc.LowRank(rank=4), jc.LowRank(reduction=0.4,
                                                                method="svd_llm")],
                         ids=["svd", "svd_llm"])
def test_factorize_each_stacked_layer(models, spec):
  scanned, loop, _ = models
  calib = jax.random.randint(jax.random.key(5), (8, 12), 0, 50)
  stacked_recipe, loop_recipe = _recipes(dict(lowrank=spec), "up")
  kw = dict(progress=False, return_report=True, calib_dtype=None, strict=True)
  new, results = jc.factorize(scanned, stacked_recipe, calib, **kw)
  ref, _ = jc.factorize(loop, loop_recipe, calib, **kw)
  assert new.blocks.up.a[...].shape[0] == DEPTH and all(r.rank == ref.blocks[0].up.rank
                                                        for r in results)
  np.testing.assert_allclose(np.asarray(new(calib)), np.asarray(ref(calib)), rtol=1e-4,
                             atol=1e-4)
  with pytest.raises(ValueError, match="blocks/up: the stacked layers got different ranks"):
    jc.factorize(scanned, _recipes(dict(lowrank=jc.LowRank(energy=0.5)), "up")[0], calib,
                 progress=False)


def test_lora_gives_each_stacked_layer_its_adapter(models):
  scanned, loop, tokens = models
  lora = jc.add_lora(scanned, "blocks/up", rank=4, rngs=nnx.Rngs(3))
  assert lora.blocks.up.lora_a.shape == (DEPTH, 16, 4) and lora.blocks.up.lora_b.shape == (
      DEPTH, 4, 32)
  np.testing.assert_allclose(np.asarray(lora(tokens)), np.asarray(scanned(tokens)), rtol=1e-6,
                             atol=1e-6)  # a fresh adapter changes nothing
  lora.blocks.up.lora_b[...] = jax.random.normal(jax.random.key(4), (DEPTH, 4, 32)) * 0.1
  ref = jc.add_lora(loop, r"blocks/\d+/up", rank=4, rngs=nnx.Rngs(3))
  for i in range(DEPTH):  # the same adapters, layer by layer
    ref.blocks[i].up.lora_a[...] = lora.blocks.up.lora_a[...][i]
    ref.blocks[i].up.lora_b[...] = lora.blocks.up.lora_b[...][i]
  np.testing.assert_allclose(np.asarray(lora(tokens)), np.asarray(ref(tokens)), rtol=1e-5,
                             atol=1e-5)
  merged = jc.merge_lora(lora)
  np.testing.assert_allclose(np.asarray(merged(tokens)), np.asarray(lora(tokens)), rtol=1e-4,
                             atol=1e-5)


def test_stack_axis_names_from_vmap_metadata_are_kept():
  """With ``transform_metadata={nnx.PARTITION_NAME: "layers"}`` (the stack axis has a logical
  name), LSQ steps and the variables a walk creates carry it too, so the scan still runs."""
  meta = {nnx.PARTITION_NAME: "layers"}

  class Up(nnx.Module):

    def __init__(self, rngs):
      self.up = nnx.Linear(16, 16, rngs=rngs, kernel_metadata={
          "out_sharding": ("embed", "mlp"), "eager_sharding": False})

    def __call__(self, x):
      return x + self.up(x)

  class Named(nnx.Module):

    def __init__(self, rngs):
      @nnx.split_rngs(splits=DEPTH)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=meta)
      def make(rngs):
        return Up(rngs)

      self.blocks = make(rngs)

    def __call__(self, x):
      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, transform_metadata=meta)
      def forward(x, block):
        return block(x)

      return forward(x, self.blocks)

  model = Named(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (4, 3, 16))
  names = lambda v: tuple(v.get_metadata()["out_sharding"])
  assert names(model.blocks.up.kernel) == ("layers", "embed", "mlp")
  lsq = jc.quantize(model, jc.Recipe([jc.Rule("blocks/up", quant=jc.Quant(
      w_bits=4, learn_scale=True))]))
  assert names(lsq.blocks.up.dot_general.w_step) == ("layers", None, "mlp")
  gptq = jc.ptq(model, jc.Recipe([jc.Rule("blocks/up", quant=jc.Quant(w_bits=4, method="gptq"))]),
                x, progress=False, calib_dtype=None)
  assert names(gptq.blocks.up.dot_general.w_step) == ("layers", None, "mlp")
  assert names(gptq.blocks.up.kernel) == ("layers", "embed", "mlp")
  assert gptq(x).shape == x.shape and float(jnp.mean((gptq(x) - model(x)) ** 2)) < 0.05


def test_a_recipe_for_the_unrolled_model_applies_to_the_stack(models):
  scanned, loop, tokens = models
  spec = jc.Quant(w_bits=4, group=8)
  unrolled_recipe = jc.Recipe([jc.Rule(r"blocks/\d+/(up|out)", quant=spec)])
  rep = jc.report(scanned, unrolled_recipe)
  assert sorted(rep.matched[r"blocks/\d+/(up|out)"]) == ["blocks/out", "blocks/up"]
  q_scan, q_loop = jc.quantize(scanned, unrolled_recipe), jc.quantize(loop, unrolled_recipe)
  np.testing.assert_allclose(np.asarray(q_scan(tokens)), np.asarray(q_loop(tokens)), rtol=1e-5,
                             atol=1e-6)


def test_a_rule_splitting_a_stack_is_a_one_line_error(models):
  scanned, _, _ = models
  split = jc.Recipe([jc.Rule(r"blocks/0/up", skip=True),
                     jc.Rule(r".*", quant=jc.Quant(w_bits=8))])
  with pytest.raises(ValueError, match=r"^blocks/up: the recipe splits the 3 layers stacked in "
                     r"'blocks' \('blocks/0/up': layers \[0\]; '\.\*': layers \[1, 2\]\)"):
    jc.quantize(scanned, split)
