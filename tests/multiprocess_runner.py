"""Several training runs, one after another, in ONE process of a multi-process JAX job, for
tests/test_multihost.py: the process joins the job once (gloo collectives over loopback) and every
run reuses it, so a two-process test pays the start-up and the join once rather than per run.

  JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=I \
      python tests/multiprocess_runner.py JOBS.json

JOBS.json: [{"config": "finetune_text", "workdir": DIR, "overrides": {"peft.method": "lora", ...}}, ...]
(configs/NAME.py, with dotted overrides as --config.key=value would set them). Without the JAX_*
variables it runs the jobs in one process, on every local device.
"""
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(jobs_path: str) -> None:
  import jax
  if "JAX_COORDINATOR_ADDRESS" in os.environ:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"],
                               num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                               process_id=int(os.environ["JAX_PROCESS_ID"]))
  from jembed import train
  from spine_helpers import apply_overrides, load_config_file
  with open(jobs_path) as f:
    jobs = json.load(f)
  for job in jobs:
    config = apply_overrides(load_config_file(job["config"]), job["overrides"])
    print(f"runner: {job['config']} -> {job['workdir']}", flush=True)
    train.train_and_evaluate(config, job["workdir"])


if __name__ == "__main__":
  main(sys.argv[1])
