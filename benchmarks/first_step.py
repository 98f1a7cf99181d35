"""Time to the first train step, cold and warm, with JAX's persistent compilation cache.

  python benchmarks/first_step.py [--config configs/mlm.py] [--repeats 1] [-- --config.key=value ...]

Runs the real command (`python -m jembed.main --config ... --config.total_steps=1`) as a fresh
process three ways, each in a fresh workdir, in the same run:
  off   --compile_cache=off (the baseline: every start compiles)
  cold  an empty cache directory (compiles and writes the cache)
  warm  the directory the cold run just filled (loads the compiled steps)
and reads the loop's own log line "first step done X s after start" (Setup, data, restore, compile
and the first step) and the process's wall time. Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINE = re.compile(r"first step done ([0-9.]+) s after start")


def run_once(config: str, cache: str, extra: list[str]) -> dict:
  with tempfile.TemporaryDirectory() as workdir:
    cmd = [sys.executable, "-m", "jembed.main", f"--config={config}", f"--workdir={workdir}/run",
           f"--compile_cache={cache}", "--config.total_steps=1", *extra]
    t = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t
  if out.returncode:
    sys.exit(f"first_step: {' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
  match = LINE.search(out.stdout + out.stderr)
  if not match:
    sys.exit("first_step: no 'first step done' line in the log")
  return {"first_step_s": float(match.group(1)), "process_s": wall}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/mlm.py")
  parser.add_argument("--repeats", type=int, default=1)
  args, extra = parser.parse_known_args()
  extra = [a for a in extra if a != "--"]
  results: dict[str, list[dict]] = {"off": [], "cold": [], "warm": []}
  for _ in range(args.repeats):
    with tempfile.TemporaryDirectory() as cache:
      results["off"].append(run_once(args.config, "off", extra))
      results["cold"].append(run_once(args.config, cache, extra))
      results["warm"].append(run_once(args.config, cache, extra))
  summary = {}
  print(f"{args.config} {' '.join(extra)}: time to the first step (median of {args.repeats})")
  for kind, runs in results.items():
    first = statistics.median(r["first_step_s"] for r in runs)
    wall = statistics.median(r["process_s"] for r in runs)
    summary[kind] = {"first_step_s": round(first, 2), "process_s": round(wall, 2)}
    print(f"  cache {kind:<4}  first step {first:6.1f} s after start   whole process {wall:6.1f} s")
  print(json.dumps({"config": args.config, "overrides": extra, **summary}))


if __name__ == "__main__":
  main()
