"""Contrastive text-embedding training with in-batch negatives (symmetric InfoNCE, scale 20).

  python -m jembed.main --config configs/contrastive_text.py --workdir /tmp/ct

With no data given it trains a small BERT from scratch on pairs built from the Python standard
library's docstrings (a function's one-line summary -> the rest of its docstring; no download), and
ends by printing held-out retrieval metrics (recall@1/10, MRR@10, nDCG@10) next to those of the
model it started from. Your own pairs, starting from a sentence-transformers model, with LoRA:

  python -m jembed.main --config configs/contrastive_text.py --workdir runs/ct \
      --config.init.hf=path/to/all-MiniLM-L6-v2 --config.data.train=pairs.jsonl \
      --config.data.eval=held_out_pairs.jsonl --config.peft.method=lora

pairs.jsonl: one {"anchor": ..., "positive": ..., "negative": ... or [...]} per line (names set by
data.*_key; negatives optional); a .txt file gives unsupervised pairs (each line with itself, two
dropout views). A global batch larger than memory: --config.loss.chunk_size=32 (GradCache).
Pairs larger than memory: tokenize them once into shards that each host streams its share of:

  python -m jembed.data.prepare --config configs/contrastive_text.py --out /data/pairs-prep \
      --config.data.train='pairs/*.jsonl' --shards 16
  python -m jembed.main --config configs/contrastive_text.py --workdir runs/ct \
      --config.data.prepared=/data/pairs-prep
"""
import ml_collections

from configs.common import init_config, peft_config
from jembed.config import base_config


def get_config() -> ml_collections.ConfigDict:
  c = base_config()
  c.task = "contrastive_text"
  c.total_steps = 300
  c.batch_size = 64             # pairs per step, over all devices: each anchor sees 63 in-batch negatives
  c.learning_rate = 1e-3
  c.warmup_steps = 30
  c.log_every = 50
  c.eval_every = 150
  c.eval_batches = 4
  c.checkpoint_every = 300
  c.retrieval_batch = 128       # texts per forward pass of the held-out retrieval evaluation

  c.init = init_config()
  c.peft = peft_config(targets="all_dense", trainable="")

  c.loss = ml_collections.ConfigDict(dict(
      scale=20.0,               # logits = scale * cosine (temperature 0.05), as sentence-transformers' MNRL
      learn_temperature=False,  # CLIP's learnable scale instead (starts at 1/init_temperature, clamped)
      init_temperature=0.07,
      max_scale=100.0,
      symmetric=True,           # also positive -> anchor over the batch's anchors
      chunk_size=0,             # > 0: gradient-cached chunks of this many pairs (must divide batch_size)
  ))

  # From scratch: "" / 0 mean BERT-tiny's values. With init.*, the architecture comes from the source:
  # leave these at ""/0, or any you set must agree with it.
  c.model = ml_collections.ConfigDict(dict(
      size="", num_layers=0, hidden_size=0, num_heads=0, mlp_dim=0, vocab_size=0, max_position=0,
      type_vocab_size=0, pre_ln=False,
      max_seq_length=0,         # inference length (embed/evaluate/export); 0 = the source's, else max_position
      dropout=0.1,
      attention_dropout=0.1,
      dtype="auto",             # compute dtype: auto = bfloat16 on TPU/GPU, float32 on CPU; params stay float32
      remat="none",             # none | full | dots: recompute layer activations in the backward pass
      pooling="",               # cls | mean | max | mean_sqrt_len; "" = the source's, else mean
      pooler=False,             # BERT's tanh pooler over [CLS] (pooler_output); from scratch only, a source brings its own
  ))

  c.data = ml_collections.ConfigDict(dict(
      train="",                 # .jsonl / .csv pairs, or .txt for unsupervised pairs; "" = embedded pairs
      eval="",                  # held-out pairs in the same format; "" = a hash-based eval_fraction of train
      eval_fraction=0.1,
      anchor_key="anchor",
      positive_key="positive",
      negative_key="negative",
      num_negatives=-1,         # hard negatives per pair: -1 = as many as every pair has, 0 = none
      on_bad_record="error",    # error | skip (counted and reported)
      tokenizer="",             # a tokenizer.json; "" = the init source's, else trained on the pairs
      vocab_size=8192,
      seq_len=64,
      prepared="",              # a directory from `python -m jembed.data.prepare`: stream pairs from disk
      streams=0,                # with prepared: shard streams (0 = one per process); fix it to keep the
                                # same global batches on any number of hosts
  ))
  return c
