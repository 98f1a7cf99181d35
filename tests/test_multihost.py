"""Two JAX processes (4 CPU devices each, gloo collectives over loopback) run `jembed.main` as a
multi-host job would, and log the same losses as one process with 8 devices."""
import json
import os
import socket
import subprocess
import sys

import numpy as np

from jembed import train
from spine_helpers import ROOT, tiny_mlm_config, write_corpus

SETTINGS = dict(total_steps=4, log_every=1, eval_every=4, checkpoint_every=2, learning_rate=0.01,
                warmup_steps=1)
MODEL = {"model.num_layers": 1, "model.hidden_size": 32, "model.num_heads": 2, "model.mlp_dim": 64,
         "model.max_position": 64, "data.vocab_size": 512, "data.seq_len": 32,
         "data.eval_fraction": 0.1, "batch_size": 16, "eval_batches": 2, "async_checkpointing": False}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def train_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r["loss"] for r in map(json.loads, f) if r["split"] == "train"]


def test_two_processes_match_one(tmp_path):
  corpus = write_corpus(str(tmp_path))
  workdir = str(tmp_path / "multihost")
  flags = [f"--config.{k}={v}" for k, v in {**SETTINGS, **MODEL, "data.train": corpus}.items()]
  port = free_port()
  procs = []
  for pid in range(2):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
    cmd = [sys.executable, "-m", "jembed.main", f"--config={ROOT}/configs/mlm.py", f"--workdir={workdir}",
           "--distributed=true", *flags]
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True))
  outs = []
  for p in procs:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    outs.append(out)
  # One job over both processes: 8 global devices, and only process 0 reports.
  assert "devices=8" in outs[0] and "[train] step 4" in outs[0]
  assert "[train]" not in outs[1]
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "4"))

  single = str(tmp_path / "single")
  config = tiny_mlm_config(corpus, **SETTINGS)
  train.train_and_evaluate(config, single)   # this process: 8 devices, one host
  np.testing.assert_allclose(train_losses(workdir), train_losses(single), rtol=1e-5)
