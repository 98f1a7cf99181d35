"""Rotation and SimCLR tasks: rotations, NT-Xent vs NumPy, 1 vs 8 devices, a short run, evaluation."""
import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jembed import evaluate, train
from jembed.data import augment, pipeline
from jembed.errors import UserError
from jembed.losses import nt_xent

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_config(name):
  spec = importlib.util.spec_from_file_location(f"_config_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


rotation_config = _load_config("rotation")
simclr_config = _load_config("simclr")


def _tiny(config, batch=16):
  config.batch_size = batch
  config.model.resnet.update(dict(width=4, num_stages=1))
  config.frozen_eval.update(dict(probe_steps=30, n_per_class=5, max_train=400, batch=200))
  config.warmup_steps = 0
  return config


def test_rotation_labels_and_pixels():
  images = np.random.default_rng(0).integers(0, 255, (3, 5, 5, 2)).astype(np.float32)
  rotated, labels = augment.rotate_batch(jnp.asarray(images))
  assert labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
  for k in range(4):
    for i in range(3):
      np.testing.assert_array_equal(rotated[k * 3 + i], np.rot90(images[i], k))
  # 90 degrees counter-clockwise: the top row becomes the left column, read bottom-up.
  np.testing.assert_array_equal(rotated[3, ::-1, 0], images[0, 0])


def _nt_xent_numpy(z1, z2, t):
  z = np.concatenate([z1, z2]).astype(np.float64)
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  n, b = len(z), len(z1)
  losses, hits = [], []
  for i in range(n):
    j = (i + b) % n
    others = [m for m in range(n) if m != i]
    s = np.array([z[i] @ z[m] / t for m in others])
    losses.append(-(z[i] @ z[j] / t) + np.log(np.exp(s).sum()))
    hits.append(others[int(np.argmax(s))] == j)
  return np.mean(losses), np.mean(hits)


def test_nt_xent_matches_numpy():
  rng = np.random.default_rng(0)
  z1 = rng.normal(size=(6, 5)).astype(np.float32)
  z2 = (z1 + 0.8 * rng.normal(size=(6, 5))).astype(np.float32)
  for t in (0.1, 0.5):
    loss, acc = nt_xent(jnp.asarray(z1), jnp.asarray(z2), t)
    ref_loss, ref_acc = _nt_xent_numpy(z1, z2, t)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    assert float(acc) == pytest.approx(ref_acc)


def test_nt_xent_sharded_uses_global_negatives():
  rng = np.random.default_rng(1)
  z1 = rng.normal(size=(16, 8)).astype(np.float32)
  z2 = rng.normal(size=(16, 8)).astype(np.float32)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sh = NamedSharding(mesh, P("data", None))
  fn = jax.jit(lambda a, b: nt_xent(a, b, 0.2))
  sharded = fn(jax.device_put(z1, sh), jax.device_put(z2, sh))
  single = fn(jax.device_put(z1, jax.devices()[0]), jax.device_put(z2, jax.devices()[0]))
  np.testing.assert_allclose(sharded[0], single[0], rtol=1e-6)
  ref_loss, _ = _nt_xent_numpy(z1, z2, 0.2)
  np.testing.assert_allclose(float(sharded[0]), ref_loss, rtol=1e-5)
  # A per-shard loss (each device's 2 pairs only) would differ: the negatives must be global.
  local = np.mean([_nt_xent_numpy(z1[i:i + 2], z2[i:i + 2], 0.2)[0] for i in range(0, 16, 2)])
  assert abs(local - ref_loss) > 0.5


def _one_step(config, devices, tmp_path):
  setup = train.Setup(config, str(tmp_path), devices=devices)
  state = setup.init_state()
  it = pipeline.train_iterator(setup.data.train, config.batch_size, config.seed)
  batch = setup.to_global(next(it))
  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
    step = setup.jit_train_step(batch)
    state, metrics = step(state, batch)
  return jax.device_get(metrics), jax.device_get(state.model_state), (setup, step), state, it


def test_simclr_one_vs_eight_devices(tmp_path):
  """Loss, metrics and BatchNorm running statistics of a SimCLR step agree between 1 and 8 devices:
  BatchNorm and NT-Xent see the global batch, augmentations do not depend on the sharding."""
  config = _tiny(simclr_config.get_config())
  config.augment.color_jitter = 0.0  # crops and flips suffice to show sharding-independence; compiles faster
  m1, bn1, *_ = _one_step(config, jax.devices()[:1], tmp_path / "one")
  m8, bn8, *_ = _one_step(config, jax.devices(), tmp_path / "eight")
  for k in ("loss", "accuracy", "grad_norm"):
    np.testing.assert_allclose(m8[k], m1[k], rtol=2e-4, atol=1e-6)
  leaves1, leaves8 = jax.tree.leaves(bn1), jax.tree.leaves(bn8)
  assert leaves1, "no BatchNorm statistics in the model state"
  for a, b in zip(leaves1, leaves8):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def rotation_run(tmp_path_factory):
  config = _tiny(rotation_config.get_config(), batch=64)
  config.augment = {}
  config.model.resnet.width = 8
  config.learning_rate = 1e-2
  config.total_steps = 40
  first, _, (setup, step), state, it = _one_step(config, jax.devices(), tmp_path_factory.mktemp("rot"))
  losses = [float(first["loss"])]
  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
    for _ in range(config.total_steps - 1):
      state, metrics = step(state, setup.to_global(next(it)))
      losses.append(float(metrics["loss"]))
  return setup, state, losses


def test_short_rotation_run_lowers_loss(rotation_run):
  _, _, losses = rotation_run
  assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
  assert np.mean(losses[:5]) > 1.0  # starts near log(4)


def test_extra_eval_reports_pretrained_and_random(rotation_run):
  setup, state, _ = rotation_run
  metrics = setup.task.extra_eval(setup.model_from(state), 30)
  expected = {"probe_acc", "knn_acc", "probe_acc_5shot", "knn_acc_5shot"}
  assert expected | {f"random_{k}" for k in expected} == set(metrics)
  for v in metrics.values():
    assert 0.1 < v <= 1.0  # well above chance is not guaranteed for a 30-step model; sane range
  # The random-init numbers are computed once and reused.
  assert setup.task.extra_eval(setup.model_from(state), 30)["random_knn_acc"] == metrics["random_knn_acc"]


def test_vit_dropout_runs_in_training_and_not_in_eval(tmp_path):
  """model.vit.dropout reaches the ViT: a train step's loss changes with it; eval is deterministic."""
  def step_loss_and_eval(rate):
    config = _tiny(rotation_config.get_config())
    config.augment = {}
    config.model.backbone = "vit"
    config.model.vit.update(dict(hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64, patch_size=4,
                                 dropout=rate, attention_dropout=rate))
    metrics, _, (setup, _), state, it = _one_step(config, jax.devices()[:1], tmp_path / str(rate))
    batch = setup.to_global(next(it))
    setup.compile(state, batch)
    evals = [float(setup.run_eval_step(state, batch, 0)["loss"]) for _ in range(2)]
    return float(metrics["loss"]), evals
  loss0, eval0 = step_loss_and_eval(0.0)
  loss5, eval5 = step_loss_and_eval(0.5)
  assert abs(loss0 - loss5) > 1e-4, "dropout 0.5 left the training loss unchanged: dropout is off"
  assert eval0[0] == eval0[1] and eval5[0] == eval5[1]


def test_model_layout_for_fine_tuning(rotation_run):
  setup, _, _ = rotation_run
  assert set(setup.abs_params) == {"backbone", "head"}
  config = _tiny(simclr_config.get_config())
  s = train.Setup(config, "/tmp/unused", devices=jax.devices()[:1])
  assert set(s.abs_params) == {"backbone", "projection"}


def test_standalone_evaluate_from_workdir(tmp_path, capsys):
  config = _tiny(rotation_config.get_config())
  config.total_steps = 2
  config.augment = {}
  config.frozen_eval.enabled = False
  config.async_checkpointing = False
  train.train_and_evaluate(config, str(tmp_path))
  assert evaluate.main(["--workdir", str(tmp_path)]) == 0
  out = capsys.readouterr().out
  assert "random init" in out and "probe_acc" in out
  assert evaluate.main(["--workdir", str(tmp_path / "nothing")]) == 2


def test_bad_input(tmp_path):
  from PIL import Image
  config = _tiny(rotation_config.get_config())
  config.model.backbone = "convnext"
  with pytest.raises(UserError, match="model.backbone"):
    train.Setup(config, str(tmp_path), devices=jax.devices()[:1])
  for cls in ("a", "b"):
    (tmp_path / "imgs" / cls).mkdir(parents=True)
    for i in range(2):
      Image.fromarray(np.zeros((4, 6), np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
  config = _tiny(rotation_config.get_config())
  config.data.train = str(tmp_path / "imgs")
  with pytest.raises(UserError, match="square"):
    train.Setup(config, str(tmp_path), devices=jax.devices()[:1])
