"""Hugging Face / sentence-transformers weights in and out of jembed, without torch.

    model = hf.load_dir("all-MiniLM-L6-v2/")          # HFModel: config, params, tokenizer, pooling
    encoder, model = hf.encoder_from_dir("all-MiniLM-L6-v2/")
    ids, mask = model.encode(["a sentence"])           # as sentence-transformers tokenizes
    emb = heads.pool(encoder(ids, mask.astype(bool)), mask, model.pooling, normalize=model.normalize)
    hf.save_dir("out/", encoder_config=..., params=..., tokenizer=..., pooling="mean",
                normalize=True, max_seq_length=256)    # loads in transformers and sentence-transformers
"""
from __future__ import annotations

from jembed.hf.io import HFModel, encoder_from_dir, load_dir, save_dir, save_model
from jembed.hf.tokenizer import encode

__all__ = ["HFModel", "load_dir", "save_dir", "save_model", "encoder_from_dir", "encode", "embed"]


def embed(encoder, model: HFModel, texts):
  """Sentence embeddings (B, D) numpy, as sentence-transformers' encode gives them (one batch)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jembed.models.heads import pool  # pylint: disable=import-outside-toplevel
  ids, mask = model.encode(texts)
  hidden = encoder(jnp.asarray(ids), jnp.asarray(mask, bool))
  return np.asarray(pool(hidden, jnp.asarray(mask), model.pooling, normalize=model.normalize))
