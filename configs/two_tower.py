"""Two-tower retrieval (recommendation) trained on user-item interactions.

  python -m jembed.main --config configs/two_tower.py --workdir /tmp/tt

With no data given it trains on interactions derived from CPython's own standard library (no
download; jembed/data/interactions.py): users are the stdlib's modules, items the modules each one
imports (read with `ast`), time the line of the import, so the held-out item is the module a file
imports last. A MovieLens file as it comes (u.data, ratings.dat, ratings.csv):

  python -m jembed.main --config configs/two_tower.py --workdir runs/ml100k \
      --config.data.train=ml-100k/u.data --config.total_steps=3000

Each eval row holds full-catalogue recall@10/100, ndcg@10 and hit_rate@10 (training items excluded)
and the same for a popularity ranking (popularity_*). Afterwards: jembed.load(workdir).recommend(
user_ids, k) and `python -m jembed.recommend --model WORKDIR --export-index DIR`.
"""
import ml_collections

from jembed.config import base_config


def get_config() -> ml_collections.ConfigDict:
  c = base_config()
  c.task = "two_tower"
  c.total_steps = 1000
  c.batch_size = 256            # interactions per step over all devices: each sees 255 in-batch negatives
  c.learning_rate = 0.01
  c.warmup_steps = 30
  c.weight_decay = 0.0
  c.log_every = 100
  c.eval_every = 250
  c.eval_batches = 4
  c.checkpoint_every = 1000

  c.model = ml_collections.ConfigDict(dict(
      dim=32,                   # embedding width of both towers
      mlp_dims=(),              # hidden widths of an MLP on top of each table; () = the table row itself
      normalize=True,           # L2-normalise both towers' outputs (cosine / temperature)
      # How the id tables learn. dense: ordinary parameters of the config's AdamW (every row, every
      # step: a step costs in proportion to the catalogue). adam | adagrad | sgd: only the rows a batch
      # touches change, with per-row optimizer state (jembed/row_optimizer.py; lazy Adam, row-wise
      # Adagrad); same learning_rate schedule, b1, b2, grad_clip; needs weight_decay=0.
      table_updates="dense",
  ))
  c.loss = ml_collections.ConfigDict(dict(
      temperature=0.2,          # logits = user . item / temperature (on the stdlib default 0.2 beat 0.1 and 0.05)
      logq=True,                # subtract log(item's sampling probability) from its logit (Yi et al. 2019)
      remove_accidental_hits=True,  # mask in-batch columns holding the row's own positive item
  ))
  c.data = ml_collections.ConfigDict(dict(
      train="",                 # interactions: .csv/.tsv/.jsonl, u.data, ratings.dat (comma-separated list ok); "" = stdlib imports
      eval="",                  # held-out interactions in the same format; "" = split from train by data.split
      format="auto",            # auto (from the file name) | tsv | dat | csv | jsonl
      user_key="user",          # column / field names (MovieLens ratings.csv's userId, movieId are also recognised)
      item_key="item",
      rating_key="rating",
      timestamp_key="timestamp",
      min_rating=0.0,           # keep interactions rated >= this; 0 = keep all
      split="last",             # last: each user's latest interaction held out | random: eval_fraction of all
      eval_fraction=0.2,
      on_bad_record="error",    # error | skip (counted and reported)
      item_features="",         # item metadata for a feature tower: not implemented yet (refused if set)
  ))
  return c
