"""Tasks: what the training loop trains (data, model, loss, evaluation), chosen by config.

A task is a small object with six methods; ``frozen(config)`` is a pytree the step reads but
does not train (a distillation teacher's weights; None for plain training), passed to ``loss``
and ``evaluate``. ``model`` and ``frozen`` with ``abstract=True`` give shapes only (nothing
read, fetched or allocated) and ``batch_spec`` the global batch's shapes: what a compile-only
dry run (`jaxcomp.train.loop.compile_step`) needs. The loop calls nothing else, so a new task
adds a class and no branch to the loop.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from jaxcomp.data import default_data_dir
from jaxcomp.models import CNN, CNNConfig, ViT, ViTConfig


class Data(Protocol):
  """Deterministic input: ``batch_at(step)`` is a pure function of (seed, step)."""

  steps_per_epoch: int

  def batch_at(self, step: int) -> dict[str, np.ndarray]: ...

  def eval_batches(self) -> Any: ...


class Task(Protocol):

  def data(self, config: ml_collections.ConfigDict) -> Data: ...

  def model(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs,
            abstract: bool = False) -> nnx.Module: ...

  def batch_spec(self, config: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]: ...

  def loss(self, model: nnx.Module, batch: dict[str, jax.Array], rng: jax.Array,
           frozen: Any = None) -> tuple[jax.Array, dict[str, jax.Array]]: ...

  def frozen(self, config: ml_collections.ConfigDict, abstract: bool = False) -> Any: ...

  def evaluate(self, model: nnx.Module, data: Data, frozen: Any = None) -> dict[str, Any]: ...


class _ImageData:
  """Train batches by step (grain sampler over the tfds data source) and a padded test pass."""

  def __init__(self, config: ml_collections.ConfigDict):
    from jaxcomp.data import fashion_mnist, sampler  # pylint: disable=import-outside-toplevel
    if config.data.name != "fashion_mnist":
      raise ValueError(f"data.name must be 'fashion_mnist', got {config.data.name!r}")
    train = fashion_mnist.load(config.data.data_dir, "train")
    self._test = fashion_mnist.load(config.data.data_dir, "test")
    if config.data.cache:  # decode once; batches then cost an index, not B PNG decodes
      train, self._test = sampler.InMemorySource(train), sampler.InMemorySource(self._test)
    self._train = sampler.TrainSampler(train, batch_size=config.data.batch_size,
                                       seed=config.seed, transform=fashion_mnist.preprocess)
    self._eval_batch = config.data.eval_batch_size
    self.steps_per_epoch = self._train.steps_per_epoch

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    return self._train.batch_at(step)

  def eval_batches(self):
    from jaxcomp.data import fashion_mnist, sampler  # pylint: disable=import-outside-toplevel
    return sampler.eval_batches(self._test, batch_size=self._eval_batch,
                                transform=fashion_mnist.preprocess)


class ImageClassification:
  """Fashion-MNIST-style classification with a CNN or ViT; cross-entropy, accuracy."""

  def data(self, config: ml_collections.ConfigDict) -> Data:
    return _ImageData(config)

  def model(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs,
            abstract: bool = False) -> nnx.Module:
    if abstract:
      return nnx.eval_shape(lambda: self.model(config, rngs=nnx.Rngs(config.seed)))
    cfg = config.model
    if cfg.name == "cnn":
      base = CNNConfig.tiny() if cfg.size == "tiny" else CNNConfig()
      if cfg.get("hidden_dim"):  # a wider fc1, e.g. to prune an over-parameterized head
        base = dataclasses.replace(base, hidden_dim=cfg.hidden_dim)
      return CNN(base, rngs=rngs)
    if cfg.name == "vit":
      base = ViTConfig.tiny() if cfg.size == "tiny" else ViTConfig()
      return ViT(base, rngs=rngs)
    raise ValueError(f"model.name must be 'cnn' or 'vit', got {cfg.name!r}")

  def batch_spec(self, config: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
    b = config.data.batch_size
    return {"image": jax.ShapeDtypeStruct((b, 28, 28, 1), jnp.float32),
            "label": jax.ShapeDtypeStruct((b,), jnp.int32)}

  def loss(self, model, batch, rng, frozen=None):
    del rng, frozen  # no dropout in these models, nothing frozen
    logits = model(batch["image"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}

  def frozen(self, config, abstract=False):
    del config, abstract
    return None  # nothing but the model

  def evaluate(self, model, data, frozen=None) -> dict[str, float]:
    del frozen
    @jax.jit
    def counts(batch):
      logits = model(batch["image"])
      nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
      mask = batch.get("mask", jnp.ones_like(nll))
      return (jnp.sum(mask * (jnp.argmax(logits, -1) == batch["label"])), jnp.sum(mask * nll),
              jnp.sum(mask))

    correct = nll = n = 0.0
    for batch in data.eval_batches():
      c, l, m = jax.device_get(counts(batch))
      correct, nll, n = correct + c, nll + l, n + m
    return {"test_accuracy": float(correct / n), "test_loss": float(nll / n)}


def _distill() -> Task:
  from jaxcomp.distill.task import DistillTask  # pylint: disable=import-outside-toplevel
  return DistillTask()


TASKS: dict[str, Any] = {"image_classification": ImageClassification, "distill": _distill}


def get(config: ml_collections.ConfigDict) -> Task:
  """A new instance of the task named by ``config.task`` (one per run)."""
  if config.task not in TASKS:
    raise ValueError(f"task must be one of {', '.join(TASKS)}; got {config.task!r}")
  return TASKS[config.task]()


def fmnist_config(*, tiny: bool = False) -> ml_collections.ConfigDict:
  """The Fashion-MNIST CNN training config that ``configs/fmnist_*.py`` build on (no recipe).

  ``tiny``: the test-sized run (tiny CNN, batch 32, three epochs).

  Example::

    config = fmnist_config(tiny=True)
    config.recipe = recipe.to_config()
  """
  data_dir = default_data_dir()
  config = ml_collections.ConfigDict()
  config.task = "image_classification"
  config.seed = 0
  config.model = dict(name="cnn", size="tiny" if tiny else "default",
                      hidden_dim=0)  # 0: the size's own fc1 width
  config.data = dict(name="fashion_mnist", data_dir=data_dir,
                     batch_size=32 if tiny else 128, eval_batch_size=1000, cache=True)
  config.train = dict(
      epochs=3 if tiny else 4,
      lr=2e-3,
      warmup_steps=2 if tiny else 200,
      weight_decay=1e-4,
      grad_clip=1.0,
      log_every=2 if tiny else 100,
      checkpoint_every=4 if tiny else 1000,
      keep_checkpoints=3,
      progress=not tiny,
  )
  config.mesh = dict(shape=dict(data=-1, fsdp=1, tensor=1), rules=None)
  config.recipe = None
  return config
