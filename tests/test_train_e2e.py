"""End to end: `python -m jembed.main` leaves metrics, a checkpoint and TensorBoard events, and its
loss falls; a run stopped at step k and resumed logs the same losses as one that never stopped."""
import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from absl import logging

from jembed import train
from spine_helpers import ROOT, tiny_mlm_config, write_corpus

logging.set_verbosity(logging.WARNING)
STEPS = 8
ARGS = dict(total_steps=STEPS, log_every=1, eval_every=4, checkpoint_every=4, learning_rate=0.01,
            warmup_steps=1)


def overrides_as_flags(config_overrides):
  return [f"--config.{k}={v}" for k, v in config_overrides.items()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_corpus(str(tmp_path_factory.mktemp("corpus")))


@pytest.fixture(scope="module")
def cli_run(corpus, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("cli") / "run")
  flags = dict(ARGS, **{"model.num_layers": 1, "model.hidden_size": 32, "model.num_heads": 2,
                        "model.mlp_dim": 64, "model.max_position": 64, "data.train": corpus,
                        "data.vocab_size": 512, "data.seq_len": 32, "data.eval_fraction": 0.1,
                        "batch_size": 16, "eval_batches": 2})
  cmd = [sys.executable, "-m", "jembed.main", f"--config={ROOT}/configs/mlm.py", f"--workdir={workdir}"]
  proc = subprocess.run(cmd + overrides_as_flags(flags), capture_output=True, text=True, cwd=ROOT,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc.stdout


def read_rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_cli_run_writes_outputs_and_learns(cli_run):
  workdir, stdout = cli_run
  rows = read_rows(workdir)
  train_rows = [r for r in rows if r["split"] == "train"]
  eval_rows = [r for r in rows if r["split"] == "eval"]
  assert [r["step"] for r in train_rows] == list(range(1, STEPS + 1))
  assert [r["step"] for r in eval_rows] == [4, 8]
  for r in train_rows:
    for key in ("loss", "accuracy", "tokens_per_sec", "mfu", "learning_rate"):
      assert key in r and np.isfinite(r[key]), (key, r)
    # No upper bound: the CPU peak is a cached measurement that a loaded machine can understate.
    assert r["mfu"] > 0
  for key in ("loss", "accuracy", "baseline_accuracy"):
    assert key in eval_rows[-1]
  # The loss falls.
  assert np.mean([r["loss"] for r in train_rows[-2:]]) < train_rows[0]["loss"] - 0.3
  # A checkpoint (the last one at least), TensorBoard events, the tokenizer and the config.
  assert os.path.isdir(os.path.join(workdir, "checkpoints", str(STEPS)))
  assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
  assert os.path.exists(os.path.join(workdir, "tokenizer.json"))
  assert json.load(open(os.path.join(workdir, "config.json")))["task"] == "mlm"
  assert "most frequent token" in stdout


def test_tensorboard_events_hold_the_logged_scalars(cli_run):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  workdir, _ = cli_run
  acc = EventAccumulator(os.path.join(workdir, "tensorboard"))
  acc.Reload()
  losses = [e.value for e in acc.Scalars("train/loss")]
  rows = [r["loss"] for r in read_rows(workdir) if r["split"] == "train"]
  np.testing.assert_allclose(losses, rows, rtol=1e-6)


def test_stop_and_resume_equals_uninterrupted(cli_run, corpus, tmp_path):
  reference = {r["step"]: r["loss"] for r in read_rows(cli_run[0]) if r["split"] == "train"}
  workdir = str(tmp_path / "resumed")
  config = tiny_mlm_config(corpus, **ARGS)
  config.stop_after_steps = 3
  train.train_and_evaluate(config, workdir)   # stops after step 3 (checkpoint written)
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))) == [3]
  config.stop_after_steps = 0
  train.train_and_evaluate(config, workdir)   # resumes at step 3, runs to the end
  resumed = [r for r in read_rows(workdir) if r["split"] == "train"]
  assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6, 7, 8]
  for r in resumed:
    np.testing.assert_allclose(r["loss"], reference[r["step"]], rtol=1e-5, err_msg=f"step {r['step']}")

  # A run that died after its step-4 checkpoint (the step-8 one never landed) redoes steps 5..8;
  # each step is still logged once, with the same losses.
  shutil.rmtree(os.path.join(workdir, "checkpoints", "8"))
  train.train_and_evaluate(config, workdir)
  redone = [r for r in read_rows(workdir) if r["split"] == "train"]
  assert [r["step"] for r in redone] == [1, 2, 3, 4, 5, 6, 7, 8]
  for r in redone:
    np.testing.assert_allclose(r["loss"], reference[r["step"]], rtol=1e-5, err_msg=f"step {r['step']}")
  # TensorBoard too: each resume marks a restart, so the orphaned events of the redone steps are
  # discarded and every step shows once.
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  acc = EventAccumulator(os.path.join(workdir, "tensorboard"))
  acc.Reload()
  assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6, 7, 8]
