"""`python -m jembed.main` with one fault injected, for tests/test_faults.py.

  JEMBED_FAULT=KIND:STEP python tests/fault_runner.py --config=... --workdir=...

KIND:
  term_at_batch   the process sends itself SIGTERM while step STEP is in progress (the loop must
                  finish it, save it, wait for the commit and exit 3)
  kill_at_batch   SIGKILL while step STEP is in progress (nothing of it may survive)
  kill_in_save    SIGKILL while the asynchronous checkpoint of step STEP is being written: every file
                  is written but the save is held before its commit (the rename into place)
"""
import asyncio
import os
import signal
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def install(kind: str, at: int) -> None:
  from jembed import train
  if kind in ("term_at_batch", "kill_at_batch"):
    sig = signal.SIGTERM if kind == "term_at_batch" else signal.SIGKILL
    original = train.Setup.to_global
    calls = {"n": 0}

    def to_global(self, local_batch):
      calls["n"] += 1   # call 1 is the compile-time peek; call k + 1 carries step k's batch
      if calls["n"] == at + 1:
        print(f"fault_runner: {signal.Signals(sig).name} during step {at}", flush=True)
        os.kill(os.getpid(), sig)
      return original(self, local_batch)
    train.Setup.to_global = to_global
  elif kind == "kill_in_save":
    from orbax.checkpoint._src.path import atomicity
    from jembed import checkpoint
    original_finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self, *args, **kwargs):
      if self._final_path.name == str(at):  # pylint: disable=protected-access
        await asyncio.sleep(3600)   # never commits: the process is killed first
      return await original_finalize(self, *args, **kwargs)
    atomicity.AtomicRenameTemporaryPath.finalize = finalize
    original_save = checkpoint.Checkpointer.save

    def save(self, step, state, data_iter):
      original_save(self, step, state, data_iter)
      if step == at:
        import time
        root = self.path
        for _ in range(600):   # until the temporary directory holds the written state
          tmp = [d for d in os.listdir(root) if d.startswith(f"{step}.orbax-checkpoint-tmp")]
          if tmp and os.path.exists(os.path.join(root, tmp[0], "state", "_METADATA")):
            break
          time.sleep(0.05)
        print(f"fault_runner: SIGKILL during the save of step {step}: {sorted(os.listdir(root))}",
              flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.Checkpointer.save = save
  else:
    raise SystemExit(f"unknown fault {kind}")


if __name__ == "__main__":
  kind, at = os.environ["JEMBED_FAULT"].split(":")
  install(kind, int(at))
  from jembed import main
  main.run()
