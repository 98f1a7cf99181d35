"""Parameters whose named dimension does not divide over the mesh are placed anyway: the fallback
rule (another dimension, else replicated; tiny leaves replicated), and ResNet / ViT under
data=2 x fsdp=4 train exactly like data=8."""
import importlib.util
import os

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jembed import sharding, train
from jembed.data import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 2
MESH = {"data": 2, "fsdp": 4, "tensor": 1}


def _rotation_config():
  spec = importlib.util.spec_from_file_location("_config_rotation_fb", os.path.join(ROOT, "configs", "rotation.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.batch_size = 16
  c.warmup_steps = 2  # as tests/spine_helpers.tiny_mlm_config: step 1 has lr 0, step 2 lr/2
  c.augment = {}
  c.model.resnet.update(dict(width=16, num_stages=1))
  return c


def test_fit_spec_rule():
  mesh = {"data": 2, "fsdp": 4, "tensor": 2}
  # Divides: kept as the rules say.
  assert sharding.fit_spec((64, 32), P("fsdp", "tensor"), mesh) == (P("fsdp", "tensor"), "", "")
  # An RGB ResNet stem (3, 3, 3, 64): fsdp leaves the 3-channel dim and joins the output channels,
  # which tensor already splits (64 % (2 * 4) == 0).
  spec, kind, _ = sharding.fit_spec((3, 3, 3, 64), P(None, None, "fsdp", "tensor"), mesh)
  assert (spec, kind) == (P(None, None, None, ("tensor", "fsdp")), "moved")
  # An unsplit dimension is preferred to one already split, then the largest.
  spec, kind, _ = sharding.fit_spec((3, 40, 24), P("fsdp", None, None), mesh)
  assert (spec, kind) == (P(None, "fsdp"), "moved")
  # Nothing divides: replicated over that axis, the rest kept.
  spec, kind, _ = sharding.fit_spec((6, 250), P("fsdp", "tensor"), mesh)
  assert (spec, kind) == (P(None, "tensor"), "replicated")
  # Under the threshold: replicated, even though it divides.
  assert sharding.fit_spec((512,), P("fsdp"), mesh)[:2] == (P(), "small")
  assert sharding.fit_spec((512,), P("fsdp"), mesh, min_elements=1)[:2] == (P("fsdp"), "")
  # Axes of size 1 never need moving.
  assert sharding.fit_spec((3, 3, 3, 64), P(None, None, "tensor"), {"tensor": 1})[1] == ""


def test_fit_shardings_reports_once_and_places_validly():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  ns = lambda *s: jax.sharding.NamedSharding(mesh, P(*s))
  tree = {"layers": {str(i): {"kernel": jax.ShapeDtypeStruct((3, 3, 3, 64), np.float32)} for i in range(3)},
          "bias": jax.ShapeDtypeStruct((64,), np.float32),
          "odd": jax.ShapeDtypeStruct((6, 250), np.float32)}
  shs = {"layers": {str(i): {"kernel": ns(None, None, "fsdp", "tensor")} for i in range(3)},
         "bias": ns("fsdp"), "odd": ns("fsdp")}
  out, placement = sharding.fit_shardings(tree, shs)
  assert out["layers"]["0"]["kernel"].spec == P(None, None, None, ("tensor", "fsdp"))
  assert out["bias"].spec == P() and out["odd"].spec == P()
  line = placement.line()
  assert "\n" not in line and "layers/*/kernel (3, 3, 3, 64): fsdp dim 2->3 (x3)" in line
  assert "odd (6, 250): fsdp dim 0" in line and "1 parameters under 1024" in line
  # Every fitted sharding is one jax accepts for its shape.
  for leaf, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(out)):
    sh.shard_shape(leaf.shape)


def _run(config, devices):
  setup = train.Setup(config, "/nonexistent-workdir", devices=devices)
  state = setup.init_state()
  it = pipeline.train_iterator(setup.data.train, config.batch_size, config.seed)
  batches = [setup.to_global(next(it)) for _ in range(STEPS)]
  setup.compile(state, batches[0])
  losses = []
  for b in batches:
    state, m = setup.compiled_train(state, b)
    losses.append(float(m["loss"]))
  return setup, state, losses


@pytest.mark.parametrize("backbone", ["resnet", "vit"])
def test_fsdp_equals_data_parallel(backbone):
  def config(mesh):
    c = _rotation_config()
    c.model.backbone = backbone
    c.model.vit.update(dict(hidden_size=64, num_layers=1, num_heads=2, mlp_dim=128, patch_size=4))
    c.mesh.update(mesh)
    return c
  ref_setup, ref_state, ref_losses = _run(config({"data": 8, "fsdp": 1, "tensor": 1}), jax.devices())
  setup, state, losses = _run(config(MESH), jax.devices())
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5, atol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               jax.device_get(state.params), jax.device_get(ref_state.params))
  # Placed, not refused; really sharded over fsdp where the rules say; the stem / tiny leaves reported.
  sharded = [x for x in jax.tree.leaves(state.params) if "fsdp" in str(x.sharding.spec)]
  assert sharded and all(x.sharding.shard_shape(x.shape) != x.shape for x in sharded)
  assert setup.sharding_report.startswith("sharding: ") and "\n" not in setup.sharding_report
  if backbone == "resnet":
    # The stem kernel (3, 3, 1, 16) cannot be split on its 1 input channel (and is tiny): replicated.
    assert state.params["backbone"]["stem_conv"]["kernel"].sharding.spec == P()


def test_lora_factors_keep_their_kernel_axes_however_small():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  tree = {"adapters": {"q": {"a": jax.ShapeDtypeStruct((32, 4), np.float32)}},
          "extra": {"a": jax.ShapeDtypeStruct((32, 4), np.float32)}}
  shs = jax.tree.map(lambda _: jax.sharding.NamedSharding(mesh, P("fsdp", None)), tree)
  out, placement = sharding.fit_shardings(tree, shs)
  assert out["adapters"]["q"]["a"].spec == P("fsdp", None) and out["extra"]["a"].spec == P()
  assert placement.small == 1
