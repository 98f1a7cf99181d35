"""Text classification fine-tuning: a pretrained encoder plus a fresh head.

  # from a Hugging Face / sentence-transformers directory (fetched beforehand; nothing downloads):
  python -m jembed.main --config configs/finetune_text.py --workdir /tmp/ft \
      --config.init.hf=path/to/all-MiniLM-L6-v2
  # from a jembed pretraining run:
  python -m jembed.main --config configs/mlm.py --workdir /tmp/run1
  python -m jembed.main --config configs/finetune_text.py --workdir /tmp/ft \
      --config.init.checkpoint=/tmp/run1 --config.peft.method=lora --config.peft.rank=8

Where the weights start (config.init): `init.hf` a Hugging Face / sentence-transformers text
directory (BERT-family; read without torch), or `init.checkpoint` a jembed --workdir (its latest
checkpoint, or `init.step`); neither = a BERT-tiny from scratch. (Image models start from
`init.pretrained`, see configs/finetune_image.py.)

Defaults follow the source (jembed/transfer.py), and a value you set is always kept:
  learning_rate = 0 (auto): from a source, full fine-tuning at 5e-5 (AdamW, the BERT /
    sentence-transformers recipe), LoRA, adapters and linear probes at 1e-3; from scratch 1e-3.
    The chosen rate is printed and saved in WORKDIR/config.json.
  model.pooling = "" (auto): the source's pooling (mean for a mean-pooled sentence-transformers
    model), else [CLS].
  model.head = "" (auto): the Hugging Face head of the source's family (BERT's pooler + linear,
    RoBERTa's dense + tanh + linear, ...) when it pools as the run does, so `python -m jembed.export`
    writes a *ForSequenceClassification model; else a linear layer on the pooled features (which
    exports as an encoder only). Set model.head=hf to always get the exportable head.

With no data given it trains on an embedded dataset that needs no download: docstrings of the
installed Python standard library (functions, classes, methods) labelled by the topic of their module,
one of six classes: concurrency, files, network, numbers, text, time (jembed/data/labeled_text.py).
Your own data: --config.data.train=train.jsonl --config.data.eval=test.jsonl (one {"text", "label"}
object per line; a .csv with a text,label header works too), or --config.data.tfds_name=imdb_reviews
(prepared under data.data_dir). Data larger than memory: tokenize it once into shards that each host
streams its share of, then train on them:

  python -m jembed.data.prepare --config configs/finetune_text.py --out /data/labelled-prep \
      --config.data.train='train/*.jsonl' --config.data.eval=test.jsonl --shards 16
  python -m jembed.main --config configs/finetune_text.py --workdir /tmp/ft \
      --config.data.prepared=/data/labelled-prep

At the end it prints a classification report and writes
WORKDIR/classification_report.json and WORKDIR/confusion_matrix.png (LoRA runs also write
WORKDIR/lora_adapter/ and WORKDIR/merged/). Then `jembed.load(WORKDIR).predict(texts)` or
`python -m jembed.predict --model WORKDIR --input texts.txt --output preds.jsonl`.

peft.method: full | linear_probe (encoder frozen) | lora | adapter (Houlsby bottleneck adapters).
With a source, the encoder architecture and tokenizer come from it: leave the model fields at 0/""
to take them from it; a field you set must match the source.
"""
import ml_collections

from jembed.config import base_config
from configs.common import init_config, peft_config


def get_config() -> ml_collections.ConfigDict:
  c = base_config()
  c.task = "classification"
  c.total_steps = 600
  c.batch_size = 32
  c.learning_rate = 0.0         # 0 = auto: from the source and peft.method (see above)
  c.warmup_steps = 60
  c.log_every = 50
  c.eval_every = 200
  c.eval_batches = 0            # the whole held-out split
  c.checkpoint_every = 600

  c.init = init_config()
  # LoRA on every dense kernel: on the embedded data, query/value-only LoRA at rank 8 learned far
  # more slowly (see README's measured figures).
  c.peft = peft_config(targets="all_dense")

  # 0 / "" / False = as in the pretraining run (or BERT-tiny from scratch).
  c.model = ml_collections.ConfigDict(dict(
      size="",                  # tiny | mini | small | medium | base | large
      num_layers=0,
      hidden_size=0,
      num_heads=0,
      mlp_dim=0,
      vocab_size=0,
      max_position=0,
      max_seq_length=0,         # inference length (embed/evaluate/export); 0 = the source's, else max_position
      type_vocab_size=0,
      pre_ln=False,
      dropout=0.1,
      attention_dropout=0.1,
      dtype="auto",             # compute dtype: auto = bfloat16 on TPU/GPU, float32 on CPU; params stay float32
      remat="none",             # none | full | dots: recompute layer activations in the backward pass
      pooling="",               # "" = the source's pooling, else cls | cls ([CLS] token) | mean | max | mean_sqrt_len
      pooler=False,             # BERT's tanh pooler over [CLS] (pooler_output); from scratch only, a source brings its own
      head="",                  # "" = auto | linear | hf (the family's HF head: exports as *ForSequenceClassification)
  ))

  c.data = ml_collections.ConfigDict(dict(
      modality="text",
      train="",                 # .jsonl / .csv with text and label; "" = the embedded dataset
      eval="",                  # the same for the held-out split; "" = a hash-based eval_fraction of train
      eval_fraction=0.2,
      text_key="text",
      label_key="label",
      tfds_name="",
      tfds_split="train",
      tfds_eval_split="test",
      data_dir="",
      tokenizer="",             # "" = the pretraining run's tokenizer.json, else trained on the train texts
      vocab_size=8192,
      seq_len=128,
      on_bad_record="error",    # error | skip (counted and reported) for malformed records or unknown labels
      prepared="",              # a directory from `python -m jembed.data.prepare`: stream examples from disk
      streams=0,                # with prepared: shard streams (0 = one per process); fix it to keep the
                                # same global batches on any number of hosts
  ))
  return c
