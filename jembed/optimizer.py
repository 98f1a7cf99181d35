"""The optimizer from the config: AdamW with a warm-up and a decay schedule, optional clipping."""
from __future__ import annotations

import jax
import optax


def warmup_steps(config) -> tuple[int, str]:
  """(warm-up steps, a note for the log). A warm-up as long as the run would leave it entirely inside
  warm-up (never reaching the learning rate it asks for): it is scaled to a tenth of the run, and
  the note says so."""
  asked, total = int(config.warmup_steps), int(config.total_steps)
  if asked < total or asked == 0:
    return asked, ""
  scaled = total // 10
  return scaled, (f"warmup_steps={asked} >= total_steps={total}: warming up over the first {scaled} "
                  "steps (a tenth of the run) instead; set --config.warmup_steps below total_steps to "
                  "choose")


def learning_rate_schedule(config) -> optax.Schedule:
  warmup, _ = warmup_steps(config)
  decay_steps = max(config.total_steps - warmup, 1)
  peak, end = config.learning_rate, config.learning_rate * config.end_lr_fraction
  if config.schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=config.end_lr_fraction)
  elif config.schedule == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  else:
    decay = optax.constant_schedule(peak)
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def make_optimizer(config) -> optax.GradientTransformation:
  # No weight decay on biases and norm parameters (the 1-D leaves), as in BERT.
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim > 1, params)
  adamw = optax.adamw(learning_rate_schedule(config), b1=config.b1, b2=config.b2,
                      weight_decay=config.weight_decay, mask=decay_mask)
  if config.grad_clip:
    return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw)
  return adamw
