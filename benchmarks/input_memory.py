"""Peak memory of the text input paths on one corpus of a few hundred MB: `jembed.data.prepare`,
a short MLM run streaming the prepared corpus (data.prepared), and the same run on the raw files
(read, tokenized and packed in memory), first with the token cache off, then a restart that hits it.

    python benchmarks/input_memory.py [--mb 200] [--dir /tmp/jembed-input-bench] [--steps 10]

The corpus is the embedded Python documentation repeated (each copy's lines prefixed by its number,
so the documents differ) up to --mb megabytes; the tokenizer (vocab 8192) is trained once on the
embedded corpus and given to every path, so all of them pack the same rows. Each command runs in
its own process; its peak RSS is that child's ru_maxrss. Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Runs argv[2:], then writes "<peak RSS of that child in KB> <exit status>" to the file argv[1].
_MEASURE = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[2:]); "
            "open(sys.argv[1], 'w').write(f'{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss} "
            "{r.returncode}')")


def measured(cmd: list[str], log: str) -> dict:
  """Runs `cmd` in a fresh wrapper process: (peak RSS of cmd in MB, wall seconds)."""
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  t = time.perf_counter()
  with open(log, "w") as f:
    subprocess.run([sys.executable, "-c", _MEASURE, log + ".rss", *cmd], env=env, cwd=ROOT,
                   stdout=f, stderr=subprocess.STDOUT)
  with open(log + ".rss") as f:
    rss_kb, rc = f.read().split()
  if rc != "0":
    raise SystemExit(f"{' '.join(cmd)} failed; see {log}")
  return {"peak_rss_mb": round(int(rss_kb) / 1024), "wall_s": round(time.perf_counter() - t, 1)}


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--mb", type=int, default=200)
  p.add_argument("--dir", default="/tmp/jembed-input-bench")
  p.add_argument("--steps", type=int, default=10)
  args = p.parse_args()
  import shutil
  from jembed.data import corpus_embedded, wordpiece
  shutil.rmtree(args.dir, ignore_errors=True)
  os.makedirs(args.dir)
  corpus, tok = os.path.join(args.dir, "corpus.txt"), os.path.join(args.dir, "tokenizer.json")
  docs = corpus_embedded.embedded_documents()
  wordpiece.build_tokenizer(docs, 8192, save_to=tok)
  with open(corpus, "w") as f:
    copy = 0
    while f.tell() < args.mb * 1e6:
      f.writelines(f"copy {copy} {d}\n" for d in docs)
      copy += 1
  size_mb = round(os.path.getsize(corpus) / 1e6)
  py = sys.executable
  data = [f"--config.data.train={corpus}", f"--config.data.tokenizer={tok}"]
  run = [py, "-m", "jembed.main", "--config=configs/mlm.py", f"--config.total_steps={args.steps}",
         f"--config.eval_every={args.steps}", f"--config.checkpoint_every={args.steps}",
         "--config.eval_batches=2", f"--compile_cache={args.dir}/xla"]
  prep = os.path.join(args.dir, "prepared")
  results = {"corpus_mb": size_mb}
  results["prepare"] = measured([py, "-m", "jembed.data.prepare", "--config=configs/mlm.py",
                                 f"--out={prep}", "--shards=8", *data], f"{args.dir}/prepare.log")
  results["train_prepared"] = measured(
      run + [f"--workdir={args.dir}/w_prepared", f"--config.data.prepared={prep}"],
      f"{args.dir}/train_prepared.log")
  results["train_files_no_cache"] = measured(
      run + [f"--workdir={args.dir}/w_files", *data, "--config.data.cache_dir=none"],
      f"{args.dir}/train_files.log")
  results["train_files_cache_write"] = measured(
      run + [f"--workdir={args.dir}/w_cache", *data], f"{args.dir}/train_cache_write.log")
  # A restart with more steps: the rows come from the cache, nothing is read or tokenized.
  results["train_files_cache_hit"] = measured(
      run[:4] + [f"--config.total_steps={2 * args.steps}"] + run[5:]
      + [f"--workdir={args.dir}/w_cache", *data], f"{args.dir}/train_cache_hit.log")
  for name, r in results.items():
    if isinstance(r, dict):
      print(f"{name:26s} peak RSS {r['peak_rss_mb']:6d} MB   wall {r['wall_s']:7.1f} s")
  print(json.dumps(results))


if __name__ == "__main__":
  main()
