"""ResNet v1.5: shapes, torchvision parameter counts, BatchNorm over the global batch."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import jembed  # noqa: F401  (switches eager sharding off)
from jembed.errors import UserError
from jembed.models.resnet import DEFAULTS, ResNet, resnet_from_config


def _param_count(**kw) -> int:
  model = nnx.eval_shape(lambda: ResNet(rngs=nnx.Rngs(0), **kw))
  params = nnx.state(model, nnx.Param)
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


# torchvision totals minus the 1000-class fc layer (512*1000+1000 or 2048*1000+1000).
@pytest.mark.parametrize("depth,expected", [
    (18, 11_689_512 - 513_000),
    (34, 21_797_672 - 513_000),
    (50, 25_557_032 - 2_049_000),
    (101, 44_549_160 - 2_049_000),
])
def test_param_count_matches_torchvision(depth, expected):
  count = _param_count(depth=depth, width=64, stem="imagenet")
  assert abs(count - expected) / expected < 1e-3, (count, expected)


def test_out_features_and_num_stages():
  model = nnx.eval_shape(lambda: ResNet(50, rngs=nnx.Rngs(0)))
  assert model.out_features == 2048
  small = nnx.eval_shape(lambda: ResNet(18, width=4, num_stages=3, rngs=nnx.Rngs(0)))
  assert small.out_features == 16
  assert len(small.blocks) == 6


@functools.partial(jax.jit, static_argnames=("train",))
def _forward(graphdef, params, rest, x, train):
  model = nnx.merge(graphdef, params, rest)
  model.train() if train else model.eval()
  y = model(x)
  _, _, new_rest = nnx.split(model, nnx.Param, ...)
  return y, nnx.to_pure_dict(new_rest)


def _split(model):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


def _he_fill(path, leaf, rng):
  # NumPy stand-in for the module's He-normal init: eager JAX init compiles one random
  # program per kernel shape, which dominated these tests' run time.
  name = path[-1].key
  if name in ("scale", "var"):
    return np.ones(leaf.shape, np.float32)
  if name in ("bias", "mean"):
    return np.zeros(leaf.shape, np.float32)
  fan_out = leaf.shape[0] * leaf.shape[1] * leaf.shape[3]
  return (rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_out)).astype(np.float32)


@functools.cache
def _tiny(depth: int, stem: str = "cifar", in_channels: int = 1, norm: str = "batch"):
  """A narrow model (width 4: same topology as width 64) as (graphdef, params, rest)."""
  model = nnx.eval_shape(lambda: ResNet(depth, width=4, stem=stem, norm=norm,
                                        in_channels=in_channels, rngs=nnx.Rngs(0)))
  graphdef, params, rest = _split(model)
  rng = np.random.default_rng(depth)
  fill = lambda path, leaf: jnp.asarray(_he_fill(path, leaf, rng))  # noqa: E731
  return (graphdef, jax.tree_util.tree_map_with_path(fill, params),
          jax.tree_util.tree_map_with_path(fill, rest))


def test_module_init_is_he_normal_with_unit_norms():
  model = ResNet(18, width=16, stem="cifar", num_stages=1, in_channels=1,
                 zero_init_residual=True, rngs=nnx.Rngs(0))
  kernel = np.asarray(model.blocks[0].conv2.kernel[...])
  np.testing.assert_allclose(kernel.std(), np.sqrt(2.0 / (3 * 3 * 16)), rtol=0.1)
  assert abs(kernel.mean()) < 0.01
  np.testing.assert_array_equal(model.blocks[0].norm1.scale[...], np.ones(16))
  np.testing.assert_array_equal(model.blocks[0].norm2.scale[...], np.zeros(16))
  np.testing.assert_array_equal(model.stem_norm.mean[...], np.zeros(16))
  np.testing.assert_array_equal(model.stem_norm.var[...], np.ones(16))
  assert isinstance(model.stem_norm.mean, nnx.BatchStat)


@pytest.mark.parametrize("depth", [18, 50])
@pytest.mark.parametrize("shape,stem", [
    ((8, 8, 1), "cifar"), ((32, 32, 3), "cifar"), ((64, 64, 3), "imagenet")])
def test_forward_shapes(depth, shape, stem):
  # Narrow widths keep compile and run time small; topology is the same as width 64.
  x = jax.random.uniform(jax.random.key(1), (2, *shape))
  y, _ = _forward(*_tiny(depth, stem, shape[-1]), x, True)
  expansion = 4 if depth == 50 else 1
  assert y.shape == (2, 4 * 8 * expansion)
  assert np.all(np.isfinite(np.asarray(y)))
  assert np.all(np.asarray(y) >= 0)  # Pooled after a ReLU.


def test_train_updates_stats_eval_uses_them():
  g, p, r = _tiny(18)
  x = jax.random.uniform(jax.random.key(1), (2, 8, 8, 1))
  y_train, new_rest = _forward(g, p, r, x, True)
  y_eval, same_rest = _forward(g, p, r, x, False)
  assert not np.allclose(new_rest["stem_norm"]["mean"], r["stem_norm"]["mean"])
  np.testing.assert_array_equal(same_rest["stem_norm"]["mean"], r["stem_norm"]["mean"])
  assert not np.allclose(y_train, y_eval)


def test_group_norm_small_widths():
  model = nnx.eval_shape(lambda: ResNet(18, width=4, stem="cifar", norm="group",
                                         in_channels=1, rngs=nnx.Rngs(0)))
  assert model.stem_norm.num_groups == 4
  assert model.blocks[-1].norm2.num_groups == 32
  g, p, r = _tiny(18, norm="group")
  assert r == {}  # GroupNorm has no running statistics.
  x = jax.random.uniform(jax.random.key(1), (3, 8, 8, 1))
  y, _ = _forward(g, p, r, x, True)
  # GroupNorm is per example: a sample's features do not depend on the rest of the batch.
  y0, _ = _forward(g, p, r, x[:1], True)
  np.testing.assert_allclose(y[:1], y0, atol=1e-5)


def test_running_stats_follow_momentum():
  g, p, r = _tiny(18)
  x = jax.random.uniform(jax.random.key(2), (4, 8, 8, 1))
  _, new_rest = _forward(g, p, r, x, True)
  stem = jax.lax.conv_general_dilated(
      x, p["stem_conv"]["kernel"], (1, 1), ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  stem = np.asarray(stem, np.float64)
  np.testing.assert_allclose(new_rest["stem_norm"]["mean"], 0.1 * stem.mean((0, 1, 2)),
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(new_rest["stem_norm"]["var"],
                             0.9 + 0.1 * stem.var((0, 1, 2)), rtol=1e-4)


def test_batchnorm_uses_global_batch_when_sharded():
  g, p, r = _tiny(18)
  x = jax.random.normal(jax.random.key(3), (16, 8, 8, 1))
  y1, rest1 = _forward(g, p, r, x, True)

  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  replicated = NamedSharding(mesh, P())
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  ps, rs = jax.device_put((p, r), replicated)
  y8, rest8 = _forward(g, ps, rs, xs, True)
  assert len(xs.sharding.device_set) == 8
  np.testing.assert_allclose(y8, y1, rtol=1e-4, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), rest8, rest1)
  # Per-shard statistics (2 examples each) would differ a lot from the global ones.
  _, rest_shard = _forward(g, p, r, x[:2], True)
  assert not np.allclose(rest_shard["stem_norm"]["var"], rest1["stem_norm"]["var"], atol=1e-3)


def test_from_config_and_errors():
  cfg = ml_collections.ConfigDict(dict(depth=50, width=8, stem="cifar", norm="group"))
  model = nnx.eval_shape(lambda: resnet_from_config(cfg, in_channels=1, rngs=nnx.Rngs(0)))
  # The section leaves num_stages out: it takes the config default (DEFAULTS), three stages.
  assert model.out_features == 8 * 2 ** (DEFAULTS["num_stages"] - 1) * 4
  assert model.stem_conv.kernel.shape == (3, 3, 1, 8)
  with pytest.raises(UserError, match="depth"):
    ResNet(depth=20, rngs=nnx.Rngs(0))
  with pytest.raises(UserError, match="stem"):
    ResNet(stem="tiny", rngs=nnx.Rngs(0))
  with pytest.raises(UserError, match="norm"):
    ResNet(norm="layer", rngs=nnx.Rngs(0))
