"""Every kernel compiled by the real TPU (Mosaic) and GPU (Triton, ptxas) compilers for every
target (`jaxcomp.aot`, no device needed): the Pallas custom call is in the compiled program, the
report has the compiler's memory figures, and what the hardware cannot take fails with a clear
error. GPU targets compile in a process of their own with the CUDA plugin of ``make aot-gpu``
(`gpu_compile.py`). Skipped, with the reason, only where libtpu / that plugin is absent."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from jaxcomp import aot
from pallas_kernels import int8_matmul, tiling

from tests.kernels.kernel_cases import KERNELS

TPUS = ("v4", "v5e", "v5p", "v6e")
GPUS = ("a100", "h100")

ROOT = pathlib.Path(__file__).resolve().parents[2]
GPU_PLUGIN = pathlib.Path(os.environ.get("JAXCOMP_CUDA_PLUGIN_DIR", ROOT / ".venv" / "aot-gpu"))

needs_libtpu = pytest.mark.skipif(bool(aot.missing("tpu")), reason=str(aot.missing("tpu")))
needs_gpu_plugin = pytest.mark.skipif(not (GPU_PLUGIN / "jax_plugins").is_dir(),
                                      reason=f"no CUDA plugin in {GPU_PLUGIN} (make aot-gpu)")


@needs_libtpu
@pytest.mark.parametrize("name", sorted(KERNELS))
@pytest.mark.parametrize("chip", TPUS)
def test_every_kernel_compiles_for_every_tpu(chip, name):
  make, avals = KERNELS[name]
  compiled, report = aot.compile_for(make("tpu"), *avals, target=chip)
  assert report.custom_calls >= 1, compiled.as_text()[:2000]  # the kernel, not XLA
  assert report.argument_bytes >= sum(a.size * a.dtype.itemsize for a in avals)
  assert report.fits


@needs_gpu_plugin
def test_every_kernel_compiles_for_every_gpu_and_too_large_tiles_say_so():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(GPU_PLUGIN), str(ROOT)]))
  out = subprocess.run([sys.executable, "-m", "tests.kernels.gpu_compile"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
  compiled = {(r["target"], r["case"]): r for r in rows if "kernels" in r}
  assert set(compiled) == {(g, c) for g in GPUS for c in KERNELS}
  for (gpu, case), r in compiled.items():
    assert r["kernels"] >= 1, (gpu, case)  # the Triton kernel, not XLA
    avals = KERNELS[case][1]
    assert r["argument_bytes"] >= sum(a.size * a.dtype.itemsize for a in avals)
  # The compiler's own error names the limit (requested 1572864, available 232448 on H100).
  assert "Shared memory size limit exceeded" in rows[-1]["error"]


@needs_libtpu
def test_target_names_and_slices():
  v5p = aot.target("v5p:4x4x4")
  assert (v5p.platform, v5p.generation, len(v5p.devices)) == ("tpu", "v5p", 64)
  assert aot.target("v6e").hbm_bytes > 30e9 and len(aot.target("v6e").devices) == 1
  with pytest.raises(ValueError, match="target must be one of"):
    aot.target("v3")
  with pytest.raises(ValueError, match="has 64"):
    v5p.mesh({"data": 6, "model": 10})


@needs_libtpu
def test_sharded_program_reports_per_device_memory_and_estimated_cycles():
  target = aot.target("v5e:2x2")
  mesh = target.mesh({"data": 4})
  x = jax.ShapeDtypeStruct((4096, 2048), jnp.bfloat16, sharding=target.sharding(("data",), mesh))
  w = jax.ShapeDtypeStruct((2048, 2048), jnp.bfloat16, sharding=target.sharding((), mesh))
  _, report = aot.compile_for(lambda x, w: jax.nn.relu(x @ w) @ w, x, w, target=target,
                              mesh_shape={"data": 4})
  assert report.devices == 4
  # Per device: a quarter of x, all of w; a quarter of the output.
  assert report.argument_bytes == 4096 * 2048 * 2 // 4 + 2048 * 2048 * 2
  assert report.output_bytes == 4096 * 2048 * 2 // 4
  assert report.estimated_cycles > 0 and report.fusions >= 1
  assert report.flops >= 2 * 2 * 1024 * 2048 * 2048  # two matmuls on a quarter of the rows
  assert "fits" in str(report)


@needs_libtpu
def test_too_large_tile_is_a_clear_error():
  x = jax.ShapeDtypeStruct((4096, 8192), jnp.int8)
  w = jax.ShapeDtypeStruct((8192, 8192), jnp.int8)
  huge = tiling.Blocks(tm=4096, tn=8192, tk=8192)
  with pytest.raises(ValueError, match="VMEM"):
    aot.compile_for(lambda x, w: int8_matmul(x, w, backend="tpu", blocks=huge), x, w,
                    target="v5e")


# ----------------------------------------------------------------- whole programs

def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _llama(n_layers=2, **kw):
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from jaxcomp.models.llama import Llama, LlamaConfig  # pylint: disable=import-outside-toplevel
  cfg = LlamaConfig(vocab_size=512, dim=256, n_layers=n_layers, n_heads=4, n_kv_heads=2, ffn_dim=512,
                    max_seq_len=128, tie_embeddings=True, **kw)
  return cfg, Llama(cfg, rngs=nnx.Rngs(0))


PROJ = r".*_proj"


@needs_libtpu
@pytest.mark.parametrize("chip", ["v5e", "v6e"])
@pytest.mark.parametrize("spec", ["w8a8", "w4g128"])
def test_packed_llama_forward_compiles_through_the_kernels(chip, spec):
  from flax import nnx  # pylint: disable=import-outside-toplevel
  import jaxcomp as jc  # pylint: disable=import-outside-toplevel
  quant = (jc.Quant(w_bits=8, a_bits=8) if spec == "w8a8" else jc.Quant(w_bits=4, group=128))
  cfg, model = _llama()
  packed = jc.convert(jc.quantize(model, jc.Recipe([jc.Rule(PROJ, quant=quant)])),
                      backend="tpu")
  graphdef, state = nnx.split(packed)
  tokens = jax.ShapeDtypeStruct((8, 128), jnp.int32)
  _, report = aot.compile_for(lambda s, t: nnx.merge(graphdef, s)(t), _abstract(state), tokens,
                              target=chip)
  assert report.custom_calls == 7 * cfg.n_layers  # every projection through a Mosaic kernel


@needs_libtpu
@pytest.mark.parametrize("task", ["qat_w8a8", "distill"])
def test_training_steps_compile_through_the_int8_kernel(task):
  """The QAT w8a8 step (int8 forward and both backward dots, g_bits=8) and a distillation
  step (frozen bf16 teacher argument, w8a8 student), each `train.loop.make_step`, for v5e."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  import jaxcomp as jc  # pylint: disable=import-outside-toplevel
  from jaxcomp.distill import losses  # pylint: disable=import-outside-toplevel
  from jaxcomp.train.loop import TrainState, make_step  # pylint: disable=import-outside-toplevel
  # one layer: the libtpu compile of its 21 Mosaic kernels is most of the test's time (the
  # forward test above checks that every layer's projections go through the kernels)
  cfg, model = _llama(n_layers=1)
  recipe = jc.Recipe([jc.Rule(PROJ, quant=jc.Quant(w_bits=8, a_bits=8, g_bits=8))])
  student = jc.quantize(model, recipe, backend="tpu")
  graphdef, params, rest = nnx.split(student, nnx.Param, ...)
  teacher_graphdef, teacher = nnx.split(model)
  teacher = jax.tree.map(lambda x: x.astype(jnp.bfloat16), teacher)

  def loss(m, batch, rng, frozen):
    del rng
    inputs, labels = batch["tokens"][:, :-1], batch["tokens"][:, 1:]
    logits = m(inputs)
    if frozen is None:
      return losses.cross_entropy(logits, labels), {}
    t_logits = jax.lax.stop_gradient(nnx.merge(teacher_graphdef, frozen)(inputs))
    return losses.kd_loss(logits, t_logits, labels, alpha=0.5)

  tx = optax.adam(1e-3)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.key_data(jax.random.key(0)))
  batch = {"tokens": jax.ShapeDtypeStruct((8, 129), jnp.int32)}
  frozen = _abstract(teacher) if task == "distill" else None
  _, report = aot.compile_for(make_step(loss, graphdef, rest, tx), _abstract(state), batch,
                              frozen, target="v5e", donate_argnums=(0,))
  # Per projection: the forward dot and the two backward dots (input and weight gradients).
  assert report.custom_calls == 3 * 7 * cfg.n_layers
  assert report.alias_bytes > 0  # the donated state is updated in place
