"""The learning-rate schedule: warm-up, then the configured decay."""
import ml_collections
import numpy as np

from jembed import train
from jembed.config import base_config


def _config(**overrides) -> ml_collections.ConfigDict:
  c = base_config()
  c.update(overrides)
  return c


def test_warmup_as_long_as_the_run_is_scaled_to_a_tenth_and_said():
  c = _config(total_steps=50, warmup_steps=100, learning_rate=1e-3, schedule="constant")
  steps, note = train.warmup_steps(c)
  assert steps == 5
  assert "warmup_steps=100 >= total_steps=50" in note and "\n" not in note
  lr = train.learning_rate_schedule(c)
  # The run reaches the learning rate it asked for (inside a 100-step warm-up it never would).
  np.testing.assert_allclose([float(lr(0)), float(lr(5)), float(lr(49))], [0.0, 1e-3, 1e-3], rtol=1e-6)


def test_warmup_shorter_than_the_run_is_kept():
  c = _config(total_steps=50, warmup_steps=10, learning_rate=1e-3, schedule="constant")
  assert train.warmup_steps(c) == (10, "")
  lr = train.learning_rate_schedule(c)
  np.testing.assert_allclose([float(lr(5)), float(lr(10))], [5e-4, 1e-3], rtol=1e-6)
  assert train.warmup_steps(_config(total_steps=50, warmup_steps=0)) == (0, "")
