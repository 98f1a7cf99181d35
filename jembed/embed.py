"""Embeddings (and a classifier's predictions) out: `jembed.load(path).embed(inputs)` and
`python -m jembed.embed`.

    python -m jembed.embed --model path/to/all-MiniLM-L6-v2 --input docs.txt --output docs.npy
    python -m jembed.embed --model runs/ct --input pairs.jsonl --field anchor --output a.parquet \
        --dtype bfloat16 --dim 128 --projector runs/ct/projector
    python -m jembed.embed --model runs/ft_img --input photos/ --output photos.npy

A model is a jembed workdir (its latest checkpoint, LoRA merged), a jembed export, or a Hugging Face
/ sentence-transformers directory (read without torch). Texts are sorted by length and cut into
batches whose padded length is one of a few buckets, so a whole file needs only a handful of
compiles; batches run data-parallel over the local devices; rows come back in input order, pooled
and normalised as the model declares. Images of any size are resized / cropped as the model declares
(its model.json `preprocess`) and normalised on device. Files stream: they are read, embedded and
written a chunk at a time (.npy memory-mapped, .jsonl, or .parquet), so millions of inputs run in
bounded memory. The sentence-transformers habits work too: `encode`, `normalize_embeddings=`,
`prompt=` / `prompt_name=`, `similarity(a, b)`, a settable `max_seq_length`.

A fine-tuned classifier also predicts (jembed/classifier.py): `classes`, `logits`, `predict_proba`,
`predict(inputs, k=...)`; `python -m jembed.predict` is its command line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jembed import fs
from jembed import inputs as inputs_lib
from jembed.classifier import Classifies
from jembed.errors import UserError, run_cli
from jembed.inputs import read_records  # noqa: F401  (jembed.embed.read_records, as before)

DTYPES = ("float32", "bfloat16")
# Padded lengths a batch may have (then the model's maximum): few shapes, few compiles.
BUCKETS = (16, 32, 64, 128, 256, 512)
CHUNK = 16384            # texts read, sorted and embedded together when streaming a file
IMAGE_CHUNK = 1024       # images decoded and embedded together when streaming a folder
OUTPUT_FORMATS = (".npy", ".jsonl", ".parquet")
SIMILARITIES = ("cosine", "dot", "euclidean", "manhattan")


class _Embedder(Classifies):
  """What text and image models share: sentence-transformers' names, similarity, prediction."""

  similarity_fn_name = "cosine"
  normalize = False

  def encode(self, inputs, *, batch_size: int = 32, show_progress_bar: bool | None = None,
             truncate_dim: int | None = None, **options) -> np.ndarray:
    """sentence-transformers' name for `embed` (its `show_progress_bar`, `truncate_dim` map to
    `progress`, `dim`; every other option is embed's)."""
    if show_progress_bar is not None:
      options["progress"] = show_progress_bar
    if truncate_dim is not None:
      options["dim"] = truncate_dim
    return self.embed(inputs, batch_size=batch_size, **options)

  def similarity(self, a, b) -> np.ndarray:
    """(N, M) float32 similarity of embeddings `a` (N, D) and `b` (M, D) by the model's
    `similarity_fn_name` (sentence-transformers' config; cosine unless it says dot, euclidean or
    manhattan; the distances come negated, so larger is more similar, as there)."""
    a = np.atleast_2d(np.asarray(a, np.float32))
    b = np.atleast_2d(np.asarray(b, np.float32))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
      raise UserError(f"similarity takes two sets of vectors of one width; got shapes {a.shape} "
                      f"and {b.shape}")
    fn = self.similarity_fn_name
    if fn == "cosine":
      return unit(a) @ unit(b).T
    if fn == "dot":
      return a @ b.T
    if fn == "euclidean":
      return -np.sqrt(np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T, 0))
    return -np.abs(a[:, None, :] - b[None, :, :]).sum(-1)

  def _finish(self, vectors: np.ndarray, dim: int | None, normalize: bool | None) -> np.ndarray:
    """Pooled vectors -> what embed returns: normalised when asked (default: as the model
    declares), cut to `dim` (Matryoshka) and normalised again after the cut."""
    norm = self.normalize if normalize is None else bool(normalize)
    if dim and dim < vectors.shape[1]:
      vectors = vectors[:, :dim]
    return unit(vectors) if norm else vectors


def unit(vectors: np.ndarray) -> np.ndarray:
  return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


class TextEmbedder(_Embedder):
  """A Transformer encoder with its tokenizer, pooling and normalisation, ready to embed texts (and,
  with a classifier head, to predict)."""

  modality = "text"

  def __init__(self, encoder_config, params: dict, tokenizer, special_ids: dict[str, int], *,
               pooling: str, normalize: bool, max_seq_length: int, lowercase: bool = False,
               source: str = "", head: nnx.Module | None = None,
               class_names: Sequence[str] | None = None, prompts: dict[str, str] | None = None,
               default_prompt_name: str | None = None, similarity_fn_name: str = "cosine",
               matryoshka_dims: Sequence[int] | bool = (), head_pooling: str | None = None):
    from jembed.models.transformer import TransformerEncoder
    self.config = encoder_config
    # What the classifier head reads (a Hugging Face classifier's [CLS], say, while its
    # sentence-transformers embedding is the mean); None = `pooling`.
    self.head_pooling = head_pooling or pooling
    self.tokenizer = tokenizer
    self.ids = dict(special_ids)
    self.pooling = pooling
    self.normalize = bool(normalize)
    self.lowercase = bool(lowercase)
    self._plain = None  # the tokenizer without padding/truncation, made on first use
    self.max_seq_length = max_seq_length
    self.source = source
    self.dim = encoder_config.hidden_size
    # The widths `dimensions` may ask for (the model was trained for them): a list, True for any
    # width (config.json's is_matryoshka), or () for none. `embed(dim=)` itself does not check.
    self.matryoshka_dims = matryoshka_dims if matryoshka_dims is True else tuple(matryoshka_dims)
    self.prompts = dict(prompts or {})
    if default_prompt_name is not None and default_prompt_name not in self.prompts:
      raise UserError(f"{source}: default_prompt_name '{default_prompt_name}' is not one of its "
                      f"prompts {sorted(self.prompts)}")
    self.default_prompt_name = default_prompt_name
    if similarity_fn_name not in SIMILARITIES:
      raise UserError(f"{source}: similarity function '{similarity_fn_name}' is not supported; "
                      f"jembed has {', '.join(SIMILARITIES)}")
    self.similarity_fn_name = similarity_fn_name
    self.class_names = list(class_names) if class_names is not None else None
    self._head = nnx.split(head) if head is not None else None
    self._params = params
    self._fns: dict[Any, Any] = {}
    self._encoder_cls = TransformerEncoder
    devices = jax.local_devices()
    self.mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                              devices=devices)

  @property
  def max_seq_length(self) -> int:
    """Texts are cut to this many tokens ([CLS] and [SEP] included); settable, up to the model's
    position table (as sentence-transformers' `model.max_seq_length = n`)."""
    return self._max_seq_length

  @max_seq_length.setter
  def max_seq_length(self, value: int) -> None:
    limit = self.config.max_length  # the position table (less RoBERTa's padding offset)
    if not isinstance(value, (int, np.integer)) or not 2 <= value:
      raise UserError(f"max_seq_length={value!r} must be an integer >= 2")
    self._max_seq_length = min(int(value), limit)

  def set_params(self, params: dict) -> None:
    """New weights for the same architecture: the compiled functions are kept."""
    self._params = params
    self._fns = {k: (fn, None, data) for k, (fn, _, data) in self._fns.items()}

  # -- the compiled forward, one per (dtype, output) (and one compile per padded shape) --
  def _forward(self, dtype: str, what: str = "pooled"):
    key = (dtype, what)
    if key in self._fns and self._fns[key][1] is not None:
      return self._fns[key]
    import dataclasses
    from jembed.models.heads import pool
    from jembed.modelspec import fill_like
    cfg = dataclasses.replace(self.config, dtype=jnp.dtype(dtype), dropout=0.0, attention_dropout=0.0,
                              remat="none")
    abstract = nnx.eval_shape(lambda: self._encoder_cls(cfg, rngs=nnx.Rngs(params=0, dropout=0)))
    abstract.eval()
    graphdef, abs_params = nnx.split(abstract, nnx.Param)
    state = fill_like(abs_params, self._params)
    rep = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    # Parameters in the compute dtype, once: the bandwidth of every matmul halves in bfloat16.
    # LayerNorm still normalises in float32 (layers.LayerNorm). The head stays float32.
    params = jax.device_put(jax.tree.map(lambda x: jnp.asarray(x, jnp.dtype(dtype)), state), rep)
    if what == "logits":
      head_def, head_state = self._head
      params = (params, jax.device_put(head_state, rep))
    data = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data"))
    pooling = self.head_pooling if what == "logits" else self.pooling

    if key in self._fns:  # compiled before; only the weights changed
      fn, _, _ = self._fns[key]
      self._fns[key] = (fn, params, data)
      return self._fns[key]

    @jax.jit
    def fn(params, tokens, mask):
      encoder_params = params[0] if what == "logits" else params
      model = nnx.merge(graphdef, encoder_params)
      out = pool(model(tokens, mask).astype(jnp.float32), mask, pooling)
      if what == "logits":
        out = nnx.merge(head_def, params[1])(out).astype(jnp.float32)
      return out

    self._fns[key] = (fn, params, data)
    return self._fns[key]

  def _prompted(self, texts: list[str], prompt: str | None, prompt_name: str | None) -> list[str]:
    """Texts with the prompt put before each (sentence-transformers' `prompt` / `prompt_name`; the
    model's default prompt when neither is given)."""
    if prompt is not None and prompt_name is not None:
      raise UserError("give prompt= or prompt_name=, not both")
    if prompt is None:
      name = prompt_name if prompt_name is not None else self.default_prompt_name
      if name is not None:
        if name not in self.prompts:
          have = ", ".join(sorted(self.prompts)) or "none"
          raise UserError(f"prompt_name '{name}' is not one of the model's prompts ({have}); pass "
                          "prompt='...' for your own")
        prompt = self.prompts[name]
    return [prompt + t for t in texts] if prompt else texts

  def tokenize(self, texts: Sequence[str], max_len: int | None = None) -> list[np.ndarray]:
    """[CLS] ... [SEP] ids of each text, stripped (and lower-cased when the model says so) first, as
    sentence-transformers does; cut at `max_len` ids (default the model's maximum; the server asks
    for more to tell a too-long input from one that fits)."""
    from jembed.data import encode
    if self._plain is None:
      self._plain = encode.plain(self.tokenizer)  # copied once, not on every call (small requests)
    texts = [t.strip().lower() if self.lowercase else t.strip() for t in texts]
    return encode.token_ids(self._plain, texts, max_len or self.max_seq_length, self.ids)

  def embed_token_rows(self, rows: Sequence[np.ndarray], *, batch_size: int = 32,
                       dtype: str = "float32") -> np.ndarray:
    """(N, D) float32 embeddings of token-id rows ([CLS] ... [SEP], as `tokenize` makes them), in
    input order: the server's batcher forms its own batches and runs them through this."""
    check_options(batch_size=batch_size, dtype=dtype, dim=None, width=self.dim)
    return self._embed_rows(list(rows), batch_size, dtype, None, Progress(len(rows), False))

  def embed(self, texts: Sequence[str] | str, *, batch_size: int = 32, dtype: str = "float32",
            dim: int | None = None, progress: bool = False, normalize_embeddings: bool | None = None,
            prompt: str | None = None, prompt_name: str | None = None) -> np.ndarray:
    """(N, D) float32 embeddings of `texts`, one row per text, in input order. `normalize_embeddings`
    None = as the model declares; `prompt` (or the model's `prompt_name`) goes before every text."""
    texts = self._prompted(inputs_lib.as_texts(texts), prompt, prompt_name)
    check_options(batch_size=batch_size, dtype=dtype, dim=dim, width=self.dim)
    return self._run(texts, batch_size, dtype, progress,
                     lambda v: self._finish(v, dim, normalize_embeddings), dim or self.dim, "pooled")

  def _logits(self, texts, *, batch_size: int = 32, dtype: str = "float32",
              progress: bool = False) -> np.ndarray:
    texts = inputs_lib.as_texts(texts)
    check_options(batch_size=batch_size, dtype=dtype, dim=None, width=self.dim)
    return self._run(texts, batch_size, dtype, progress, lambda v: v, len(self.class_names), "logits")

  def _run(self, texts: list[str], batch_size, dtype, progress, finish, width, what) -> np.ndarray:
    out = np.empty((len(texts), width), np.float32)
    bar = Progress(len(texts), progress)
    for lo in range(0, len(texts), CHUNK):
      chunk = texts[lo:lo + CHUNK]
      out[lo:lo + len(chunk)] = finish(self._rows(self.tokenize(chunk), batch_size, dtype, bar, what))
    bar.close()
    return out

  def _rows(self, rows: list[np.ndarray], batch_size: int, dtype: str, bar: "Progress",
            what: str = "pooled") -> np.ndarray:
    """Device outputs (pooled vectors or logits) of tokenised rows, in row order."""
    fn, params, data = self._forward(dtype, what)
    n_dev = self.mesh.size
    batch = -(-batch_size // n_dev) * n_dev  # a multiple of the devices: every device gets rows
    order = np.argsort([-len(r) for r in rows], kind="stable")  # longest first, ties in input order
    out = None
    from jembed.data.encode import pad_rows
    for lo in range(0, len(rows), batch):
      idx = order[lo:lo + batch]
      length = bucket(max(len(rows[i]) for i in idx), self.max_seq_length)
      tokens = pad_rows([rows[i] for i in idx] + [rows[idx[0]][:0]] * (batch - len(idx)), length,
                        self.ids["pad"])
      mask = tokens != self.ids["pad"]
      mask[:, 0] = True  # padding rows attend to something, so no NaN appears (they are dropped)
      vec = np.asarray(fn(params, jax.device_put(tokens, data), jax.device_put(mask, data)))
      if out is None:
        out = np.empty((len(rows), vec.shape[1]), np.float32)
      out[idx] = vec[:len(idx)]
      bar.update(len(idx))
    return out if out is not None else np.empty((0, self.dim), np.float32)

  def _embed_rows(self, rows, batch_size, dtype, dim, bar, normalize=None) -> np.ndarray:
    """Embeddings of tokenised rows (what the command line streams through)."""
    return self._finish(self._rows(rows, batch_size, dtype, bar), dim, normalize)


class ImageEmbedder(_Embedder):
  """A vision backbone (ResNet / ViT), with its classifier head when it has one: pooled features
  and predictions of images of any size, preprocessed as the model declares."""

  modality = "image"

  def __init__(self, backbone: nnx.Module, image_shape, *, normalize: bool = False, source: str = "",
               head: nnx.Module | None = None, class_names: Sequence[str] | None = None,
               preprocess=None, backbone_spec: dict | None = None):
    """`preprocess`: an image_transforms.Preprocess or its dict (model.json's "preprocess"); None =
    squash to the model's size and scale to [0, 1] (what models trained before it existed expect).
    `backbone_spec`: the backbone's description (model.json's "backbone"), which bfloat16 rebuilds
    the backbone from."""
    from jembed.data import image_transforms as T
    self.image_shape = tuple(int(s) for s in image_shape)
    self.normalize = bool(normalize)
    self.source = source
    self.dim = int(backbone.out_features)
    if preprocess is None:
      preprocess = T.plain(self.image_shape[0], self.image_shape[2])
    elif isinstance(preprocess, dict):
      preprocess = T.Preprocess.from_dict(preprocess)
    self.preprocess = preprocess
    self.class_names = list(class_names) if class_names is not None else None
    self._backbone = nnx.split(backbone)
    self._head = nnx.split(head) if head is not None else None
    self._backbone_spec = backbone_spec
    self._fns: dict[Any, Any] = {}
    devices = jax.local_devices()
    self.mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                              devices=devices)

  @property
  def backbone(self) -> nnx.Module:
    return nnx.merge(*self._backbone)

  def _forward(self, dtype: str, what: str, preprocessed: bool):
    """The jitted (state, images) -> pooled features or logits: uint8 images are normalised on device
    with the model's mean / std; float images (preprocess=False) go to the backbone as they are."""
    key = (dtype, what, preprocessed)
    if key in self._fns:
      return self._fns[key]
    from jembed.data import image_transforms as T
    from jembed.tasks.vision import backbone_features
    graphdef, state = self._backbone
    if dtype != "float32":
      graphdef = self._graphdef_in(dtype)
    head = self._head if what == "logits" else None
    pp = self.preprocess

    @jax.jit
    def fn(states, images):
      x = T.normalize(images, pp) if preprocessed else images.astype(jnp.float32)
      out = backbone_features(nnx.merge(graphdef, states[0]), x)
      if head is not None:
        out = nnx.merge(head[0], states[1])(out).astype(jnp.float32)
      return out

    # Weights replicated once; batches split over the local devices (data-parallel, as for texts).
    rep = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    states = jax.device_put((state, head[1] if head is not None else None), rep)
    self._fns[key] = (fn, states)
    return self._fns[key]

  def _graphdef_in(self, dtype: str):
    """The backbone's graph with its convolutions / matmuls computing in `dtype` (parameters and
    BatchNorm statistics stay float32)."""
    if self._backbone_spec is None:
      raise UserError(f"{self.source}: this image model carries no backbone description, so it "
                      "runs in float32 only; pass dtype='float32'")
    from jembed.tasks import vision
    spec = json.loads(json.dumps(self._backbone_spec))
    spec[spec["backbone"]]["dtype"] = dtype
    abstract = nnx.eval_shape(
        lambda: vision.build_backbone(spec, self.image_shape, nnx.Rngs(params=0, dropout=0))[0])
    abstract.eval()
    return nnx.split(abstract)[0]

  def _batches(self, images, preprocess: bool) -> tuple[int, Iterator[np.ndarray]]:
    """(count, batches of model-ready arrays) of any accepted input, decoded a chunk at a time."""
    if not preprocess:
      x = np.asarray(images) if not isinstance(images, np.ndarray) else images
      if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape or not np.issubdtype(x.dtype, np.floating):
        raise UserError(f"with preprocess=False give float (N, H, W, C) arrays already normalised "
                        f"to the model's input {self.image_shape}; got {x.dtype} {x.shape}")
      return len(x), (x[lo:lo + IMAGE_CHUNK] for lo in range(0, len(x), IMAGE_CHUNK))
    items = inputs_lib.as_items(images)
    return len(items), (inputs_lib.eval_batch(c, self.preprocess)
                        for c in inputs_lib.chunks(items, IMAGE_CHUNK))

  def _run(self, images, *, batch_size, dtype, progress, preprocess, what, finish, width):
    check_options(batch_size=batch_size, dtype=dtype, dim=None, width=self.dim)
    n, batches = self._batches(images, preprocess)
    out = np.empty((n, width), np.float32)
    bar = Progress(n, progress)
    lo = 0
    for chunk in batches:
      out[lo:lo + len(chunk)] = finish(self.run_array(chunk, batch_size=batch_size, dtype=dtype,
                                                      what=what, preprocessed=preprocess, bar=bar))
      lo += len(chunk)
    bar.close()
    return out

  def run_array(self, images: np.ndarray, *, batch_size: int, dtype: str = "float32",
                what: str = "pooled", preprocessed: bool = True, bar=None) -> np.ndarray:
    """Device outputs of model-ready images (uint8 at the model's size, or normalised floats), in
    batches padded to `batch_size` so one compile serves every batch."""
    fn, states = self._forward(dtype, what, preprocessed)
    n_dev = self.mesh.size
    batch = -(-batch_size // n_dev) * n_dev  # a multiple of the devices: every device gets images
    data = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data"))
    outs = []
    for lo in range(0, len(images), batch):
      chunk = images[lo:lo + batch]
      pad = np.zeros((batch - len(chunk),) + chunk.shape[1:], chunk.dtype)
      x = jax.device_put(np.concatenate([chunk, pad]), data)
      outs.append(np.asarray(fn(states, x))[:len(chunk)])
      if bar is not None:
        bar.update(len(chunk))
    return np.concatenate(outs) if outs else np.empty((0, self.dim), np.float32)

  def embed(self, images, *, batch_size: int = 64, dtype: str = "float32", dim: int | None = None,
            progress: bool = False, preprocess: bool = True,
            normalize_embeddings: bool | None = None) -> np.ndarray:
    """(N, D) float32 pooled features, one row per image in input order. `images`: uint8 images of
    any size (a list of (H, W[, C]) arrays, an (N, H, W, C) array, or file paths), preprocessed as
    the model declares; with preprocess=False, float (N, H, W, C) arrays already normalised."""
    check_options(batch_size=batch_size, dtype=dtype, dim=dim, width=self.dim)
    return self._run(images, batch_size=batch_size, dtype=dtype, progress=progress,
                     preprocess=preprocess, what="pooled", width=dim or self.dim,
                     finish=lambda v: self._finish(v, dim, normalize_embeddings))

  def _logits(self, images, *, batch_size: int = 64, dtype: str = "float32", progress: bool = False,
              preprocess: bool = True) -> np.ndarray:
    return self._run(images, batch_size=batch_size, dtype=dtype, progress=progress,
                     preprocess=preprocess, what="logits", width=len(self.class_names),
                     finish=lambda v: v)


def bucket(length: int, max_len: int) -> int:
  for b in BUCKETS:
    if length <= b and b < max_len:
      return b
  return max_len


def truncate(vectors: np.ndarray, dim: int | None, normalize: bool) -> np.ndarray:
  """The first `dim` dimensions (Matryoshka-style), re-normalised when the model normalises."""
  if not dim or dim >= vectors.shape[1]:
    return vectors
  out = vectors[:, :dim]
  return unit(out) if normalize else out


def check_options(*, batch_size: int, dtype: str, dim: int | None, width: int) -> None:
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise UserError(f"batch size {batch_size} must be a positive integer")
  if dtype not in DTYPES:
    raise UserError(f"dtype '{dtype}' is not supported; use one of {', '.join(DTYPES)}")
  if dim is not None and not 0 < dim <= width:
    raise UserError(f"dim={dim} must be in 1..{width} (the model's embedding width)")


class Progress:
  """A progress bar on stderr: tqdm.auto (a widget in Jupyter, text on a terminal) when installed,
  else a one-line counter; shown when asked for and stderr is a terminal or a notebook."""

  def __init__(self, total: int, enabled: bool, unit: str = "inputs"):
    self.total, self.done, self.t0 = total, 0, time.perf_counter()
    in_notebook = "ipykernel" in sys.modules
    self.enabled = bool(enabled) and total > 0 and (in_notebook or sys.stderr.isatty())
    self._bar = None
    if self.enabled:
      try:
        from tqdm.auto import tqdm
        self._bar = tqdm(total=total, unit=unit, desc="jembed", file=sys.stderr)
      except ImportError:
        self._bar = None

  def update(self, n: int) -> None:
    self.done += n
    if self._bar is not None:
      self._bar.update(n)
    elif self.enabled:
      rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
      sys.stderr.write(f"\rembedded {self.done}/{self.total} ({rate:.0f}/s)")
      sys.stderr.flush()

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    elif self.enabled:
      sys.stderr.write("\n")


_Progress = Progress  # the name before it was public


# ---------------------------------------------------------------------------------------------------
# Loading a model
# ---------------------------------------------------------------------------------------------------
def load(path: str, *, max_seq_length: int | None = None, step: int | None = None):
  """A TextEmbedder or ImageEmbedder for a jembed workdir, a jembed export or a Hugging Face /
  sentence-transformers directory, or a pretrained image model (jembed.interop: a torchvision / timm
  .pth or .safetensors, a HF / timm ResNet or ViT directory, a big_vision .npz); a classification
  model comes with its head (`predict`)."""
  from jembed import interop, modelspec
  if interop.is_image_source(path):
    return _load_image_source(path)
  if not fs.isdir(path):
    raise UserError(f"model '{path}' does not exist; give a jembed workdir or a Hugging Face "
                    "model directory")
  if modelspec.read(path) is not None:
    return _load_workdir(path, max_seq_length, step)
  if fs.exists(fs.join(path, "config.json")) and not fs.isdir(fs.join(path, "checkpoints")):
    from jembed import hf
    from jembed.models.transformer import TransformerConfig
    m = hf.load_dir(path)
    cfg = TransformerConfig.from_json(m.encoder_config)
    return TextEmbedder(cfg, m.params, m.tokenizer,
                        m.special_ids, pooling=m.pooling, normalize=m.normalize,
                        max_seq_length=max_seq_length or m.max_seq_length, lowercase=m.lowercase,
                        source=path, **st_options(path),
                        matryoshka_dims=matryoshka_dims(fs.join(path, "config.json"),
                                                        m.encoder_config["hidden_size"]),
                        head=_hf_classifier_head(cfg, m) if m.classifier is not None else None,
                        class_names=m.class_names, head_pooling=m.classifier_pooling)
  raise UserError(f"'{path}' is not a model directory: it has neither a jembed model.json nor a "
                  "Hugging Face config.json")


def _hf_classifier_head(cfg, m) -> nnx.Module:
  """A *ForSequenceClassification directory's head (after BERT's pooler) holding its weights."""
  import dataclasses
  from jembed.models.heads import PoolerClassifier, SequenceClassifierHead
  from jembed.models.layers import Dense
  with nnx.use_eager_sharding(False):  # built whole on the host; the embedder places it
    rngs = nnx.Rngs(0)  # dropout 0: the values below replace every random one
    head = SequenceClassifierHead.for_encoder(dataclasses.replace(cfg, dropout=0.0),
                                              len(m.class_names), rngs=rngs)
    nnx.update(head, _filled(head, m.classifier))
    if cfg.family != "bert":
      return head
    pooler = Dense(cfg.hidden_size, cfg.hidden_size, ("embed", "mlp"), rngs=rngs)
    nnx.update(pooler, _filled(pooler, m.params["pooler"]))
  return PoolerClassifier(pooler, head)


def _filled(module, values: dict):
  from jembed.hf.io import jax_tree
  state = nnx.state(module, nnx.Param)
  nnx.replace_by_pure_dict(state, jax_tree(values))
  return state


def _load_image_source(path: str):
  """An ImageEmbedder over a pretrained image model (read without torch), with its classifier head
  and label names when the source has them."""
  from jembed import interop
  imported = interop.open_image_model(path)
  model = imported.build()
  spec = imported.spec
  return ImageEmbedder(model.backbone, spec["image_shape"], source=imported.description,
                       head=model.head, class_names=spec.get("class_names"),
                       preprocess=spec.get("preprocess"), backbone_spec=spec.get("backbone"))


def matryoshka_dims(config_path: str, width: int) -> tuple[int, ...] | bool:
  """The Matryoshka widths a Hugging Face config.json declares, as vLLM reads them:
  `matryoshka_dimensions` (a list), or `is_matryoshka: true` (any width); () when it declares none."""
  cfg = json.loads(fs.read_text(config_path))  # hf.load_dir has read and checked it already
  dims = cfg.get("matryoshka_dimensions")
  if dims is not None:
    if not (isinstance(dims, list) and dims and all(isinstance(d, int) and 0 < d <= width for d in dims)):
      raise UserError(f"{config_path}: matryoshka_dimensions must be a list of widths in 1..{width}; "
                      f"it is {dims!r}")
    return tuple(sorted(set(dims)))
  return True if cfg.get("is_matryoshka") is True else ()


def st_options(path: str) -> dict[str, Any]:
  """prompts, default_prompt_name and similarity_fn_name from a sentence-transformers directory's
  config_sentence_transformers.json (none when it has none)."""
  cfg_path = os.path.join(path, "config_sentence_transformers.json")
  if not os.path.isfile(cfg_path):
    return {}
  try:
    cfg = json.loads(fs.read_text(cfg_path))
  except (OSError, ValueError) as e:
    raise UserError(f"{cfg_path} cannot be read ({type(e).__name__}); re-save the model") from None
  prompts = cfg.get("prompts") or {}
  if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
    raise UserError(f"{cfg_path}: 'prompts' must map names to strings; re-save the model")
  similarity = cfg.get("similarity_fn_name") or "cosine"
  return dict(prompts=prompts, default_prompt_name=cfg.get("default_prompt_name"),
              similarity_fn_name={"dot_product": "dot"}.get(similarity, similarity))


def _load_workdir(path: str, max_seq_length: int | None, step: int | None):
  from jembed import modelspec
  from jembed.tasks import task_class
  spec, model, step = modelspec.load_model(path, step)
  if spec["task"] == "two_tower":   # a recommender: recommend(users, k), similar_items(items, k)
    from jembed.recommend import Recommender
    return Recommender.from_workdir(path, spec, model, step)
  backbone = getattr(model, task_class(spec["task"]).backbone_of(spec))
  desc = f"{path} step {step}"
  # Only a classification run's `head` maps features to its `class_names` (a rotation run's head
  # predicts rotations, a SimCLR run's projects).
  classifier = spec["task"] == "classification" and "class_names" in spec
  # A text classifier's head may start from the encoder's pooler (BERT's Hugging Face head).
  head = (model.classifier_head() if hasattr(model, "classifier_head") else model.head) if classifier else None
  class_names = spec["class_names"] if classifier else None
  if "encoder" in spec:
    import tokenizers
    from jembed.models.transformer import TransformerConfig
    tokenizer = tokenizers.Tokenizer.from_str(fs.read_text(fs.join(path, spec["tokenizer"])))
    params = nnx.to_pure_dict(nnx.state(backbone, nnx.Param))
    return TextEmbedder(TransformerConfig.from_json(spec["encoder"]), params, tokenizer,
                        spec["special_ids"], pooling=spec.get("pooling", "mean"),
                        normalize=spec.get("normalize", False),
                        max_seq_length=max_seq_length or spec.get("max_seq_length") or spec["seq_len"],
                        source=desc, head=head, class_names=class_names)
  return ImageEmbedder(backbone, spec["image_shape"], normalize=spec.get("normalize", False),
                       source=desc, head=head, class_names=class_names,
                       preprocess=spec.get("preprocess"), backbone_spec=spec.get("backbone"))


def load_image(path: str, image_shape) -> np.ndarray:
  """One image file squashed to (H, W, C) uint8 (what jembed.index on main calls; new code should
  give the paths to `ImageEmbedder.embed`, which applies the model's own preprocessing)."""
  from jembed.data import image_transforms as T
  h, w, c = (int(s) for s in image_shape)
  return T.resize(inputs_lib.load_file(path, c), h, w)


def modality_of(path: str) -> str:
  """"image" or "text": what a model takes, read from its description without loading weights (so
  a CLI can check its input first)."""
  from jembed import modelspec
  if os.path.isfile(path):
    return "image"   # a weights file (.pth / .safetensors / .npz) is an image model
  spec = modelspec.read(path) if os.path.isdir(path) else None
  if spec is not None:
    return "text" if "encoder" in spec else "image"
  cfg = os.path.join(path, "config.json")
  if os.path.isfile(cfg):
    try:
      model_type = json.loads(fs.read_text(cfg)).get("model_type", "")
    except (OSError, ValueError, AttributeError):
      return "text"
    return "image" if model_type in ("resnet", "vit") else "text"
  return "text"


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------
def _write_projector(directory: str, vectors: np.ndarray, labels: list[str], images=None) -> None:
  """TensorBoard Embedding Projector files (tensors, metadata, thumbnails, projector_config)."""
  from tensorboardX import SummaryWriter
  label_img = None
  if images is not None:
    label_img = np.asarray(images, np.float32).transpose(0, 3, 1, 2) / 255.0
  with SummaryWriter(directory) as w:
    w.add_embedding(vectors, metadata=[s.replace("\t", " ").replace("\n", " ")[:200] or "(empty)"
                                       for s in labels], label_img=label_img, tag="jembed")


class Inputs:
  """What a CLI's --input holds for a model of one modality, checked (and, for texts, read once to
  count and find bad lines) before the model loads: image names and paths, or text records."""

  def __init__(self, path: str, modality: str, field: str | None, id_field: str = "id"):
    inputs_lib.check_input(path)
    self.path, self.modality, self.id_field = path, modality, id_field
    if modality == "image":
      self.field = field or "path"
      self.names, self.paths = inputs_lib.list_inputs(path, self.field)
      self.n, self.has_ids = len(self.paths), True
    else:
      self.field = field or "text"
      if fs.isdir(path):
        raise UserError(f"input '{path}' is a folder; a text model takes a .txt, .jsonl or .csv file")
      self.n, self.has_ids = inputs_lib.count_records(path, self.field, id_field)
    if self.n == 0:
      raise UserError(f"input '{path}' holds no texts; give a non-empty file")

  def text_chunks(self, size: int = CHUNK) -> Iterator[tuple[list[str], list[str]]]:
    """(ids, texts) a chunk at a time."""
    records = read_records(self.path, self.field, self.id_field)
    lo = 0
    while lo < self.n:
      chunk = [next(records) for _ in range(min(size, self.n - lo))]
      yield [str(i) if i is not None else "" for i, _ in chunk], [t for _, t in chunk]
      lo += len(chunk)

  def image_chunks(self, pp, size: int = IMAGE_CHUNK) -> Iterator[tuple[list[str], np.ndarray]]:
    """(names, uint8 images at the model's size) a chunk at a time."""
    for lo in range(0, self.n, size):
      yield self.names[lo:lo + size], inputs_lib.eval_batch(self.paths[lo:lo + size], pp)


def read_input(args, model_path: str) -> Inputs:
  return Inputs(args.input, modality_of(model_path), args.field, args.id_field)


def run(args) -> str:
  from jembed import outputs
  outputs.format_of(args.output)
  if not fs.is_local(args.input):
    # A gs:// input is read from a temporary download (folders whole, files as one file).
    if not fs.exists(args.input):
      raise UserError(f"input '{args.input}' does not exist; fix --input")
    local = fs.local_dir if fs.isdir(args.input) else fs.local_file
    with local(args.input) as path:
      return _run(args, path)
  return _run(args, args.input)


def _run(args, input_path: str) -> str:
  from jembed import outputs
  args.input = input_path
  data = read_input(args, args.model)        # the input is checked before the model loads
  model = load(args.model, max_seq_length=args.max_seq_length)
  if model.modality != data.modality:
    data = Inputs(args.input, model.modality, args.field, args.id_field)
  check_options(batch_size=args.batch_size, dtype=args.dtype, dim=args.dim, width=model.dim)
  if model.modality == "image" and (args.prompt or args.prompt_name or args.max_seq_length):
    raise UserError("--prompt, --prompt-name and --max-seq-length are for text models; "
                    f"{args.model} takes images")
  width = args.dim or model.dim
  normalize = {"model": None, "yes": True, "no": False}[args.normalize]
  bar = Progress(data.n, True, unit=data.modality + "s")
  kept: dict[str, list] = {"labels": [], "images": []}
  t0 = time.perf_counter()

  def chunks():
    if model.modality == "image":
      for names, images in data.image_chunks(model.preprocess):
        vectors = model._finish(model.run_array(images, batch_size=args.batch_size, dtype=args.dtype,
                                                bar=bar), args.dim, normalize)
        keep(names, images)
        yield names, vectors
    else:
      for ids, texts in data.text_chunks():
        rows = model.tokenize(model._prompted(texts, args.prompt, args.prompt_name))
        keep(texts, None)
        yield ids, model._embed_rows(rows, args.batch_size, args.dtype, args.dim, bar, normalize)

  def keep(labels, images):
    room = args.projector_max - len(kept["labels"]) if args.projector else 0
    if room > 0:
      kept["labels"].extend(labels[:room])
      if images is not None:
        kept["images"].extend(images[:room])

  key = "path" if model.modality == "image" else "id"
  outputs.write_vectors(args.output, data.n, width, key, chunks)
  bar.close()
  if args.projector:
    vectors = _head_rows(args.output, len(kept["labels"]))
    _projector(args.projector, vectors, kept["labels"],
               np.stack(kept["images"]) if kept["images"] else None)
  dt = time.perf_counter() - t0
  names = outputs.sidecar(args.output, key) if args.output.endswith(".npy") and data.has_ids else ""
  return (f"{data.n} {data.modality}s -> {args.output} ({width} dims, {args.dtype}, "
          f"{data.n / dt:.3g} {data.modality}s/s)" + (f"; {key}s -> {names}" if names else ""))


def _projector(directory: str, vectors: np.ndarray, labels: list[str], images=None) -> None:
  """The projector files, written locally (tensorboardX writes local paths), copied for a URL."""
  if fs.is_local(directory):
    _write_projector(directory, vectors, labels, images)
    return
  with tempfile.TemporaryDirectory(prefix="jembed-projector-") as local:
    _write_projector(local, vectors, labels, images)
    fs.copy_tree(local, directory)


def _head_rows(path: str, n: int) -> np.ndarray:
  """The first `n` vectors of an output just written (for the projector)."""
  if not fs.is_local(path):
    with fs.local_file(path) as local:
      return _head_rows(local, n)
  if path.endswith(".npy"):
    return np.asarray(np.load(path, mmap_mode="r")[:n])
  if path.endswith(".jsonl"):
    rows = []
    with fs.open(path) as f:
      for line in f:
        if len(rows) == n:
          break
        rows.append(json.loads(line)["embedding"])
    return np.asarray(rows, np.float32)
  import pyarrow.parquet as pq
  return np.asarray(pq.read_table(path, columns=["embedding"]).column(0).to_pylist()[:n], np.float32)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m jembed.embed", description=__doc__.split("\n\n")[0])
  p.add_argument("--model", required=True, help="jembed workdir or export, or a Hugging Face dir")
  p.add_argument("--input", required=True,
                 help="texts: .txt (a text a line), .jsonl, .csv; images: a folder (recursive) or a "
                      "list file (.txt a path a line, .jsonl / .csv with a 'path' field)")
  p.add_argument("--output", required=True,
                 help="OUTPUT.npy (+ OUTPUT.ids.txt / OUTPUT.paths.txt), .jsonl or .parquet")
  p.add_argument("--field", default=None,
                 help="the .jsonl field / .csv column holding the text (default text) or image path "
                      "(default path)")
  p.add_argument("--id-field", default="id", help="the field holding an id (written with the vectors)")
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--dtype", default="float32", choices=DTYPES)
  p.add_argument("--dim", type=int, default=None, help="keep the first DIM dimensions (Matryoshka)")
  p.add_argument("--max-seq-length", type=int, default=None, help="truncate texts to this many tokens")
  p.add_argument("--normalize", default="model", choices=("model", "yes", "no"),
                 help="unit-length vectors: as the model declares (default), always, or never")
  p.add_argument("--prompt", default=None, help="text put before every input text")
  p.add_argument("--prompt-name", default=None, help="one of the model's named prompts (e.g. query)")
  p.add_argument("--projector", default="", help="also write TensorBoard Embedding Projector files here")
  p.add_argument("--projector-max", type=int, default=10000, help="at most this many points there")
  return run_cli(p, run)(argv)


if __name__ == "__main__":
  sys.exit(main())
