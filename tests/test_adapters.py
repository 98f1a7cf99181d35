"""Bottleneck adapters: identity at init, trainable-parameter selection."""
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jembed  # noqa: F401  (switches eager sharding off)
from jembed.peft.adapters import ADAPTER_TRAINABLE, BottleneckAdapter, adapter_trainable_mask


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


def test_trainable_regex_and_mask():
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
  mask = adapter_trainable_mask(params)
  assert jax.tree.structure(mask) == jax.tree.structure(params)
  trained = {jax.tree_util.keystr(p, simple=True, separator="/")
             for p, v in jax.tree_util.tree_leaves_with_path(mask) if v}
  assert trained == {"layers/0/attention_adapter/down/kernel", "layers/0/attention_adapter/down/bias",
                     "layers/0/attention_adapter/up/kernel", "layers/0/attention_adapter/up/bias",
                     "layers/0/mlp_adapter/down/kernel", "layers/0/attention_norm/scale",
                     "layers/0/attention_norm/bias", "layers/0/final_norm/scale",
                     "head/kernel", "head/bias"}
  # Real module parameter paths are matched too.
  model_params = nnx.to_pure_dict(nnx.state(BottleneckAdapter(8, 2, rngs=nnx.Rngs(0)), nnx.Param))
  for path in jax.tree_util.tree_leaves_with_path(model_params):
    name = "layers/3/mlp_adapter/" + jax.tree_util.keystr(path[0], simple=True, separator="/")
    assert re.search(ADAPTER_TRAINABLE, name), name
