"""A jembed text model as an MTEB 2.x encoder, so `mteb.evaluate` scores it like any other model.

    import mteb
    from jembed.mteb import JembedEncoder
    model = JembedEncoder("path/to/all-MiniLM-L6-v2")       # or a jembed workdir / export / TextEmbedder
    results = mteb.evaluate(model, mteb.get_tasks(tasks=["STSBenchmark"]))

mteb is imported only here, and only when an encoder is built: `import jembed` never pulls it in.
The encoder carries its own `ModelMeta` (name, revision, width, cosine similarity), so mteb accepts
it without looking anything up on the Hugging Face Hub.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from jembed.errors import UserError


def _mteb():
  try:
    import mteb
  except ImportError:
    raise UserError("jembed.mteb needs the mteb package; install it with `pip install 'jembed[bench]'` "
                    "or `pip install mteb`") from None
  return mteb


def _n_parameters(params) -> int | None:
  import jax
  try:
    return int(sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params)))
  except Exception:  # an exotic parameter tree: the count is informational only
    return None


class JembedEncoder:
  """mteb's EncoderProtocol over `jembed.load(path).embed`.

  path_or_embedder: a model directory (anything `jembed.load` takes) or a loaded TextEmbedder.
  batch_size: texts per forward; None takes the batch size mteb passes (its `encode_kwargs`, 32 by
    default), a number overrides it.
  dtype, dim: as in TextEmbedder.embed (compute dtype; Matryoshka truncation). `dim` is also the
    `embed_dim` the model metadata declares.
  prompts: optional prefixes put before each text, keyed as mteb keys model prompts: a task name, a
    task type, "query" / "document", or "<task name or type>-<query|document>" (most specific wins).
  name, revision: how mteb names the model in its results and cache ("organization/model").
  """

  def __init__(self, path_or_embedder: Any, *, batch_size: int | None = None, dtype: str = "float32",
               dim: int | None = None, prompts: Mapping[str, str] | None = None,
               name: str | None = None, revision: str = "local"):
    _mteb()
    from mteb.models.model_meta import ModelMeta, ScoringFunction
    if isinstance(path_or_embedder, (str, os.PathLike)):
      import jembed
      embedder = jembed.load(os.fspath(path_or_embedder))
      source = os.fspath(path_or_embedder)
    else:
      embedder = path_or_embedder
      source = getattr(embedder, "source", "") or ""
    if getattr(embedder, "modality", None) != "text" or not callable(getattr(embedder, "embed", None)):
      raise UserError(f"JembedEncoder: {source or type(embedder).__name__} is not a text model; MTEB's "
                      "text tasks need a text model (a Hugging Face BERT directory or a jembed text workdir)")
    from jembed.embed import check_options
    check_options(batch_size=32 if batch_size is None else batch_size, dtype=dtype, dim=dim, width=embedder.dim)
    if name is not None and "/" not in name:
      raise UserError(f"JembedEncoder: name={name!r} must look like 'organization/model', e.g. 'jembed/{name}'")
    self.embedder = embedder
    self.batch_size = batch_size
    self.dtype = dtype
    self.dim = dim
    self.model_prompts = dict(prompts) if prompts else None
    base = os.path.basename(os.path.normpath(source)) if source else "model"
    self.mteb_model_meta = ModelMeta.create_empty(overwrites=dict(
        name=name or f"jembed/{base}",
        revision=revision,
        embed_dim=dim or embedder.dim,
        max_tokens=getattr(embedder, "max_seq_length", None),
        n_parameters=_n_parameters(getattr(embedder, "_params", None)),
        similarity_fn_name=ScoringFunction.COSINE,
        framework=["JAX"],
        modalities=["text"],
        use_instructions=bool(prompts),
        open_weights=True,
        experiment_kwargs={"dtype": dtype} if dtype != "float32" else None,
    ))

  def _prompt(self, task_metadata, prompt_type) -> str:
    from mteb.models.abs_encoder import get_prompt
    return get_prompt(self.model_prompts, task_metadata, prompt_type) or ""

  def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None,
             **kwargs) -> np.ndarray:
    """(N, D) float32 embeddings of every text in mteb's DataLoader of batches, in its order.

    All batches are gathered first and embedded in one call, so jembed's length sorting and shape
    buckets work across the whole set rather than inside each of mteb's batches."""
    texts: list[str] = []
    for batch in inputs:
      if "text" not in batch:
        raise UserError(f"JembedEncoder: task {task_metadata.name} gives {sorted(batch)} but no text; "
                        "jembed's MTEB encoder runs text tasks only")
      texts.extend(batch["text"])
    prefix = self._prompt(task_metadata, prompt_type)
    if prefix:
      texts = [prefix + t for t in texts]
    batch_size = self.batch_size or int(kwargs.get("batch_size") or 32)
    if not texts:
      return np.zeros((0, self.dim or self.embedder.dim), np.float32)
    return self.embedder.embed(texts, batch_size=batch_size, dtype=self.dtype, dim=self.dim,
                               progress=bool(kwargs.get("show_progress_bar", False)))

  def similarity(self, embeddings1, embeddings2):
    """Cosine similarity matrix (rows of embeddings1 against rows of embeddings2), as mteb computes it."""
    from mteb.similarity_functions import cos_sim
    return cos_sim(embeddings1, embeddings2)

  def similarity_pairwise(self, embeddings1, embeddings2):
    """Cosine similarity of each row of embeddings1 with the same row of embeddings2."""
    from mteb.similarity_functions import pairwise_cos_sim
    return pairwise_cos_sim(embeddings1, embeddings2)
