"""Memory of one contrastive gradient computation with GradCache (jembed.losses.grad_cache) against
plain jax.value_and_grad, from XLA's memory analysis of the compiled program on CPU.

  python benchmarks/grad_cache_memory.py            # defaults below; --batch/--seq/--chunks to change

The model is jembed's TransformerEncoder ("tiny": 2 layers, hidden 128) with dropout, mean-pooled;
the loss is info_nce over anchors, positives and one hard negative per pair (3 x batch sequences).
The gradient is taken w.r.t. `trained` through `tuning.combine` and `nnx.merge` inside `encode`,
the way a contrastive text task calls grad_cache. Nothing is executed: parameters and batch are
abstract and each program is only lowered and compiled. Temp = XLA's temporaries (activations
kept for the backward pass and scratch). (FLOPs are not shown: XLA's cost analysis counts a loop
body once, not once per chunk.) Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
from flax import nnx  # noqa: E402

from jembed import config as config_lib, sharding, tuning as tuning_lib  # noqa: E402
from jembed.losses import grad_cache, info_nce  # noqa: E402
from jembed.models.transformer import TransformerConfig, TransformerEncoder  # noqa: E402

MiB = 2.0**20
VOCAB = 8192


def build(batch: int, seq: int):
  arch = TransformerConfig.from_config(ml_collections.ConfigDict(dict(size="tiny")), VOCAB)
  with nn.logical_axis_rules(sharding.DEFAULT_RULES):
    abstract = nnx.eval_shape(lambda: TransformerEncoder(arch, rngs=nnx.Rngs(0)))
  graphdef, abs_params, abs_rest = nnx.split(abstract, nnx.Param, ...)
  abs_params, abs_rest = nnx.to_pure_dict(abs_params), nnx.to_pure_dict(abs_rest)
  tuning = tuning_lib.tuning_from_config(config_lib.base_config())  # full fine-tuning
  trained, frozen = jax.eval_shape(lambda p: tuning.split(p, jax.random.key(0)), abs_params)
  ids = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
  inputs = {"anchor": ids(batch, seq), "positive": ids(batch, seq), "negative": ids(batch, 1, seq)}
  return graphdef, tuning, trained, frozen, abs_rest, inputs, arch


def programs(graphdef, tuning, frozen, rest):
  """(unchunked, chunked(chunk_size)) gradient functions of `trained`, sharing one encode."""

  def encode(trained, chunk, rng):
    tuning_rng, drop_rng = jax.random.split(rng)
    params = tuning.combine(trained, frozen, rng=tuning_rng, train=True)
    model = nnx.merge(graphdef, params, rest)
    n, k, seq = chunk["negative"].shape
    tokens = jnp.concatenate([chunk["anchor"], chunk["positive"], chunk["negative"].reshape(n * k, seq)])
    mask = tokens != 0
    h = model(tokens, mask, train=True, rngs=nnx.Rngs(dropout=drop_rng))
    pooled = (h * mask[..., None]).sum(1) / jnp.maximum(mask.sum(1, keepdims=True), 1)
    return {"anchor": pooled[:n], "positive": pooled[n:2 * n], "negative": pooled[2 * n:].reshape(n, k, -1)}

  def loss_from_embeddings(emb, trained=None):  # a fixed scale: `trained` is not needed
    loss, metrics = info_nce(emb["anchor"], emb["positive"], scale=20.0, negatives=emb["negative"])
    return loss, metrics

  def unchunked(trained, inputs, rng):
    return jax.value_and_grad(lambda t: loss_from_embeddings(encode(t, inputs, rng)), has_aux=True)(trained)

  def chunked(chunk_size):
    return lambda trained, inputs, rng: grad_cache(encode, loss_from_embeddings, trained, inputs,
                                                   chunk_size=chunk_size, rng=rng)
  return unchunked, chunked


def measure(fn, trained, inputs) -> dict:
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(trained, inputs, jax.random.key(0)).compile()
  m = compiled.memory_analysis()
  return {"temp_bytes": int(m.temp_size_in_bytes), "argument_bytes": int(m.argument_size_in_bytes),
          "output_bytes": int(m.output_size_in_bytes), "compile_s": round(time.perf_counter() - t0, 1)}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=256)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--chunks", default="16,64")
  args = ap.parse_args()
  graphdef, tuning, trained, frozen, rest, inputs, arch = build(args.batch, args.seq)
  unchunked, chunked = programs(graphdef, tuning, frozen, rest)
  results = {"unchunked": measure(unchunked, trained, inputs)}
  for c in (int(x) for x in args.chunks.split(",")):
    results[f"chunk_{c}"] = measure(chunked(c), trained, inputs)
  base = results["unchunked"]
  print(f"\n== TransformerEncoder tiny ({arch.num_layers} layers, hidden {arch.hidden_size}), batch "
        f"{args.batch} pairs + 1 negative = {3 * args.batch} sequences x {args.seq} tokens, "
        f"{jax.devices()[0].platform}, jax {jax.__version__} ==")
  print(f"{'':14s}{'temp MiB':>10s}{'vs unchunked':>14s}{'args MiB':>10s}{'out MiB':>9s}{'compile s':>11s}")
  for name, r in results.items():
    print(f"{name:14s}{r['temp_bytes'] / MiB:10.1f}{r['temp_bytes'] / base['temp_bytes']:14.3f}"
          f"{r['argument_bytes'] / MiB:10.1f}{r['output_bytes'] / MiB:9.1f}{r['compile_s']:11.1f}")
  print(json.dumps({"benchmark": "grad_cache_memory", "batch_pairs": args.batch, "seq": args.seq,
                    "sequences": 3 * args.batch, "model": "tiny", "platform": jax.devices()[0].platform,
                    "results": results}))


if __name__ == "__main__":
  main()
