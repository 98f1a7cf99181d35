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
_COMPILE_CACHE = flags.DEFINE_string(
    "compile_cache", None, "Directory of JAX's persistent compilation cache, so a restarted run skips "
    "compiling; 'off' disables it. Default: $JEMBED_COMPILE_CACHE, else ~/.cache/jembed/xla.")
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
    fail(f"unexpected arguments: {' '.join(argv[1:])}; pass options as --flag=value "
          "(config fields as --config.key=value)")
  from jembed.errors import UserError
  config = load_config()
  if config is None:
    fail("no config given; pass --config configs/mlm.py (or another file in configs/)")
  if not _WORKDIR.value:
    fail("no workdir given; pass --workdir DIR (checkpoints, logs and metrics go there)")
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  import jax
  _enable_compile_cache(jax)
  if _want_distributed():
    _initialize_distributed(jax)
  from jembed import train
  try:
    train.train_and_evaluate(config, _WORKDIR.value)
  except (UserError, FloatingPointError) as e:
    fail(str(e))
  except train.Preempted as e:
    # A distinct status, so that a job script can tell "stopped cleanly, resume me" (3) from a
    # user error (2) and a crash (1).
    print(f"jembed: {e}", file=sys.stderr, flush=True)
    sys.exit(PREEMPTED_EXIT_CODE)


PREEMPTED_EXIT_CODE = 3


def _enable_compile_cache(jax) -> None:
  """JAX's persistent compilation cache, on by default: a resumed or repeated run loads its compiled
  steps instead of compiling them again (the log's "first step done ..." line shows the difference)."""
  where = _COMPILE_CACHE.value or os.environ.get("JEMBED_COMPILE_CACHE") or os.path.join(
      os.path.expanduser(os.environ.get("XDG_CACHE_HOME", "~/.cache")), "jembed", "xla")
  if where == "off":
    return
  jax.config.update("jax_compilation_cache_dir", where)
  # Programs that compile in under a second are not worth a disk round trip.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def load_config():
  """config_flags may load the file lazily, on first access; its failures become one line."""
  try:
    config = _CONFIG.value
    if config is not None:
      config.keys()  # a file that failed to load raises on first use
    return config
  except Exception as e:  # pylint: disable=broad-except
    fail(_config_error(e))


def _config_path(argv=None) -> str:
  argv = argv if argv is not None else sys.argv
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return "?"


def _config_error(e: BaseException, argv=None) -> str:
  """One line for a config file that does not exist, does not parse or fails in get_config()."""
  import traceback
  path = _config_path(argv).split(":", 1)[0]
  if not os.path.isfile(path):
    return f"config file {path} does not exist; pass one of configs/*.py (e.g. --config=configs/mlm.py)"
  cause = e
  while cause.__cause__ is not None or (cause.__context__ is not None and not cause.__suppress_context__):
    cause = cause.__cause__ or cause.__context__
  if isinstance(cause, SyntaxError):
    at = f" at {cause.filename}:{cause.lineno}"
    message = cause.msg
  else:
    frames = [f for f in traceback.extract_tb(cause.__traceback__)
              if os.path.abspath(f.filename) == os.path.abspath(path)]
    at = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    message = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
  return f"cannot load config file {path} ({type(cause).__name__}{at}: {message}); fix the file"


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


def fail(message: str) -> None:
  """The one-line error and exit status 2 of jembed's flag-based commands (also jembed.data.prepare)."""
  print(f"jembed: error: {message}", file=sys.stderr)
  sys.exit(2)


def parse_flags(argv):
  # Flag errors (unknown config key, wrong type, missing config file) are one line, exit 2.
  path = _config_path(argv)
  if path != "?" and not os.path.isfile(path.split(":", 1)[0]):
    fail(_config_error(FileNotFoundError(path), argv))
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    # config_flags reports a key the locked config does not have this way (its message spans
    # lines and names only the last part): name the whole dotted key and the closest field.
    from jembed import config as config_lib
    fail(config_lib.unknown_key_line(e, argv, _config_path(argv)))
  except (flags.Error, ValueError, TypeError) as e:
    if "Error whilst parsing config file" in str(e) or "loading config file" in str(e):
      fail(_config_error(e, argv))
    fail(str(e).strip().splitlines()[0])
  except Exception as e:  # pylint: disable=broad-except
    # The config file itself failed (a syntax error, an exception in get_config, no such file).
    fail(_config_error(e, argv))


def run() -> None:
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
