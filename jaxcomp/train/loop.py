"""The training loop: one function, read top to bottom.

State is a pytree (`TrainState`: step, params, optimizer state, rng) placed on a device mesh
with shardings from the params' logical axis names; the batch for step ``s`` is a pure
function of (seed, s), so a checkpoint at step ``s`` plus the config is the whole run.
Compression composes in before the loop (``config.recipe`` rewrites the model); the step
itself has no branches on it.
"""

from __future__ import annotations

import os
import signal
import statistics
import threading
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from tqdm import tqdm

from jaxcomp.eval.size import kernel_sparsity, model_bits
from jaxcomp.recipe import Recipe
from jaxcomp.rewrite import engine, quantize
from jaxcomp.rewrite import delayed
from jaxcomp.sparse.spec import Sparsity
from jaxcomp.sparse.training import cubic_schedule, sparsify
from jaxcomp.train import sharding as sh
from jaxcomp.train import tasks
from jaxcomp.train import workdir as wd
from jaxcomp.train.checkpoint import Checkpointer
from jaxcomp.train.metrics import MetricWriter


class TrainState(NamedTuple):
  """Everything that changes during training (checkpointed as one pytree)."""

  step: jax.Array  # int32 scalar: steps taken.
  params: nnx.State  # the model's nnx.Param leaves (quantization steps included) and absmax histories.
  opt_state: optax.OptState  # optimizer state, mirroring params.
  rng: jax.Array  # uint32 key data; step s uses fold_in(rng, s).


class TrainingDiverged(RuntimeError):
  """The loss became NaN/inf; the last finite checkpoint is kept."""


class Preempted(RuntimeError):
  """SIGTERM arrived: a checkpoint of the step just finished was written; rerun to resume."""


class PreemptionGuard:
  """Turns SIGTERM into a flag the loop checks after each step (main thread only).

  With several processes, a step stops only when every process agrees: the flags are
  combined with a max across processes, so all of them save the same step and exit. A
  second SIGTERM while the final checkpoint is written is ignored (the flag is already set).
  """

  def __init__(self):
    self._flag = False
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_term)

  def _on_term(self, signum, frame):
    del signum, frame
    self._flag = True

  def requested(self, step: int) -> bool:
    """Whether to stop after ``step`` (collective with several processes)."""
    del step  # every step is a sync point
    if jax.process_count() == 1:
      return self._flag
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    flags = multihost_utils.process_allgather(np.int32(self._flag))
    return bool(np.max(flags))

  def restore(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def global_batch(local: dict[str, np.ndarray], sharding: jax.sharding.NamedSharding) -> Any:
  """A global batch from each process's rows (``batch_at`` with ``process_slice``): one
  process gives the whole batch; with several, the leading axis is their concatenation in
  process order."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local)


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """AdamW with linear warmup and cosine decay over ``total_steps``.

  Example:
    >>> tx = make_optimizer(ml_collections.ConfigDict(dict(lr=1e-3, warmup_steps=10,
    ...                     weight_decay=0.0, grad_clip=1.0)), total_steps=100)
  """
  if not 0 <= cfg.warmup_steps < total_steps:
    raise ValueError(f"train.warmup_steps={cfg.warmup_steps} must be in [0, {total_steps}), the "
                     "run's number of steps")
  schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps, total_steps)
  return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                     optax.adamw(schedule, weight_decay=cfg.weight_decay))


def sparsity_specs(model: nnx.Module, recipe: Recipe | None) -> dict[str, Sparsity]:
  """``{"<layer path>/kernel": Sparsity}`` for the layers a rule with ``sparsity=`` matches."""
  if recipe is None or not any(r.sparsity is not None for r in recipe.rules):
    return {}
  todo, report = engine.plan(model, recipe, {nnx.Linear, nnx.LinearGeneral, nnx.Conv},
                              lambda r: r.sparsity)
  report.check()
  return {f"{path}/kernel": rule.sparsity for path, _, rule in todo}


def make_sparsity(cfg: ml_collections.ConfigDict, tx: optax.GradientTransformation,
                  kernels: dict[str, Sparsity], total_steps: int) -> optax.GradientTransformation:
  """Wraps ``tx`` in `jaxcomp.sparse.sparsify` for ``kernels``, as ``train.sparsity`` says:
  ``begin`` / ``end`` (fractions of the run) of Zhu & Gupta's cubic ramp, ``update_every``
  (steps) and ``score``."""
  if not 0.0 <= cfg.begin < cfg.end <= 1.0:
    raise ValueError(f"train.sparsity needs 0 <= begin < end <= 1, got {cfg.begin}, {cfg.end}")
  begin, end = int(cfg.begin * total_steps), max(int(cfg.end * total_steps), 1)
  return sparsify(tx, lambda path, _: kernels.get(path),
                  schedule=cubic_schedule(begin, max(end, begin + 1)),
                  update_every=cfg.update_every, score=cfg.score)


def masked_updates(masks: Any) -> optax.GradientTransformation:
  """Multiplies each update by its mask (``masks`` mirrors the params; a scalar ``True`` leaves
  a leaf free), so that masked weights never move: a pruned model stays pruned.

  Example:
    >>> tx = optax.chain(optax.adam(1e-2), masked_updates({"w": jnp.array([True, False])}))
    >>> u, _ = tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.ones(2)}))
    >>> (u["w"] != 0).tolist()
    [True, False]
  """

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, m: u * m.astype(u.dtype), updates, masks), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def zero_masks(params: Any) -> Any:
  """`masked_updates` masks that keep every exact zero of a kernel (rank >= 2) at zero: the
  mask of a model pruned before training starts.

  Example:
    >>> zero_masks({"w": jnp.array([[0., 1.]]), "b": jnp.zeros(2)})["w"].tolist()
    [[False, True]]
  """
  return jax.tree.map(lambda p: (p != 0) if p.ndim >= 2 and bool(jnp.any(p == 0))
                      else jnp.bool_(True), params)


def make_step(loss: Any, graphdef: nnx.GraphDef, rest: nnx.State,
              tx: optax.GradientTransformation) -> Any:
  """The training step ``(state, batch) -> (state, metrics)``, to be jitted with shardings.

  ``loss(model, batch, rng, frozen) -> (scalar, metrics)`` is a task's loss; the model is
  rebuilt from ``graphdef``, the state's params and ``rest`` (non-trainable variables);
  ``frozen`` is a pytree the step reads but never trains (a distillation teacher's weights:
  an argument, sharded like params, not a constant baked into the program); step ``s`` draws
  its randomness from ``fold_in(state.rng, s)``.

  Example::

    step = jax.jit(make_step(task.loss, graphdef, rest, tx), donate_argnums=0)
    state, metrics = step(state, batch)
  """

  def train_step(state: TrainState, batch: dict[str, jax.Array], frozen: Any = None):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def loss_fn(params):
      return loss(nnx.merge(graphdef, params, rest), batch, rng, frozen)

    (value, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "loss": value, "grad_norm": optax.tree.norm(delayed.without_amax(grads))}
    return state._replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_calibration(loss: Any, graphdef: nnx.GraphDef, rest: nnx.State) -> Any:
  """``(state, batch, frozen) -> state`` with the absmax histories of the delayed-scaling
  layers filled from ``batch`` (`jaxcomp.calibrate_amax`); run once before the first step.

  Example::

    state = jax.jit(make_calibration(task.loss, graphdef, rest))(state, batch)
  """

  def calibrate(state: TrainState, batch: dict[str, jax.Array], frozen: Any = None):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    model = nnx.merge(graphdef, state.params, rest)
    model = delayed.calibrate_amax(model, lambda m: loss(m, batch, rng, frozen)[0])
    return state._replace(params=nnx.state(model, delayed.TRAINED))

  return calibrate


def _check_batch(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  split = int(np.prod([mesh.shape[a] for a in sh.BATCH]))
  if config.data.batch_size % split:
    raise ValueError(f"data.batch_size={config.data.batch_size} does not divide over the "
                     f"{split} devices of the mesh's data x fsdp axes")


def _recipe(config: ml_collections.ConfigDict) -> Recipe | None:
  recipe = Recipe.from_config(config.recipe) if config.get("recipe") else None
  if (recipe is not None and any(r.sparsity is not None for r in recipe.rules)
      and config.train.get("sparsity") is None):
    raise ValueError("the recipe has sparsity rules: set train.sparsity (begin, end, "
                     "update_every, score)")
  return recipe


class _Run(NamedTuple):
  """What `train` and `compile_step` build the same way before the first step."""

  graphdef: nnx.GraphDef
  rest: nnx.State
  tx: optax.GradientTransformation
  sparse_kernels: dict[str, Sparsity]
  state: TrainState  # arrays, or ShapeDtypeStructs when abstract
  state_sharding: Any
  frozen: Any
  frozen_sharding: Any


def _assemble(config: ml_collections.ConfigDict, task: tasks.Task, recipe: Recipe | None,
              mesh: jax.sharding.Mesh, total_steps: int, abstract: bool = False) -> _Run:
  """The model (compressed by ``recipe``), optimizer, initial state and frozen pytree with
  their shardings on ``mesh``; ``abstract``: shapes only (nothing read or allocated)."""
  found = {}

  def compress(model):
    found["sparse"] = sparsity_specs(model, recipe)  # kernel paths survive quantize
    if recipe is not None and any(r.quant is not None for r in recipe.rules):
      model = quantize(model, recipe, strict=True)
    return model

  model = task.model(config, rngs=nnx.Rngs(config.seed), abstract=abstract)
  # Abstract: traced, so that the rewrites read shapes from tracers.
  model = nnx.eval_shape(compress, model) if abstract else compress(model)
  sparse_kernels = found["sparse"]
  graphdef, params, rest = nnx.split(model, delayed.TRAINED, ...)
  tx = make_optimizer(config.train, total_steps)
  if sparse_kernels:
    tx = make_sparsity(config.train.get("sparsity"), tx, sparse_kernels, total_steps)
  update_mask = getattr(task, "update_mask", None)
  if update_mask is not None and not abstract:  # e.g. a pruned student keeps its zeros
    tx = optax.chain(tx, masked_updates(update_mask(params)))
  if delayed.has_delayed(params):  # absmax histories take their cotangent as their value
    tx = delayed.amax_overwrite(tx)
  opt_state = jax.eval_shape(tx.init, params) if abstract else tx.init(params)
  rng = jax.random.key_data(jax.random.key(config.seed))
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state, rng=rng)
  if abstract:
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  state_sharding = sh.state_shardings(state, mesh, config.mesh.rules)
  frozen = task.frozen(config, abstract=abstract)
  frozen_sharding = (None if frozen is None else
                     sh.param_shardings(frozen, mesh, config.mesh.rules))
  return _Run(graphdef, rest, tx, sparse_kernels, state, state_sharding, frozen,
              frozen_sharding)


def _jit_step(task: tasks.Task, run: _Run, batch_sharding: jax.sharding.NamedSharding) -> Any:
  """The jitted training step: the state donated, shardings fixed in and out."""
  return jax.jit(make_step(task.loss, run.graphdef, run.rest, run.tx),
                 in_shardings=(run.state_sharding, batch_sharding, run.frozen_sharding),
                 out_shardings=(run.state_sharding, None), donate_argnums=0)


def compile_step(config: ml_collections.ConfigDict, workdir: str, topology: str
                 ) -> dict[str, Any]:
  """Compiles ``config``'s training step for a TPU slice or GPU that is not here (a dry run
  before a pod launch, as MaxText's ``train_compile.py``): the real model's shapes, the config's
  recipe, optimizer, mesh and rules, on the compile-only devices of ``topology``
  (`jaxcomp.aot.target`: ``"v5p:4x4x4"``, ``"v6e:16x16"``, ``"h100"``). No data, weights or
  checkpoints are read. Writes ``workdir/compile_report.json``.

  Returns:
    The report: per-device HBM (arguments, outputs, aliased, temporaries, code, peak; compiler
    estimates) against the chip's HBM, devices, mesh, compile time.

  Raises:
    ValueError: the mesh does not divide the topology's devices, a dimension does not divide
      its mesh axis, an unknown topology, or a student stage that needs weights.

  Example::

    report = compile_step(get_config("w4_2of4"), "runs/dry", "v5p:4x4x4")
    report["peak_gib"], report["fits"]
  """
  from jaxcomp import aot  # pylint: disable=import-outside-toplevel
  task = tasks.get(config)
  recipe = _recipe(config)
  target = aot.target(topology)
  t0 = time.perf_counter()
  mesh = sh.make_mesh(config.mesh, devices=target.devices)
  _check_batch(config, mesh)
  total_steps = config.train.get("steps") or config.train.warmup_steps + 1  # shapes only
  run = _assemble(config, task, recipe, mesh, total_steps, abstract=True)
  batch_sharding = sh.batch_sharding(mesh)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
           for k, v in task.batch_spec(config).items()}
  with aot.tracing_for(target), sh.activation_rules(mesh, config.mesh.rules):
    compiled = _jit_step(task, run, batch_sharding).lower(run.state, batch, run.frozen).compile()
  report = aot.report_of(compiled, target, devices=mesh.size)
  gib = lambda b: round(b / 2**30, 3)
  out = {"topology": target.name, "devices": mesh.size,
         "mesh": dict(zip(mesh.axis_names, mesh.devices.shape)),
         "rules": config.mesh.rules or "data_parallel",
         "params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(run.state.params))),
         "argument_gib": gib(report.argument_bytes), "output_gib": gib(report.output_bytes),
         "alias_gib": gib(report.alias_bytes), "temp_gib": gib(report.temp_bytes),
         "code_gib": gib(report.code_bytes), "peak_gib": gib(report.peak_bytes),
         "hbm_gib": gib(report.hbm_bytes), "fits": report.fits,
         "compile_s": round(time.perf_counter() - t0, 1),
         "note": "per device, compiler estimates (XLA memory analysis), not measurements"}
  os.makedirs(workdir, exist_ok=True)
  aot.write_report(os.path.join(workdir, "compile_report.json"), report)
  return out


def train(config: ml_collections.ConfigDict, workdir: str, *, task: tasks.Task | None = None,
          return_model: bool = False) -> Any:
  """Trains ``config``'s model in ``workdir``, resuming from its last checkpoint.

  Args:
    config: the run's config (``config.task`` names the task unless ``task`` is given).
    workdir: checkpoints, metrics and ``config.json``.
    task: a task instance to train instead of ``config.task``'s (a pipeline stage's, which
      brings its own model and teacher).
    return_model: also return the trained model.

  Returns:
    The final report: test accuracy and loss, median step time, model size in bytes (weights
    at their stored bit width), steps run; with ``return_model``, ``(report, model)``.
  """
  # ----------------------------------------------------------------------- set-up
  # Everything that can fail on bad input runs before the workdir is created or written.
  task = task if task is not None else tasks.get(config)
  recipe = _recipe(config)
  validate(config)
  wd.sanity_warnings(config)
  wd.check_config(workdir, config)
  data = task.data(config)
  total_steps = config.train.get("steps") or config.train.epochs * data.steps_per_epoch
  if total_steps <= 0:
    raise ValueError(f"the run has {total_steps} steps (train.steps / train.epochs x "
                     f"{data.steps_per_epoch} steps per epoch); it needs at least one")
  mesh = sh.make_mesh(config.mesh)
  _check_batch(config, mesh)
  run = _assemble(config, task, recipe, mesh, total_steps)
  with wd.claim(workdir, config):  # the workdir's lock, held to the end of the run
    return _train_in(config, workdir, task, recipe, data, total_steps, mesh, run,
                     return_model)


def validate(config: ml_collections.ConfigDict) -> None:
  """Cheap checks of ``config.train`` / ``config.data`` (one-line ValueErrors) before anything
  is built; the rest is validated by building it (data, mesh, model, recipe, optimizer).

  Example::

    validate(get_config("w4a8_lsq,tiny"))
  """
  train_cfg, data_cfg = config.get("train"), config.get("data")
  if data_cfg is not None and "batch_size" in data_cfg:
    b = data_cfg.batch_size
    if not isinstance(b, int) or isinstance(b, bool) or b <= 0:
      raise ValueError(f"data.batch_size must be a positive integer, got {b!r}")
  if train_cfg is None:
    return
  for key in ("epochs", "steps", "log_every", "checkpoint_every", "keep_checkpoints",
              "warmup_steps"):
    v = train_cfg.get(key)
    if v is None:
      continue
    least = 1 if key in ("log_every", "checkpoint_every", "keep_checkpoints") else 0
    if not isinstance(v, int) or isinstance(v, bool) or v < least:
      raise ValueError(f"train.{key} must be an integer >= {least}, got {v!r}")
  if not (train_cfg.get("steps") or train_cfg.get("epochs")):
    raise ValueError("train.steps and train.epochs are both 0: the run would take no step")


def _train_in(config: ml_collections.ConfigDict, workdir: str, task: tasks.Task,
              recipe: Recipe | None, data: Any, total_steps: int, mesh: jax.sharding.Mesh,
              run: _Run, return_model: bool) -> Any:
  """`train` once the workdir is claimed: restore, the loop, the report."""
  graphdef, rest, sparse_kernels = run.graphdef, run.rest, run.sparse_kernels
  state = jax.device_put(run.state, run.state_sharding)
  frozen = None if run.frozen is None else jax.device_put(run.frozen, run.frozen_sharding)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), every=config.train.checkpoint_every,
                      keep=config.train.keep_checkpoints)
  writer = None
  preemption = PreemptionGuard()
  try:  # the checkpointer and the metrics file are closed on every way out
    state = ckpt.restore_latest(state)
    start = int(state.step)
    if start == total_steps:
      logging.info("%s: the run is finished (step %d of %d); evaluating its last checkpoint",
                   workdir, start, total_steps)
    elif start:
      logging.info("resumed from %s at step %d", ckpt.directory, start)
    writer = MetricWriter(workdir, start_step=start) if jax.process_index() == 0 else None
    batch_sharding = sh.batch_sharding(mesh)

    # --------------------------------------------------------------------- step
    train_step = _jit_step(task, run, batch_sharding)
    if start == 0 and delayed.has_delayed(state.params):  # delayed scaling: fill the histories
      calibrate = jax.jit(make_calibration(task.loss, graphdef, rest),
                          in_shardings=(run.state_sharding, batch_sharding, run.frozen_sharding),
                          out_shardings=run.state_sharding)
      with sh.activation_rules(mesh, config.mesh.rules):
        state = calibrate(state, global_batch(data.batch_at(0), batch_sharding), frozen)

    # --------------------------------------------------------------------- loop
    marks: list[tuple[int, float]] = []  # (step, time) at each host sync, for step times
    pending: list[dict[str, jax.Array]] = []
    last_good = start
    progress = tqdm(range(start, total_steps), initial=start, total=total_steps,
                    disable=not config.train.progress, desc=os.path.basename(workdir.rstrip("/")))
    for step in progress:
      batch = global_batch(data.batch_at(step), batch_sharding)  # this process's rows only
      with sh.activation_rules(mesh, config.mesh.rules):  # read when the step is traced
        state, metrics = train_step(state, batch, frozen)
      pending.append(metrics)
      done = step + 1
      stop = preemption.requested(done)
      if (stop or done % config.train.log_every == 0 or done % ckpt.every == 0
          or done == total_steps):
        rows = jax.device_get(pending)
        pending = []
        if not all(np.isfinite(r["loss"]) for r in rows):
          raise TrainingDiverged(
              f"loss is not finite at or before step {done}; stopped, the last good checkpoint "
              f"(step {last_good if ckpt.latest_step() is not None else 'none'}) is kept")
        marks.append((done, time.perf_counter()))
        means = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        if writer is not None:
          writer.write(done, means)
        progress.set_postfix(loss=f"{means['loss']:.4f}")
        if ckpt.save(done, state, force=done == total_steps or stop):
          last_good = done
      if stop:
        ckpt.wait()
        raise Preempted(f"stopped by SIGTERM after step {done}; checkpoint {done} saved in "
                        f"{ckpt.directory}: rerun the same command to resume")
    ckpt.wait()

    # --------------------------------------------------------------------- report
    final = nnx.merge(graphdef, state.params, rest)
    evaluation = task.evaluate(final, data, frozen)
    # Per-step time between host syncs; the first interval (compilation) is left out.
    times = [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(marks, marks[1:])]
    report = {
        **evaluation,
        "steps": total_steps,
        "step_time_ms": 1e3 * statistics.median(times) if times else float("nan"),
        "model_bytes": model_bits(final, recipe) // 8,
    }
    if sparse_kernels:  # measured on the final weights
      report["sparsity"] = kernel_sparsity(final, [p.rsplit("/", 1)[0] for p in sparse_kernels])
    if writer is not None:  # a rerun of a finished run finds this row there: not written twice
      writer.write(total_steps, {f"final/{k}": v for k, v in report.items()
                                 if isinstance(v, (int, float))})
  finally:
    preemption.restore()
    ckpt.close()  # also on errors: no orbax threads left to print at exit
    if writer is not None:
      writer.close()
  return (report, final) if return_model else report
