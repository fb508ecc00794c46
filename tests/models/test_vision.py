"""Tests for jaxcomp.models.vision: shapes, axes, configs, and that they train."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcomp.models.vision import CNN
from jaxcomp.models.vision import CNNConfig
from jaxcomp.models.vision import VISION_LOGICAL_AXES
from jaxcomp.models.vision import ViT
from jaxcomp.models.vision import ViTConfig


@nnx.jit
def _forward(model, images):
  return model(images)


def _n_params(model):
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _images(cfg, batch=4, seed=0):
  h, w = cfg.image_size
  return jax.random.normal(jax.random.key(seed), (batch, h, w, cfg.in_channels))


_CASES = {
    "cnn_fmnist": (CNN, CNNConfig()),
    "cnn_rgb32": (CNN, CNNConfig(image_size=(32, 30), in_channels=3,
                                 num_classes=100)),
    "vit_fmnist": (ViT, ViTConfig.tiny()),
    "vit_rgb32_mean": (ViT, ViTConfig.tiny(image_size=(32, 24), in_channels=3,
                                           patch_size=8, num_classes=7,
                                           pool="mean")),
}


@pytest.mark.parametrize("case", sorted(_CASES))
def test_forward_shape_and_axes(case):
  cls, cfg = _CASES[case]
  model = cls(cfg, rngs=nnx.Rngs(0))
  logits = _forward(model, _images(cfg))
  assert logits.shape == (4, cfg.num_classes)
  assert logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()
  flat = nnx.to_flat_state(nnx.state(model))
  assert len(flat) > 0
  for path, var in flat:
    names = var.get_metadata("out_sharding")
    assert isinstance(names, tuple) and len(names) == var[...].ndim, path
    assert set(names) - {None} <= set(VISION_LOGICAL_AXES), (path, names)


def test_cnn_default_size_and_paths():
  model = CNN(CNNConfig(), rngs=nnx.Rngs(0))
  assert _n_params(model) == 105_866  # 160 + 4,640 + 100,416 + 650
  assert model.conv1.kernel.get_metadata("out_sharding") == (
      None, None, "conv_in", "conv_out")
  assert model.fc2.kernel.get_metadata("out_sharding") == ("mlp", "classes")


def test_vit_paths_and_axes():
  model = ViT(ViTConfig.tiny(), rngs=nnx.Rngs(0))
  linears = {p for p, n in nnx.iter_graph(model) if isinstance(n, nnx.Linear)}
  assert ("layers", 1, "attn", "q_proj") in linears
  assert ("layers", 0, "mlp", "down_proj") in linears
  assert len(linears) == 2 * 6 + 2  # q/k/v/o + up/down per block, patch, head
  assert model.pos_embed.shape == (16 + 1, 32)
  assert model.layers[0].attn.k_proj.kernel.get_metadata("out_sharding") == (
      "embed", "kv_heads")
  assert model.layers[0].attn.o_proj.bias.get_metadata("out_sharding") == ("embed",)
  assert model.head.kernel.get_metadata("out_sharding") == ("embed", "classes")


def test_vit_mean_pooling_is_patch_permutation_invariant():
  cfg = ViTConfig.tiny(pool="mean")
  model = ViT(cfg, rngs=nnx.Rngs(0))
  # Without position embeddings, mean pooling is invariant to patch order.
  model.pos_embed[...] = jnp.zeros_like(model.pos_embed[...])
  x = _images(cfg)
  swapped = jnp.concatenate([x[:, 7:], x[:, :7]], axis=1)  # swap patch rows
  np.testing.assert_allclose(_forward(model, swapped), _forward(model, x), atol=1e-5)


# Same configs as above, so the (slow to compile) initialisers are cached.
@pytest.mark.parametrize("cls, cfg", [(CNN, CNNConfig()), (ViT, ViTConfig.tiny())],
                         ids=["cnn", "vit"])
def test_training_step_reduces_loss(cls, cfg):
  model = cls(cfg, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
  images = _images(cfg, batch=32, seed=1)
  labels = jax.random.randint(jax.random.key(2), (32,), 0, cfg.num_classes)

  @nnx.jit
  def step(model, optimizer, images, labels):
    def loss_fn(model):
      logits = model(images)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer, images, labels)) for _ in range(15)]
  assert all(np.isfinite(losses))
  assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("make, field", [
    (lambda: CNNConfig(image_size=(28,)), "image_size"),
    (lambda: CNNConfig(image_size=(2, 28)), "image_size"),
    (lambda: CNNConfig(features=(8,)), "features"),
    (lambda: CNNConfig(hidden_dim=0), "hidden_dim"),
    (lambda: CNNConfig(dtype=jnp.int8), "dtype"),
    (lambda: ViTConfig(patch_size=5), "patch_size"),
    (lambda: ViTConfig(dim=30, n_heads=4), "n_heads"),
    (lambda: ViTConfig(pool="max"), "pool"),
    (lambda: ViTConfig(num_classes=-3), "num_classes"),
    (lambda: ViTConfig(norm_eps=0.0), "norm_eps"),
])
def test_bad_config_names_the_field(make, field):
  with pytest.raises(ValueError, match=rf"^(CNN|ViT)Config\.{field}\b") as err:
    make()
  assert "\n" not in str(err.value)
