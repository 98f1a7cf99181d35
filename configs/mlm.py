"""Masked-language-model pretraining of a small BERT on the embedded corpus (the default run).

  python -m jembed.main --config configs/mlm.py --workdir /tmp/mlm

The embedded corpus is the Python reference documentation that ships inside CPython
(`pydoc_data.topics`), so this runs anywhere with no download. On a 2-core CPU it finishes in a few
minutes and ends well above the most-frequent-token baseline. Bigger runs override fields:

  python -m jembed.main --config configs/mlm.py --workdir /tmp/run1 \
      --config.total_steps=2000 --config.mesh.fsdp=4 --config.model.size=mini
  python -m jembed.main --config configs/mlm.py --workdir /tmp/own \
      --config.data.train='corpus/*.txt' --config.data.eval=heldout.txt

A corpus too large for memory is tokenized once into shards that each host streams its share of:

  python -m jembed.data.prepare --config configs/mlm.py --out /data/prep --shards 64 \
      --config.data.train='corpus/*.jsonl'
  python -m jembed.main --config configs/mlm.py --workdir /tmp/big --config.data.prepared=/data/prep
"""
import ml_collections

from configs.common import init_config, peft_config
from jembed.config import base_config


def get_config() -> ml_collections.ConfigDict:
  c = base_config()
  c.task = "mlm"
  c.total_steps = 600
  c.batch_size = 32
  c.learning_rate = 2e-3
  c.warmup_steps = 60
  c.log_every = 50
  c.eval_every = 200
  c.checkpoint_every = 200

  c.model = ml_collections.ConfigDict(dict(
      # With config.init, the architecture comes from the source: leave these at ""/0, or any you set
      # must agree with it. From scratch, "" / 0 mean the preset's value.
      size="",                  # tiny (the default) | mini | small | medium | base | large (BERT's dimensions)
      num_layers=0,             # 0 = from the size preset
      hidden_size=0,
      num_heads=0,
      mlp_dim=0,
      vocab_size=0,             # 0 = the tokenizer's vocabulary
      max_position=0,           # 0 = 512
      max_seq_length=0,         # inference length (embed/evaluate/export); 0 = the source's, else max_position
      type_vocab_size=0,        # 0 = 2
      dropout=0.1,
      attention_dropout=0.1,
      pre_ln=False,
      dtype="auto",             # compute dtype: auto = bfloat16 on TPU/GPU, float32 on CPU; params stay float32
      remat="none",             # none | full | dots: recompute layer activations in the backward pass
      pooling="mean",           # how `jembed.embed` pools this encoder: cls | mean | max | mean_sqrt_len
      pooler=False,             # BERT's tanh pooler over [CLS] (pooler_output); from scratch only, a source brings its own
  ))

  c.data = ml_collections.ConfigDict(dict(
      source="",                # "" = inferred: files if data.train, tfds if data.tfds_name, else embedded
      train="",                 # .txt (one document per line) or .jsonl ("text" field); globs, comma-separated
      eval="",                  # held-out files; empty = a deterministic eval_fraction of the documents
      eval_fraction=0.05,
      tfds_name="",
      tfds_split="train",
      tfds_eval_split="",
      tfds_text_key="text",
      data_dir="",
      tokenizer="",             # a tokenizer.json to use; empty = train WordPiece on the corpus (saved in workdir)
      vocab_size=8192,
      seq_len=128,
      mask_prob=0.15,
      max_predictions=0,        # 0 = ceil(mask_prob * seq_len)
      on_bad_record="error",    # error | skip (counted and reported) for undecodable or malformed records
      cache_dir="",             # text files' packed rows are cached here ("" = WORKDIR/cache; "none" = off)
      prepared="",              # a directory from `python -m jembed.data.prepare`: stream it from disk instead
      streams=0,                # with prepared: shard streams (0 = one per process); fix it to keep the
                                # data order when the number of processes changes
  ))
  c.init = init_config()       # warm start (a jembed workdir or a Hugging Face dir)
  c.peft = peft_config()       # which parameters train: full | linear_probe | lora | adapter
  return c
