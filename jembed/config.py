"""Defaults shared by every experiment config, and checks run before any compute."""
from __future__ import annotations

import ml_collections

from jembed.errors import UserError


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = ""                 # a name registered in jembed/tasks/__init__.py
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 32           # global, in examples, over all devices and hosts
  c.learning_rate = 1e-3
  c.warmup_steps = 100
  c.schedule = "cosine"       # cosine | linear | constant (after warm-up)
  c.end_lr_fraction = 0.0
  c.weight_decay = 0.01       # AdamW; never applied to biases, LayerNorm/BatchNorm parameters
  c.b1 = 0.9
  c.b2 = 0.999
  c.grad_clip = 1.0           # global-norm clipping; 0 turns it off
  c.grad_accum_steps = 1      # micro-batches per optimizer step: the same update in less memory
  c.log_every = 50
  c.eval_every = 500
  c.eval_batches = 8          # held-out batches per evaluation; 0 = the whole eval split
  c.checkpoint_every = 500
  c.checkpoint_every_secs = 0.0  # also save when this many seconds passed since the last save; 0 = off
  c.keep_checkpoints = 3
  c.async_checkpointing = True
  c.checkpoint_fallback = True  # an unreadable latest checkpoint: resume from the previous one (False: refuse)
  c.skip_nonfinite = False      # a step with a non-finite loss/gradient: skip it (False: stop the run)
  c.max_consecutive_nonfinite = 10  # with skip_nonfinite: stop after this many such steps in a row
  c.stop_after_steps = 0      # stop this invocation early (e.g. a preemptible job); the next resumes
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.sharding_rules = ()       # () = jembed.sharding.DEFAULT_RULES; else ((logical, mesh axes), ...)
  c.model = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict()
  return c


def _check(cond: bool, message: str) -> None:
  if not cond:
    raise UserError(message)


def validate(c) -> None:
  """Value checks that config_flags' type checks cannot express."""
  for key in ("total_steps", "batch_size", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
              "grad_accum_steps"):
    _check(isinstance(c[key], int) and c[key] > 0, f"config.{key}={c[key]!r} must be a positive integer")
  _check(c.warmup_steps >= 0, f"config.warmup_steps={c.warmup_steps} must be >= 0")
  _check(c.learning_rate > 0, f"config.learning_rate={c.learning_rate} must be > 0")
  _check(c.schedule in ("cosine", "linear", "constant"),
         f"config.schedule='{c.schedule}' is unknown; use cosine, linear or constant")
  _check(c.eval_batches >= 0, f"config.eval_batches={c.eval_batches} must be >= 0")
  _check(c.checkpoint_every_secs >= 0, f"config.checkpoint_every_secs={c.checkpoint_every_secs} must be >= 0")
  _check(isinstance(c.max_consecutive_nonfinite, int) and c.max_consecutive_nonfinite > 0,
         f"config.max_consecutive_nonfinite={c.max_consecutive_nonfinite!r} must be a positive integer")
  on_bad = c.data.get("on_bad_record", "error")
  _check(on_bad in ("error", "skip"),
         f"config.data.on_bad_record='{on_bad}' is unknown; use 'error' or 'skip'")
