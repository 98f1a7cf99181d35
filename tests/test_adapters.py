"""Bottleneck adapters: identity at init, trainable-parameter selection, and built into ViTs."""
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jembed  # noqa: F401  (switches eager sharding off)
from jembed import tree
from jembed.models.vit import vit_from_config
from jembed.peft import ADAPTER_TRAINABLE, TRAINED, AdapterTuning, BottleneckAdapter


def test_adapter_starts_as_identity_and_learns():
  adapter = BottleneckAdapter(16, 4, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5, 16)), jnp.float32)
  np.testing.assert_array_equal(adapter(x), x)
  specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(adapter, nnx.Param)))
  assert tuple(specs["down"]["kernel"]) == ("embed", None)
  assert tuple(specs["up"]["kernel"]) == (None, "embed")
  assert adapter.down.kernel[...].shape == (16, 4) and adapter.up.kernel[...].shape == (4, 16)
  # Gradient reaches the zero-initialised up projection, so the adapter can move.
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(adapter)
  assert float(jnp.abs(grads.up.kernel[...]).sum()) > 0


def test_trainable_labels():
  params = {
      "embed": {"embedding": 0},
      "layers": {0: {"attention": {"query": {"kernel": 0}},
                     "attention_adapter": {"down": {"kernel": 0, "bias": 0},
                                           "up": {"kernel": 0, "bias": 0}},
                     "mlp": {"wi": {"kernel": 0}},
                     "mlp_adapter": {"down": {"kernel": 0}},
                     "attention_norm": {"scale": 0, "bias": 0},
                     "final_norm": {"scale": 0}}},
      "head": {"kernel": 0, "bias": 0},
  }
  labels = AdapterTuning().labels(params)
  assert jax.tree.structure(labels) == jax.tree.structure(params)
  trained = {p for p, label in tree.flatten(labels).items() if label == TRAINED}
  assert trained == {"layers/0/attention_adapter/down/kernel", "layers/0/attention_adapter/down/bias",
                     "layers/0/attention_adapter/up/kernel", "layers/0/attention_adapter/up/bias",
                     "layers/0/mlp_adapter/down/kernel", "layers/0/attention_norm/scale",
                     "layers/0/attention_norm/bias", "layers/0/final_norm/scale",
                     "head/kernel", "head/bias"}
  # Real module parameter paths are matched too.
  model_params = nnx.to_pure_dict(nnx.state(BottleneckAdapter(8, 2, rngs=nnx.Rngs(0)), nnx.Param))
  for path in tree.flatten(model_params):
    assert re.search(ADAPTER_TRAINABLE, "layers/3/mlp_adapter/" + path), path


def test_vit_built_for_adapter_tuning_has_adapters_that_get_gradients():
  # The model description as a task builds it: an image model naming a ViT backbone, with the
  # tuning's overrides. The adapters must reach the ViT's encoder (they once were silently dropped).
  tuning = AdapterTuning(dim=4)
  description = tuning.model_overrides({"backbone": "vit", "vit": dict(
      size="Ti", patch_size=4, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32)})
  vit = vit_from_config(description["vit"], image_shape=(8, 8, 1), rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(vit, nnx.Param, ...)
  params = nnx.to_pure_dict(params)
  adapters = [p for p in tree.flatten(params) if "adapter" in p]
  assert len(adapters) == 2 * 4, sorted(tree.flatten(params))  # 2 adapters x (down, up) x (kernel, bias)
  trained, frozen = tuning.split(params, jax.random.key(0))
  assert set(adapters) <= set(tree.flatten(trained))
  images = jnp.asarray(np.random.default_rng(0).uniform(size=(4, 8, 8, 1)), jnp.float32)

  def loss(t):
    model = nnx.merge(graphdef, tuning.combine(t, frozen), rest)
    return jnp.sum(model(images) ** 2)
  grads = tree.flatten(jax.jit(jax.grad(loss))(trained))
  for path in adapters:
    if "/up/" in path:  # the zero-initialised up projections; down moves once up is non-zero
      assert float(jnp.abs(grads[path]).sum()) > 0, path
