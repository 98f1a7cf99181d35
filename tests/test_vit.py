"""ViT: presets, patch order, shapes, and that a train step lowers the loss."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from jembed.errors import UserError
from jembed.models import vit


def _tiny(**kw):
  return ml_collections.ConfigDict(dict(dict(size="Ti", hidden_size=32, num_layers=2, num_heads=4,
                                             patch_size=4), **kw))


def test_presets():
  for size, (d, layers, heads) in {"Ti": (192, 12, 3), "S": (384, 12, 6), "B": (768, 12, 12)}.items():
    cfg = vit.vit_config(ml_collections.ConfigDict(dict(size=size)))
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.mlp_dim) == (d, layers, heads, 4 * d)
    assert cfg.pre_ln
  with pytest.raises(UserError, match="model.vit.size"):
    vit.vit_config(ml_collections.ConfigDict(dict(size="XL")))


def test_vit_b16_parameter_count():
  # ViT-B/16 at 224 without a classifier head: 85.8M in the paper's table (86M with head).
  model = nnx.eval_shape(lambda: vit.vit_from_config(ml_collections.ConfigDict(dict(size="B", patch_size=16)),
                                                     image_shape=(224, 224, 3), rngs=nnx.Rngs(0)))
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert n == 85_798_656


def test_patchify_order_and_shapes():
  model = vit.vit_from_config(_tiny(), image_shape=(8, 12, 3), rngs=nnx.Rngs(0))
  images = jnp.arange(2 * 8 * 12 * 3, dtype=jnp.float32).reshape(2, 8, 12, 3)
  patches = model.patchify(images)
  assert patches.shape == (2, 6, 48)
  # Patch 4 is row 1, column 1 of the 2x3 grid.
  np.testing.assert_array_equal(patches[1, 4].reshape(4, 4, 3), images[1, 4:8, 4:8])
  model.eval()
  assert model(images).shape == (2, 32)
  with pytest.raises(UserError, match="patch_size"):
    vit.vit_from_config(_tiny(patch_size=5), image_shape=(8, 12, 3), rngs=nnx.Rngs(0))


def test_train_step_lowers_loss():
  model = vit.vit_from_config(_tiny(), image_shape=(8, 8, 1), rngs=nnx.Rngs(0, dropout=0))
  head = nnx.Linear(32, 2, rngs=nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(0), (16, 8, 8, 1))
  y = (x[:, :4].mean((1, 2, 3)) > 0).astype(jnp.int32)
  graphdef, params = nnx.split((model, head), nnx.Param)
  tx = optax.adam(1e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt):
    def loss_fn(p):
      m, h = nnx.merge(graphdef, p)
      return optax.softmax_cross_entropy_with_integer_labels(h(m(x)), y).mean()
    loss, g = jax.value_and_grad(loss_fn)(params)
    u, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, u), opt, loss

  losses = []
  for _ in range(10):
    params, opt, loss = step(params, opt)
    losses.append(float(loss))
  assert losses[-1] < losses[0] * 0.8
