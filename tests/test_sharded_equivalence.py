"""A sharded MLM run gives the same losses and parameters as a single-device run."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jembed import train
from jembed.data import pipeline
from spine_helpers import tiny_mlm_config, write_corpus

STEPS = 3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_corpus(str(tmp_path_factory.mktemp("corpus")))


def run_steps(config, devices):
  setup = train.Setup(config, "/nonexistent-workdir", devices=devices)
  state = setup.init_state()
  it = pipeline.train_iterator(setup.data.train, config.batch_size, config.seed)
  batches = [next(it) for _ in range(STEPS)]
  setup.compile(state, setup.to_global(batches[0]))
  losses = []
  for b in batches:
    state, m = setup.compiled_train(state, setup.to_global(b))
    losses.append(float(m["loss"]))
  return losses, jax.device_get(state.params), state


@pytest.fixture(scope="module")
def single(corpus):
  config = tiny_mlm_config(corpus, **{"mesh.data": 1})
  return run_steps(config, jax.devices()[:1])


@pytest.mark.parametrize("mesh", [
    dict(data=8, fsdp=1, tensor=1),
    dict(data=1, fsdp=4, tensor=2),
])
def test_sharded_matches_single_device(corpus, single, mesh):
  config = tiny_mlm_config(corpus, **{f"mesh.{k}": v for k, v in mesh.items()})
  losses, params, state = run_steps(config, jax.devices())
  ref_losses, ref_params, _ = single
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5, atol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), params, ref_params)
  # The parameters really are sharded the way the mesh says (not silently replicated).
  kernel = state.params["encoder"]["layers"][0]["mlp"]["wi"]["kernel"]
  assert kernel.sharding.shard_shape(kernel.shape) == (32 // mesh["fsdp"], 64 // mesh["tensor"])
  # Adam moments follow their parameters' sharding.
  mu = state.opt_state[1][0].mu["encoder"]["layers"][0]["mlp"]["wi"]["kernel"]
  assert mu.sharding.spec == kernel.sharding.spec


def test_step_flops_count_the_global_computation_once_however_it_is_sharded():
  """MFU's FLOPs: a data-parallel matmul counts 2*M*N*K whether sharded or not, and replicated work
  (here the whole product of replicated operands) is counted once, not once per device."""
  from jax.sharding import NamedSharding, PartitionSpec
  from jembed import metrics as metrics_lib
  mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  x, w = jnp.ones((64, 32)), jnp.ones((32, 16))
  f = jax.jit(lambda x, w: x @ w)
  flat = metrics_lib.step_flops(f.lower(x, w))
  sharded = metrics_lib.step_flops(f.lower(jax.device_put(x, NamedSharding(mesh, PartitionSpec("d"))),
                                           jax.device_put(w, NamedSharding(mesh, PartitionSpec()))))
  replicated = metrics_lib.step_flops(f.lower(jax.device_put(x, NamedSharding(mesh, PartitionSpec())),
                                              jax.device_put(w, NamedSharding(mesh, PartitionSpec()))))
  assert flat == sharded == replicated == 2 * 64 * 32 * 16
