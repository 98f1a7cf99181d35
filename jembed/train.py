"""The one train loop, top to bottom: config, mesh, data, model, state, step, loop.

It knows objectives only through the `Task` interface (jembed/tasks/base.py), which parameters
train only through a tuning built from `config.peft` (jembed/peft/), and warm starts only through
`config.init` (jembed/init.py), so pretraining and fine-tuning of every task share it. The train
step is a module-level pure function (`train_step`) that tests and benchmarks reuse.

Around it, in their own modules: the train state and the model split for jit (jembed/state.py), the
optimizer and its schedule (jembed/optimizer.py), and what keeps a long run safe: non-finite steps,
preemption, time-based saves, the multi-process barrier (jembed/reliability.py).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jembed import checkpoint as ckpt
from jembed import config as config_lib
from jembed import fs
from jembed import init as init_lib
from jembed import peft
from jembed import metrics as metrics_lib
from jembed import modelspec
from jembed import multihost
from jembed import reliability
from jembed import sharding
from jembed import transfer
from jembed.data import pipeline
from jembed.errors import UserError
from jembed.optimizer import learning_rate_schedule, make_optimizer, warmup_steps
from jembed.reliability import Preempted, StepsInFlight  # noqa: F401  (train.StepsInFlight, as before)
from jembed.state import ModelDef, TrainState
from jembed.tasks import get_task
from jembed.tasks.base import LOSS_WEIGHT


@dataclasses.dataclass(frozen=True)
class StepContext:
  """What the train and eval steps close over: nothing here changes from step to step."""
  model: ModelDef
  task: Any
  tuning: Any
  tx: optax.GradientTransformation
  base_key: jax.Array
  accum_steps: int = 1     # micro-batches per optimizer step (gradient accumulation)


def train_step(ctx: StepContext, state: TrainState, batch):
  """One optimizer step: (state, global batch) -> (state, metrics). Pure; jit it with shardings."""
  rng = jax.random.fold_in(ctx.base_key, state.step)
  tuning_rng, dropout_rng, task_rng = jax.random.split(rng, 3)
  prepare_rng, task_rng = jax.random.split(task_rng)
  # Masks and augmentations are drawn for the whole batch, before any split into micro-batches.
  batch = ctx.task.prepare(batch, prepare_rng, True)

  def make_model(trained, dropout_key=dropout_rng, model_state=state.model_state):
    params = ctx.tuning.combine(trained, state.frozen, rng=tuning_rng, train=True)
    return ctx.model.merge(params, model_state, train=True, dropout_key=dropout_key)

  if ctx.accum_steps > 1:
    metrics, model_state, grads = _accumulate(ctx, make_model, state, batch, task_rng, dropout_rng)
  else:
    (_, (metrics, model_state)), grads = ctx.task.value_and_grad(make_model, state.params, batch,
                                                                 task_rng)
    metrics = {k: v for k, v in metrics.items() if k != LOSS_WEIGHT}
  updates, opt_state = ctx.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # A step whose loss or gradient is not finite changes nothing (checked on device, every step);
  # the host reads the record at log steps and before each save.
  finite = reliability.step_is_finite(metrics["loss"], grads, state.step)
  params, opt_state = reliability.keep_if_finite(finite, (params, opt_state), (state.params, state.opt_state))
  if not ctx.task.guards_model_state:
    model_state = reliability.keep_if_finite(finite, model_state, state.model_state)
  metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            model_state=model_state,
                            nonfinite=reliability.update_nonfinite(state.nonfinite, finite, state.step))
  return new_state, metrics


def _accumulate(ctx: StepContext, make_model, state: TrainState, batch, task_rng, dropout_rng):
  """Gradients and metrics of `ctx.accum_steps` micro-batches, each weighted by its loss weight
  (`Task.loss`: the examples, or e.g. MLM's masked tokens), so the update is the full batch's: the
  sum over micro-batches of weight x gradient of the micro-batch mean is the gradient of the sum,
  divided by the full batch's weight. Micro-batch i holds examples i, i+k, i+2k, ...: every device
  keeps an equal share of each, with no data movement. BatchNorm statistics are updated micro-batch
  by micro-batch, as running several smaller steps would; activations are kept for one micro-batch
  at a time (a `lax.scan`)."""
  k = ctx.accum_steps
  micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1),
                       batch)
  examples = jax.tree.leaves(batch)[0].shape[0] // k

  def grads_of(model_state, index, mb):
    drop = jax.random.fold_in(dropout_rng, index)
    make = lambda t, dropout_key=drop: make_model(t, dropout_key, model_state)
    (_, (metrics, new_state)), grads = ctx.task.value_and_grad(make, state.params, mb,
                                                               jax.random.fold_in(task_rng, index))
    metrics = dict(metrics)
    weight = jnp.asarray(metrics.pop(LOSS_WEIGHT, examples), jnp.float32)
    weigh = lambda t: jax.tree.map(lambda x: x * weight.astype(x.dtype), t)
    return weigh(metrics), new_state, weigh(grads), weight

  def one(carry, inputs):
    model_state, grad_sum, metric_sum, weight_sum = carry
    metrics, new_state, grads, weight = grads_of(model_state, *inputs)
    add = lambda a, b: jax.tree.map(jnp.add, a, b)
    return (new_state, add(grad_sum, grads), add(metric_sum, metrics), weight_sum + weight), None

  first = jax.tree.map(lambda x: x[0], micro)
  shapes = jax.eval_shape(lambda: grads_of(state.model_state, 0, first)[0])
  zeros = (jax.tree.map(jnp.zeros_like, state.params),
           jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), jnp.zeros((), jnp.float32))
  (model_state, grads, metrics, total), _ = jax.lax.scan(one, (state.model_state, *zeros),
                                                         (jnp.arange(k), micro))
  # A batch of weight 0 (e.g. nothing to predict) has zero sums: its update stays zero.
  total = jnp.maximum(total, jnp.finfo(jnp.float32).tiny)
  scale = lambda t: jax.tree.map(lambda x: x / total.astype(x.dtype), t)
  return scale(metrics), model_state, scale(grads)


def eval_step(ctx: StepContext, state: TrainState, batch, index):
  # A fixed key per eval batch: every evaluation masks / augments the held-out set the same way.
  rng = jax.random.fold_in(jax.random.fold_in(ctx.base_key, 2**31 - 1), index)
  prepare_rng, rng = jax.random.split(rng)
  batch = ctx.task.prepare(batch, prepare_rng, False)
  _, metrics = ctx.task.loss(eval_model(ctx, state), batch, rng, False)
  return {k: v for k, v in metrics.items() if k != LOSS_WEIGHT}


def eval_model(ctx: StepContext, state: TrainState) -> nnx.Module:
  params = ctx.tuning.combine(state.params, state.frozen)
  return ctx.model.merge(params, state.model_state, train=False)


class Setup:
  """Everything the loop needs that does not change from step to step, built in one go: the task
  and its data, the model description, mesh, shardings, tuning and optimizer."""

  def __init__(self, config, workdir: str, devices=None, task=None):
    config_lib.complete(config)  # a field the config lacks takes the base's value (jembed/config.py)
    auto = transfer.resolve(config)  # fields left at 0 = auto, from the source and the tuning
    if auto:
      _info(auto)
    config_lib.validate(config)
    self.config = config
    self.workdir = workdir
    self.task = task or get_task(config, workdir)
    self.tuning = peft.tuning_from_config(config.peft, task_params=self.task.task_params)

    self.mesh = sharding.make_mesh(config.mesh, devices)
    self.rules = sharding.rules_from_config(config)
    self.batch_shards = sharding.batch_axis_size(self.mesh, self.rules)
    pipeline.per_process_batch(config.batch_size, self.batch_shards)  # refuses a batch that does not divide
    if config.grad_accum_steps > 1 and self.task.no_accumulation:
      raise UserError(f"grad_accum_steps={config.grad_accum_steps} is not supported by task "
                      f"{config.task}: {self.task.no_accumulation}")
    if config.batch_size % (config.grad_accum_steps * self.batch_shards):
      raise UserError(f"batch_size={config.batch_size} does not split into grad_accum_steps="
                      f"{config.grad_accum_steps} micro-batches over {self.batch_shards} batch shards; "
                      "make batch_size a multiple of grad_accum_steps x batch shards")

    # Data first (host side; fails before anything is written); the model description may depend
    # on it (a tokenizer's vocabulary, an image shape), the model itself only on the description.
    self.data = self.task.load_data()
    self.spec = self.task.model_spec()
    part = "encoder" if "encoder" in self.spec else "backbone"  # what the tuning may add to (adapters)
    self.spec[part] = self.tuning.model_overrides(self.spec[part])
    build = modelspec.build

    with nn.logical_axis_rules(self.rules):
      abstract = nnx.eval_shape(lambda: build(self.spec, nnx.Rngs(params=0, dropout=0)))
    frozen_backbone = self.task.backbone if self.tuning.backbone_mode == "inference" else None
    model_def = ModelDef.from_abstract(abstract, frozen_backbone=frozen_backbone)
    _, abs_params, _, abs_rest = nnx.split(abstract, nnx.Param, nnx.RngState, ...)
    param_specs = sharding.logical_specs(abs_params)
    self.abs_params = nnx.to_pure_dict(abs_params)
    self.abs_rest = nnx.to_pure_dict(abs_rest)
    # Where a rule's mesh axes do not divide a dimension (or a leaf is tiny), `fit` shards another
    # dimension or replicates; `sharding_report` is the one log line saying where (or "").
    fit = lambda abstract, specs: sharding.fit_shardings(
        abstract, sharding.logical_to_sharding(specs, self.mesh, self.rules))
    self.param_shardings, placement = fit(self.abs_params, param_specs)
    self.rest_shardings, _ = fit(self.abs_rest, sharding.logical_specs(abs_rest))
    self.sharding_report = placement.line()

    trained_specs, frozen_specs = self.tuning.split_specs(param_specs, self.abs_params)
    abs_trained, abs_frozen = jax.eval_shape(self.tuning.split, self.abs_params, jax.random.key(0))
    self.trained_shardings, _ = fit(abs_trained, trained_specs)
    self.frozen_shardings, _ = fit(abs_frozen, frozen_specs)
    self.tx = make_optimizer(config)
    self.ctx = StepContext(model=model_def, task=self.task, tuning=self.tuning, tx=self.tx,
                           base_key=jax.random.key(config.seed),
                           accum_steps=int(config.grad_accum_steps))
    self._build = build
    self.shardings = self._state_shardings()
    self._eval_fn = None

  # -- initial state --
  def _init_model(self, key):
    model = self._build(self.spec, nnx.Rngs(params=key, dropout=0))
    _, params, _, rest = nnx.split(model, nnx.Param, nnx.RngState, ...)
    return nnx.to_pure_dict(params), nnx.to_pure_dict(rest)

  def _make_state(self, params, model_state, key):
    trained, frozen = self.tuning.split(params, key)
    return TrainState(step=jnp.zeros((), jnp.int32), params=trained, frozen=frozen,
                      opt_state=self.tx.init(trained), model_state=model_state,
                      nonfinite=reliability.nonfinite_record())

  def _state_shardings(self) -> TrainState:
    rep = sharding.replicated(self.mesh)
    abs_state = jax.eval_shape(self._make_state, self.abs_params, self.abs_rest, jax.random.key(0))
    opt = optax.tree_map_params(self.tx, lambda _, s: s, abs_state.opt_state, self.trained_shardings,
                                transform_non_params=lambda _: rep)
    return TrainState(step=rep, params=self.trained_shardings, frozen=self.frozen_shardings,
                      opt_state=opt, model_state=self.rest_shardings,
                      nonfinite=jax.tree.map(lambda _: rep, reliability.nonfinite_record()))

  def init_state(self) -> TrainState:
    """A fresh state on the mesh, warm-started from `config.init` when it names a source."""
    init_key, split_key = jax.random.split(jax.random.fold_in(self.ctx.base_key, 1))
    with jax.set_mesh(self.mesh):
      params, model_state = jax.jit(
          self._init_model, out_shardings=(self.param_shardings, self.rest_shardings))(init_key)
      if self.task.init is not None:
        params, model_state = init_lib.warm_start(
            self.task.init, params, model_state, backbone=self.task.backbone,
            same_task=self.task.init.task == self.spec["task"],
            allow_missing="|".join(r for r in (self.tuning.new_params, self.task.fresh_params) if r))
      return jax.jit(self._make_state, out_shardings=self.shardings)(params, model_state, split_key)

  # -- steps --
  def model_from(self, state: TrainState) -> nnx.Module:
    """The model in eval mode with the state's parameters (LoRA merged)."""
    return eval_model(self.ctx, state)

  def local_model(self, state: TrainState) -> nnx.Module:
    """`model_from(state)` with parameters that span processes copied whole onto this process's first
    device, for the tasks' host-side evaluations (predictions, retrieval embeddings, probes): they
    then run alike on every process. A collective in a multi-process run (every process calls it);
    with one process it is `model_from(state)`."""
    graphdef, variables = nnx.split(self.model_from(state))
    return nnx.merge(graphdef, multihost.local_copy(variables))

  def batch_shardings(self, batch) -> dict:
    return {k: sharding.batch_sharding(self.mesh, self.rules, v.ndim) for k, v in batch.items()}

  def jit_train_step(self, batch):
    """The train step jitted with explicit shardings and the state donated (not yet compiled)."""
    return jax.jit(functools.partial(train_step, self.ctx),
                   in_shardings=(self.shardings, self.batch_shardings(batch)),
                   out_shardings=(self.shardings, sharding.replicated(self.mesh)), donate_argnums=(0,))

  def compile(self, state: TrainState, batch):
    """AOT-compiles the train step; the eval step compiles on first use."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      lowered = self.jit_train_step(batch).lower(state, batch)
      self.compiled_train = lowered.compile()
    self.step_flops = metrics_lib.step_flops(lowered)
    rep = sharding.replicated(self.mesh)
    self._eval_fn = jax.jit(functools.partial(eval_step, self.ctx),
                            in_shardings=(self.shardings, self.batch_shardings(batch), rep),
                            out_shardings=rep)
    return self.compiled_train

  def run_eval_step(self, state: TrainState, batch, index: int):
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self._eval_fn(state, batch, jnp.asarray(index, jnp.int32))

  def to_global(self, local_batch):
    return sharding.to_global(local_batch, self.mesh, self.rules)


# ---------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------
def evaluate(setup: Setup, state: TrainState) -> dict[str, float]:
  if not setup.data.eval:
    return {}
  sums: dict[str, float] = {}
  n = 0
  for i, local in enumerate(pipeline.eval_batches(setup.data.eval, setup.config.batch_size,
                                                  setup.config.eval_batches)):
    m = jax.device_get(setup.run_eval_step(state, setup.to_global(local), i))
    for k, v in m.items():
      sums[k] = sums.get(k, 0.0) + float(v)
    n += 1
  if n == 0:
    raise UserError(f"the held-out split has fewer than batch_size={setup.config.batch_size} examples; "
                    "lower --config.batch_size or give more eval data")
  return {k: v / n for k, v in sums.items()}


# ---------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------
def train_and_evaluate(config, workdir: str) -> dict[str, float]:
  """Trains `config.task` in `workdir`, resuming from its latest checkpoint. Returns final eval metrics.

  Raises `Preempted` after a SIGTERM / Ctrl-C once the checkpoint of the step in progress is
  committed, and FloatingPointError when a step's loss or gradient is not finite (see
  config.skip_nonfinite).
  """
  t_start = time.perf_counter()
  pipeline.reset_bad_records()
  setup = Setup(config, workdir)
  task, mesh = setup.task, setup.mesh
  writer = fs.is_writer()

  # ---- state: fresh, or restored from the workdir's newest readable checkpoint ----
  data_iter = pipeline.make_train_iterator(setup.data.train, config.batch_size, config.seed)
  state = setup.init_state()
  abstract = ckpt.abstract_with_sharding(state, setup.shardings)
  try:
    restored, _ = ckpt.restore_latest(workdir, abstract, data_iter, fallback=config.checkpoint_fallback,
                                      log=_info, legacy=reliability.legacy_restore(abstract))
  except UserError as e:
    changes = ckpt.config_changes(workdir, config)
    if not changes:
      raise
    more = f" and {len(changes) - 4} more" if len(changes) > 4 else ""
    raise UserError(f"{e}; the workdir's run had another config ({'; '.join(changes[:4])}{more}): "
                    "rerun with its values to resume it, or train into a new --workdir") from e
  if restored is not None:
    state = restored
  start = int(jax.device_get(state.step))

  # ---- compile the train step (the eval step compiles on first use) ----
  setup.compile(state, setup.to_global(_peek(data_iter)))
  reliability.all_processes_ready("compiled")

  # Every check has passed: from here on the run writes into the workdir.
  if writer:
    fs.makedirs(workdir)
    try:
      task.save_artifacts()
    except OSError as e:  # a full disk or a read-only workdir: one line, not a traceback
      raise fs.write_error(getattr(e, "filename", None) or workdir, e) from None
    fs.write_json(fs.join(workdir, "config.json"), json.loads(config.to_json_best_effort()))
    modelspec.save(workdir, setup.spec)
  logger = metrics_lib.Logger(workdir, config.total_steps, start)
  checkpointer = ckpt.Checkpointer(workdir, keep=config.keep_checkpoints,
                                   async_save=config.async_checkpointing)
  peak = metrics_lib.peak_flops_total()
  logger.info(f"jembed: task={config.task} devices={jax.device_count()} mesh={dict(mesh.shape)} "
              f"{setup.tuning.describe(state.params, state.frozen)}; "
              f"data: {', '.join(f'{k}={v}' for k, v in setup.data.info.items())}")
  if setup.sharding_report:
    logger.info(setup.sharding_report)
  _, warmup_note = warmup_steps(config)
  if warmup_note:
    logger.info(warmup_note)
  bad = pipeline.bad_records()
  if bad["skipped"]:
    logger.info(f"data: skipped {bad['skipped']} bad record(s) (data.on_bad_record='skip'), e.g. "
                f"{bad['examples'][0]}")
    logger.write(start, "data", {"skipped_records": bad["skipped"]})
  bad_seen = bad["skipped"]
  if start:
    logger.info(f"resumed from {ckpt.checkpoint_dir(workdir)}/{start}")
  elif task.init is not None:
    logger.info(f"warm start from {task.init.description}"
                + (f"; {task.init.note}" if task.init.note else ""))

  # ---- loop ----
  items_per_batch = config.batch_size * task.items_per_example()
  stop_at = config.total_steps
  if config.stop_after_steps:
    stop_at = min(stop_at, start + config.stop_after_steps)
  eval_metrics: dict[str, float] = {}
  t_last, steps_since = time.perf_counter(), 0
  t_saved = time.monotonic()
  step = start
  stopper = reliability.StopSignals()
  in_flight = reliability.StepsInFlight()
  try:
    while step < stop_at:
      batch = setup.to_global(next(data_iter))
      state, train_metrics = setup.compiled_train(state, batch)
      in_flight.dispatched(train_metrics["loss"])  # waits for the step before this one
      step += 1
      steps_since += 1
      if step == start + 1:
        jax.block_until_ready(train_metrics)
        cache = jax.config.jax_compilation_cache_dir
        logger.info(f"first step done {time.perf_counter() - t_start:.1f} s after start "
                    f"(compilation cache: {cache or 'off'})")
      logger.progress(step)
      last = step == config.total_steps
      log_step = step % config.log_every == 0 or last or step == stop_at
      if log_step:
        record = reliability.check_nonfinite(state, config, checkpointer)
        train_metrics = {k: float(v) for k, v in jax.device_get(train_metrics).items()}
        dt = (time.perf_counter() - t_last) / steps_since
        row = dict(train_metrics, learning_rate=float(learning_rate_schedule(config)(step - 1)),
                   step_time=dt, **{f"{task.unit}_per_sec": items_per_batch / dt})
        row["mfu"] = (setup.step_flops / dt / peak) if (setup.step_flops and peak) else float("nan")
        row["skipped_steps"] = record["skipped"]
        logger.write(step, "train", row)
        bad_seen = _report_bad_records(logger, step, bad_seen)
        t_last, steps_since = time.perf_counter(), 0
      if step % config.eval_every == 0 or last:
        eval_metrics = evaluate(setup, state)
        eval_metrics.update(task.extra_eval(setup.local_model(state), step))
        logger.write(step, "eval", eval_metrics)
        t_last, steps_since = time.perf_counter(), 0
      # Asked every step: the host is at most one step ahead of the device (`StepsInFlight`), so a
      # signal that came while the device ran step k stops the run at step k + 1 at the latest.
      preempted = stopper.reached(step, log_step)
      save = (step % config.checkpoint_every == 0 or last or step == stop_at or preempted
              or reliability.time_to_save(t_saved, config.checkpoint_every_secs, log_step))
      if save:
        if not log_step:
          reliability.check_nonfinite(state, config, checkpointer)   # never save non-finite parameters
        checkpointer.save(step, state, data_iter)
        t_saved = time.monotonic()
      if preempted:
        checkpointer.wait()
        raise Preempted(f"stopped by {stopper.signal_name} after step {step}; checkpoint "
                        f"{ckpt.checkpoint_dir(workdir)}/{step} is committed: run the same command "
                        "again to resume")
    if step == config.total_steps:
      if not eval_metrics:
        eval_metrics = evaluate(setup, state)
      # Every process runs the summary and the export: both run collectives over the global state
      # (a process-0-only call would wait forever for the others); only process 0 writes files.
      task.final_summary(setup.local_model(state), eval_metrics, logger)
      _report_bad_records(logger, step, bad_seen)
      setup.tuning.export(workdir, state)
  finally:
    stopper.restore()
    try:
      checkpointer.close()
    finally:
      logger.close()
  return eval_metrics


def _report_bad_records(logger, step: int, seen: int) -> int:
  """Bad records a streamed source (jembed.data.image_stream) met since the last report: one log
  line and a "data" row; returns the count so far."""
  bad = pipeline.bad_records()
  if bad["skipped"] > seen:
    logger.info(f"data: skipped {bad['skipped']} bad record(s) so far (data.on_bad_record='skip'), "
                f"e.g. {bad['examples'][-1]}")
    logger.write(step, "data", {"skipped_records": bad["skipped"]})
  return bad["skipped"]


def _peek(data_iter):
  """The first batch of the stream without consuming it (its state is rewound)."""
  saved = data_iter.get_state()
  batch = next(data_iter)
  data_iter.set_state(saved)
  return batch


def _info(text: str) -> None:
  if fs.is_writer():
    print(text, flush=True)
