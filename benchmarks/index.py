"""Vector index: build time and queries/s of jembed.index against sentence-transformers'
`util.semantic_search` and FAISS `IndexFlatIP`, all exact, in one run on the same vectors.

    python benchmarks/index.py [--sizes 100000,1000000] [--dim 384] [--queries 1000] [--k 10]

Random unit vectors (seed 0), so cosine = inner product for all three. For each corpus size:
- build: jembed writes the index directory (vectors, ids, index.json) and loads it (memory-map +
  placing the rows on the devices); FAISS adds the rows to an IndexFlatIP; sentence-transformers has
  nothing to build (it searches a torch tensor), so its build is the tensor conversion.
- search: `--queries` queries, top-`--k`, best of `--repeats` passes after a warm-up (jembed's
  warm-up compiles; the compile time is printed apart). Queries/s = queries / best pass.
- agreement: the fraction of FAISS's top-k ids each side returns (1.0 = the same neighbours; ties
  on random floats are rare).
FAISS is skipped when faiss-cpu is not installed, sentence-transformers likewise. Ends with one JSON
line of every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  out = np.empty((n, dim), np.float32)
  for lo in range(0, n, 100_000):   # in slices: no float64 copy of the whole corpus
    x = rng.standard_normal((min(100_000, n - lo), dim), dtype=np.float32)
    out[lo:lo + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
  return out


def best(fn, repeats: int) -> tuple[float, float, object]:
  """(first call's seconds (warm-up, compiles), best of `repeats` later calls, last result)."""
  t0 = time.perf_counter()
  out = fn()
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
  return first, min(times), out


def agreement(ids: np.ndarray, reference: np.ndarray) -> float:
  return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids, reference)]))


def run_size(n: int, args, root: str) -> dict:
  import jax
  from jembed import index as index_lib
  corpus = unit_vectors(n, args.dim, 0)
  queries = unit_vectors(args.queries, args.dim, 1)
  row: dict = {"n": n, "dim": args.dim, "queries": args.queries, "k": args.k,
               "devices": f"{jax.device_count()} x {jax.devices()[0].platform}"}

  out = os.path.join(root, f"i{n}")
  t0 = time.perf_counter()
  index_lib.write(out, corpus, normalized=True)
  t_write = time.perf_counter() - t0
  t0 = time.perf_counter()
  idx = index_lib.Index.load(out)
  t_load = time.perf_counter() - t0
  compile_s, search_s, (_, jembed_ids) = best(lambda: idx.searcher.search(queries, args.k), args.repeats)
  row["jembed"] = {"build_s": round(t_write, 3), "load_s": round(t_load, 3),
                   "first_search_s": round(compile_s, 3), "search_s": round(search_s, 4),
                   "qps": round(args.queries / search_s, 1)}
  # The same through Index.search (hit dicts with ids and stored fields), as users call it.
  _, hits_s, _ = best(lambda: idx.search(queries, args.k), args.repeats)
  row["jembed"]["qps_with_hit_dicts"] = round(args.queries / hits_s, 1)
  reference = jembed_ids

  try:
    import faiss
  except ImportError:
    print("faiss-cpu not installed: FAISS skipped", file=sys.stderr)
  else:
    t0 = time.perf_counter()
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(corpus)
    t_build = time.perf_counter() - t0
    _, search_s, (_, faiss_ids) = best(lambda: flat.search(queries, args.k), args.repeats)
    row["faiss_flat_ip"] = {"build_s": round(t_build, 3), "search_s": round(search_s, 4),
                            "qps": round(args.queries / search_s, 1), "threads": faiss.omp_get_max_threads()}
    reference = faiss_ids
    row["jembed"]["agreement_with_faiss"] = agreement(jembed_ids, faiss_ids)
    del flat

  try:
    import types
    # PyPI's torchvision is built against CUDA torch; its compiled ops cannot load with the CPU
    # torch here, and transformers (imported by sentence-transformers) imports torchvision. Its
    # Python code works once this module of compiled-op registrations is stubbed out.
    sys.modules.setdefault("torchvision._meta_registrations",
                           types.ModuleType("torchvision._meta_registrations"))
    import torch
    from sentence_transformers import util
  except ImportError:
    print("sentence-transformers not installed: skipped", file=sys.stderr)
  else:
    t0 = time.perf_counter()
    corpus_t = torch.from_numpy(corpus)
    queries_t = torch.from_numpy(queries)
    t_build = time.perf_counter() - t0

    def st_search():
      return util.semantic_search(queries_t, corpus_t, top_k=args.k)
    _, search_s, res = best(st_search, args.repeats)
    st_ids = np.array([[h["corpus_id"] for h in q] for q in res])
    row["sentence_transformers"] = {"build_s": round(t_build, 4), "search_s": round(search_s, 4),
                                    "qps": round(args.queries / search_s, 1),
                                    "threads": torch.get_num_threads(),
                                    "agreement_with_reference": agreement(st_ids, reference)}
  del idx
  shutil.rmtree(out, ignore_errors=True)
  return row


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--sizes", default="100000,1000000", help="corpus sizes, comma-separated")
  p.add_argument("--dim", type=int, default=384)
  p.add_argument("--queries", type=int, default=1000)
  p.add_argument("--k", type=int, default=10)
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  rows = []
  with tempfile.TemporaryDirectory(prefix="jembed-index-bench-") as root:
    for n in [int(s) for s in args.sizes.split(",")]:
      row = run_size(n, args, root)
      rows.append(row)
      print(f"\n{n:,} x {args.dim} rows, {args.queries} queries, k={args.k} ({row['devices']})")
      print(f"  {'':24s} {'build s':>9s} {'search s':>9s} {'queries/s':>10s}")
      j = row["jembed"]
      print(f"  {'jembed.index':24s} {j['build_s'] + j['load_s']:9.3f} {j['search_s']:9.4f} {j['qps']:10.1f}"
            f"   (write {j['build_s']}s + load {j['load_s']}s; first search incl. compile "
            f"{j['first_search_s']}s; with hit dicts {j['qps_with_hit_dicts']}/s)")
      for name, key in (("FAISS IndexFlatIP", "faiss_flat_ip"), ("ST semantic_search", "sentence_transformers")):
        if key in row:
          r = row[key]
          print(f"  {name:24s} {r['build_s']:9.3f} {r['search_s']:9.4f} {r['qps']:10.1f}")
      if "agreement_with_faiss" in j:
        print(f"  top-{args.k} agreement with FAISS: jembed {j['agreement_with_faiss']:.4f}"
              + (f", ST {row['sentence_transformers']['agreement_with_reference']:.4f}"
                 if "sentence_transformers" in row else ""))
      sys.stdout.flush()
  print(json.dumps(rows))


if __name__ == "__main__":
  main()
