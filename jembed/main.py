"""Command line: python -m jembed.main --config configs/mlm.py --workdir DIR [--config.key=value ...]"""
from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and metrics go; a run resumes "
                               "from the latest checkpoint found there.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "true", "false"],
    "Call jax.distributed.initialize(): auto does so on multi-host TPU VMs and when "
    "JAX_COORDINATOR_ADDRESS or SLURM_JOB_ID is set.")


def _want_distributed() -> bool:
  if _DISTRIBUTED.value != "auto":
    return _DISTRIBUTED.value == "true"
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return ("," in hosts or "JAX_COORDINATOR_ADDRESS" in os.environ
          or int(os.environ.get("SLURM_NTASKS", "1")) > 1)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from jembed.errors import UserError
  if _CONFIG.value is None:
    _fail("no config given; pass --config configs/mlm.py (or another file in configs/)")
  if not _WORKDIR.value:
    _fail("no workdir given; pass --workdir DIR (checkpoints, logs and metrics go there)")
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  import jax
  if _want_distributed():
    _initialize_distributed(jax)
  from jembed import train
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (UserError, FloatingPointError) as e:
    _fail(str(e))


def _initialize_distributed(jax) -> None:
  """jax.distributed.initialize(): cluster auto-detection (TPU VMs, SLURM, ...), or explicit
  JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID (e.g. a hand-launched GPU cluster,
  or several CPU processes on one machine)."""
  # Cross-process collectives for CPU devices; accelerators bring their own.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  env = os.environ
  if "JAX_COORDINATOR_ADDRESS" in env and "JAX_NUM_PROCESSES" in env and "JAX_PROCESS_ID" in env:
    jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], num_processes=int(env["JAX_NUM_PROCESSES"]),
                               process_id=int(env["JAX_PROCESS_ID"]))
  else:
    jax.distributed.initialize()


def _fail(message: str) -> None:
  print(f"jembed: error: {message}", file=sys.stderr)
  sys.exit(2)


def _parse_flags(argv):
  # Flag errors (unknown config key, wrong type, missing config file) are one line, exit 2.
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    # config_flags reports a key the locked config does not have this way.
    key = str(e).strip("\"'")
    given = [a for a in argv[1:] if a.startswith("--config.") and key in a]
    _fail(f"unknown config key '{key}' in {given[0] if given else 'the overrides'}; "
          "see the config file for the fields it has (print them with --config=FILE --helpfull)")
  except (flags.Error, ValueError, TypeError) as e:
    _fail(str(e).strip().splitlines()[0])


def run() -> None:
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
