"""MLM train-step throughput and MFU for the all-MiniLM-L6-v2 shape, jembed vs PyTorch.

  python benchmarks/mlm_step.py [--steps 10] [--repeats 3] [--batch 32] [--seq 128]
  python benchmarks/mlm_step.py --in-flight [--steps 50]   # the loop's dispatch bound, on vs off

Shape: 6 layers, hidden 384, 12 heads, FFN 1536, vocab 30522, global batch 32, sequence 128,
dropout 0.1, AdamW. jembed's step is the real one (`jembed.train.Setup` over `MlmTask`, on random
tokens). When torch and transformers import, the same step is timed for transformers'
`BertForMaskedLM` with torch.optim.AdamW in the same run. MFU = FLOPs per step / step time / peak,
with jembed's FLOPs from XLA's cost analysis of the compiled step and the peak from
`jembed.metrics.peak_flops_total()` (on a CPU: a measured f32 matmul peak). The torch model's FLOPs
are counted analytically (it computes logits at every position). Prints figures, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import logging  # noqa: E402

from jembed import config as config_lib  # noqa: E402
from jembed import metrics, train  # noqa: E402
from jembed.tasks import base, mlm  # noqa: E402

LAYERS, HIDDEN, HEADS, FFN, VOCAB = 6, 384, 12, 1536, 30522


class RandomTokenMlm(mlm.MlmTask):
  """The real MLM task on uniformly random token ids (no tokenizer needed)."""

  def load_data(self):
    rng = np.random.default_rng(0)
    n = 4 * self.config.batch_size
    tokens = rng.integers(5, VOCAB, (n, self.seq_len)).astype(np.int32)
    tokens[:, 0], tokens[:, -1] = 2, 3
    self.ids = dict(pad=0, unk=1, cls=2, sep=3, mask=4)
    self.vocab = VOCAB
    self.most_frequent = 5
    return base.Data(train={"tokens": tokens}, eval={"tokens": tokens})

  def model_spec(self):
    # No tokenizer: the description is built from the fixed sizes above.
    from jembed.models.transformer import TransformerConfig
    return dict(task="mlm", encoder=TransformerConfig.from_config(self.config.model, VOCAB).to_json(),
                special_ids=self.ids, seq_len=self.seq_len, pooling="mean", normalize=False)


def jembed_config(batch: int, seq: int, dtype: str):
  c = config_lib.base_config()
  c.task = "mlm"
  c.batch_size = batch
  c.total_steps = 1000
  c.model = dict(size="tiny", num_layers=LAYERS, hidden_size=HIDDEN, num_heads=HEADS, mlp_dim=FFN,
                 vocab_size=VOCAB, max_position=512, type_vocab_size=2, dropout=0.1,
                 attention_dropout=0.1, pre_ln=False, dtype=dtype, remat="none")
  c.data = dict(seq_len=seq, mask_prob=0.15, max_predictions=0)
  return c


def time_steps(step, steps: int, repeats: int) -> list[float]:
  step()
  step()  # warm-up (and compile, where lazy)
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    for _ in range(steps):
      step()
    times.append((time.perf_counter() - t) / steps)
  return times


def bench_jembed(args):
  config = jembed_config(args.batch, args.seq, args.dtype)
  setup = train.Setup(config, "/tmp/unused", task=RandomTokenMlm(config, "/tmp/unused"))
  state = setup.init_state()
  batch = setup.to_global({"tokens": setup.data.train["tokens"][:args.batch]})
  setup.compile(state, batch)
  holder = {"state": state}

  def step():
    holder["state"], m = setup.compiled_train(holder["state"], batch)
    jax.block_until_ready(m)

  times = time_steps(step, args.steps, args.repeats)
  return statistics.median(times), setup.step_flops


def bench_in_flight(args):
  """Steady-state throughput of the train loop's stepping (next batch from the data iterator, to
  the mesh, dispatch) with the steps in flight bounded at 2 (`train.StepsInFlight`, what the loop
  does) and unbounded (the host queues every step, as before), alternated in the same process."""
  from jembed.data import pipeline
  config = jembed_config(args.batch, args.seq, args.dtype)
  setup = train.Setup(config, "/tmp/unused", task=RandomTokenMlm(config, "/tmp/unused"))
  data_iter = pipeline.make_train_iterator(setup.data.train, args.batch, 0)
  holder = {"state": setup.init_state()}
  setup.compile(holder["state"], setup.to_global(next(data_iter)))

  def run(limit):
    flight = train.StepsInFlight(limit)
    m = None
    for _ in range(args.steps):
      holder["state"], m = setup.compiled_train(holder["state"], setup.to_global(next(data_iter)))
      flight.dispatched(m["loss"])
    jax.block_until_ready(m)

  run(2)  # warm-up
  times = {2: [], None: []}
  for _ in range(args.repeats):
    for limit in (None, 2):
      t = time.perf_counter()
      run(limit)
      times[limit].append((time.perf_counter() - t) / args.steps)
  tokens = args.batch * args.seq
  bounded, unbounded = statistics.median(times[2]), statistics.median(times[None])
  print(f"unbounded dispatch     : {unbounded * 1e3:7.2f} ms/step  {tokens / unbounded:9.0f} tokens/s")
  print(f"2 steps in flight (new): {bounded * 1e3:7.2f} ms/step  {tokens / bounded:9.0f} tokens/s  "
        f"({unbounded / bounded:.3f}x)")
  print(json.dumps({"batch": args.batch, "seq": args.seq, "steps": args.steps, "repeats": args.repeats,
                    "unbounded_step_s": unbounded, "in_flight_2_step_s": bounded,
                    "in_flight_2_vs_unbounded": unbounded / bounded}))


def torch_flops(batch: int, seq: int) -> float:
  tokens = batch * seq
  per_layer = 4 * HIDDEN * HIDDEN + 2 * HIDDEN * FFN          # matmul weights per layer
  fwd = 2 * tokens * LAYERS * per_layer                        # dense layers
  fwd += LAYERS * 2 * 2 * batch * seq * seq * HIDDEN           # QK^T and PV
  fwd += 2 * tokens * (HIDDEN * HIDDEN + HIDDEN * VOCAB)       # MLM transform + logits everywhere
  return 3 * fwd                                               # forward + backward


def bench_torch(args):
  try:
    import torch
    from transformers import BertConfig, BertForMaskedLM
  except ImportError:
    return None
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count())
  cfg = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                   intermediate_size=FFN, max_position_embeddings=512)
  model = BertForMaskedLM(cfg).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
  gen = torch.Generator().manual_seed(0)
  ids = torch.randint(5, VOCAB, (args.batch, args.seq), generator=gen)
  labels = torch.full_like(ids, -100)
  chosen = torch.rand(ids.shape, generator=gen) < 0.15
  labels[chosen] = ids[chosen]
  inputs = ids.clone()
  inputs[chosen] = 4

  def step():
    opt.zero_grad(set_to_none=True)
    loss = model(input_ids=inputs, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()

  times = time_steps(step, args.steps, args.repeats)
  return statistics.median(times), torch.__version__


def main():
  logging.set_verbosity(logging.WARNING)
  p = argparse.ArgumentParser()
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--skip-torch", action="store_true")
  p.add_argument("--in-flight", action="store_true",
                 help="time the loop's stepping with 2 steps in flight vs unbounded dispatch")
  args = p.parse_args()
  if args.in_flight:
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}")
    bench_in_flight(args)
    return

  peak = metrics.peak_flops_total()
  tokens = args.batch * args.seq
  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; peak {peak / 1e9:.0f} GFLOP/s "
        f"({'measured f32 matmul' if jax.devices()[0].platform == 'cpu' else 'spec sheet'})")
  dt, flops = bench_jembed(args)
  result = {"batch": args.batch, "seq": args.seq, "dtype": args.dtype, "peak_gflops": peak / 1e9,
            "jembed_step_s": dt, "jembed_tokens_per_sec": tokens / dt,
            "jembed_gflop_per_step": flops / 1e9, "jembed_mfu": flops / dt / peak}
  print(f"jembed : {dt * 1e3:7.1f} ms/step  {tokens / dt:9.0f} tokens/s  {flops / 1e9:6.1f} GFLOP/step  "
        f"MFU {100 * flops / dt / peak:5.1f}%")
  t = None if args.skip_torch else bench_torch(args)
  if t is None:
    print("pytorch: skipped (pip install torch transformers to compare)")
  else:
    tdt, version = t
    tflops = torch_flops(args.batch, args.seq)
    result.update({"torch_version": version, "torch_step_s": tdt, "torch_tokens_per_sec": tokens / tdt,
                   "torch_gflop_per_step_analytic": tflops / 1e9, "torch_mfu": tflops / tdt / peak,
                   "speedup_vs_torch": tdt / dt})
    print(f"pytorch: {tdt * 1e3:7.1f} ms/step  {tokens / tdt:9.0f} tokens/s  {tflops / 1e9:6.1f} GFLOP/step  "
          f"MFU {100 * tflops / tdt / peak:5.1f}%  (torch {version}, BertForMaskedLM)")
    print(f"jembed is {tdt / dt:.2f}x PyTorch's tokens/s")
  print(json.dumps(result))


if __name__ == "__main__":
  main()
