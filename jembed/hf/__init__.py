"""Hugging Face / sentence-transformers weights in and out of jembed, without torch.

    model = hf.load_dir("all-MiniLM-L6-v2/")          # HFModel: config, params, tokenizer, pooling
    encoder, model = hf.encoder_from_dir("all-MiniLM-L6-v2/")
    emb = hf.embed(encoder, model, ["a sentence"])     # = SentenceTransformer(...).encode(...)
    ids, mask = model.encode(["a sentence"])           # token ids as sentence-transformers makes them
    hf.save_dir("out/", encoder_config=..., params=..., tokenizer=..., pooling="mean",
                normalize=True, max_seq_length=256)    # loads in transformers and sentence-transformers
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jembed.hf.io import HFModel, encoder_from_dir, load_dir, save_dir, save_model
from jembed.hf.tokenizer import encode
from jembed.models.heads import pool

__all__ = ["HFModel", "load_dir", "save_dir", "save_model", "encoder_from_dir", "encode", "embed", "hidden_states"]


@nnx.jit
def hidden_states(encoder, ids, mask):
  """The encoder's last hidden states (B, T, D) for int ids and a 0/1 mask, compiled once per shape."""
  return encoder(ids, mask.astype(bool))


def embed(encoder, model: HFModel, texts) -> np.ndarray:
  """Sentence embeddings (B, D) float32 numpy of `texts` as one batch, as sentence-transformers'
  encode computes them (tokenize, encoder, pooling, optional L2 normalisation)."""
  ids, mask = model.encode(texts)
  mask = jnp.asarray(mask)
  out = pool(hidden_states(encoder, jnp.asarray(ids), mask), mask, model.pooling, normalize=model.normalize)
  return np.asarray(out, np.float32)
