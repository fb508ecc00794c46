"""The image-classification side of stage pipelines (``config.model.name`` ``cnn`` / ``vit``).

A pipeline over an image model starts from a freshly initialised network (``config.seed``), so
its first stage is usually ``train`` (the dense model, which later stages name as their
``teacher`` and ``config.eval.baseline``). `ImageStageTask` is the training loop's task for a
``train`` (cross-entropy) or ``distill`` stage (``alpha T^2 KL(teacher || student) + (1 -
alpha) CE`` on the logits) over the pipeline's current model; weights that are exactly zero
when the stage starts stay zero. `images` reads a split of the prepared Fashion-MNIST
(`jaxcomp.data.fashion_mnist`) as arrays for calibration and the harness.
"""

from __future__ import annotations

from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxcomp.distill import losses
from jaxcomp.train.loop import zero_masks
from jaxcomp.train.tasks import ImageClassification

IMAGE_MODELS = ("cnn", "vit")


def is_image(config: ml_collections.ConfigDict) -> bool:
  """Whether ``config``'s model is an image classifier (``model.name`` cnn / vit)."""
  return config.model.get("name") in IMAGE_MODELS


def images(config: ml_collections.ConfigDict, split: str, n: int = 0
           ) -> tuple[np.ndarray, np.ndarray]:
  """The first ``n`` (0: all) examples of ``split`` as ``(float32 [n, 28, 28, 1] in [0, 1],
  int32 [n])``.

  Example::

    x, y = images(config, "test", 1000)
  """
  from jaxcomp.data import fashion_mnist  # pylint: disable=import-outside-toplevel
  source = fashion_mnist.load(config.data.data_dir, split)
  count = len(source) if not n else min(n, len(source))
  rows = [source[i] for i in range(count)]
  batch = fashion_mnist.preprocess({"image": np.stack([r["image"] for r in rows]),
                                    "label": np.asarray([r["label"] for r in rows])})
  return batch["image"], batch["label"]


class ImageStageTask(ImageClassification):
  """Trains the pipeline's current image model: cross-entropy, or with ``teacher`` the KD loss
  of ``distill`` (alpha, temperature)."""

  def __init__(self, student: nnx.Module, teacher: nnx.Module | None,
               distill: ml_collections.ConfigDict | None):
    self._student, self._teacher, self._distill = student, teacher, distill
    self._teacher_graphdef = None

  def model(self, config, *, rngs, abstract=False):
    del config, rngs
    if abstract:
      return nnx.eval_shape(lambda: nnx.clone(self._student))
    student = nnx.clone(self._student)
    # Own buffers: the step donates them, and the student shares arrays with earlier stages.
    nnx.update(student, jax.tree.map(lambda x: jnp.array(x, copy=True), nnx.state(student)))
    return student

  def frozen(self, config, abstract=False):
    del config, abstract
    if self._teacher is None:
      return None
    graphdef, state = nnx.split(self._teacher)
    self._teacher_graphdef = graphdef
    return jax.tree.map(lambda x: jnp.array(x, copy=True), state)

  def loss(self, model, batch, rng, frozen=None):
    del rng
    logits = model(batch["image"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    metrics = {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]), "ce": ce}
    if frozen is None:
      return ce, metrics
    teacher = nnx.merge(self._teacher_graphdef, frozen)
    t_logits = jax.lax.stop_gradient(teacher(batch["image"]))
    kd = losses.logit_kd(logits, t_logits, temperature=self._distill.temperature)
    alpha = self._distill.alpha
    return alpha * kd + (1.0 - alpha) * ce, {**metrics, "kd": kd}

  def update_mask(self, params: Any) -> Any:
    """Exact zeros of a kernel when training starts stay zero (a pruned model)."""
    return zero_masks(params)


def train_config(config: ml_collections.ConfigDict, section: ml_collections.ConfigDict
                 ) -> ml_collections.ConfigDict:
  """The training loop's config for an image ``train`` / ``distill`` stage ``section``."""
  c = ml_collections.ConfigDict()
  c.task = "image_classification"
  c.seed = config.seed
  c.model = config.model.to_dict()
  c.data = config.data.to_dict()
  c.train = section.train.to_dict()
  c.mesh = config.mesh.to_dict()
  c.recipe = None
  return c
