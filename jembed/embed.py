"""Embeddings out: `jembed.load(path).embed(texts)` and `python -m jembed.embed`.

    python -m jembed.embed --model path/to/all-MiniLM-L6-v2 --input docs.txt --output docs.npy
    python -m jembed.embed --model runs/ct --input pairs.jsonl --field anchor --output a.npy \
        --dtype bfloat16 --dim 128 --projector runs/ct/projector

A model is a jembed workdir (its latest checkpoint, LoRA merged), a jembed export, or a Hugging Face
/ sentence-transformers directory (read without torch). Texts are sorted by length and cut into
batches whose padded length is one of a few buckets, so a whole file needs only a handful of
compiles; batches run data-parallel over the local devices; rows come back in input order, pooled
and normalised as the model declares. Files stream: they are read, embedded and written a chunk at
a time into a memory-mapped .npy, so millions of lines run in bounded memory.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jembed.errors import UserError, run_cli

DTYPES = ("float32", "bfloat16")
# Padded lengths a batch may have (then the model's maximum): few shapes, few compiles.
BUCKETS = (16, 32, 64, 128, 256, 512)
CHUNK = 16384            # texts read, sorted and embedded together when streaming a file


class TextEmbedder:
  """A Transformer encoder with its tokenizer, pooling and normalisation, ready to embed texts."""

  modality = "text"

  def __init__(self, encoder_config, params: dict, tokenizer, special_ids: dict[str, int], *,
               pooling: str, normalize: bool, max_seq_length: int, lowercase: bool = False,
               source: str = ""):
    from jembed.models.transformer import TransformerEncoder
    self.config = encoder_config
    self.tokenizer = tokenizer
    self.ids = dict(special_ids)
    self.pooling = pooling
    self.normalize = bool(normalize)
    self.lowercase = bool(lowercase)
    self.max_seq_length = min(int(max_seq_length), encoder_config.max_position)
    self.source = source
    self.dim = encoder_config.hidden_size
    self._params = params
    self._fns: dict[str, Any] = {}
    self._encoder_cls = TransformerEncoder
    devices = jax.local_devices()
    self.mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                              devices=devices)

  def set_params(self, params: dict) -> None:
    """New weights for the same architecture: the compiled functions are kept."""
    self._params = params
    self._fns = {k: (fn, None, data) for k, (fn, _, data) in self._fns.items()}

  # -- the compiled forward, one per dtype (and one compile per padded shape) --
  def _forward(self, dtype: str):
    if dtype in self._fns and self._fns[dtype][1] is not None:
      return self._fns[dtype]
    import dataclasses
    from jembed.models.heads import pool
    cfg = dataclasses.replace(self.config, dtype=jnp.dtype(dtype), dropout=0.0, attention_dropout=0.0,
                              remat="none")
    abstract = nnx.eval_shape(lambda: self._encoder_cls(cfg, rngs=nnx.Rngs(params=0, dropout=0)))
    abstract.eval()
    graphdef, abs_params = nnx.split(abstract, nnx.Param)
    from jembed.modelspec import _like
    state = _like(abs_params, self._params)
    rep = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    # Parameters in the compute dtype, once: the bandwidth of every matmul halves in bfloat16.
    # LayerNorm still normalises in float32 (layers.LayerNorm).
    params = jax.device_put(jax.tree.map(lambda x: jnp.asarray(x, jnp.dtype(dtype)), state), rep)
    data = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data"))
    pooling, normalize = self.pooling, self.normalize

    if dtype in self._fns:  # compiled before; only the weights changed
      fn, _, _ = self._fns[dtype]
      self._fns[dtype] = (fn, params, data)
      return self._fns[dtype]

    @jax.jit
    def fn(params, tokens, mask):
      model = nnx.merge(graphdef, params)
      hidden = model(tokens, mask).astype(jnp.float32)
      out = pool(hidden, mask, pooling)
      if normalize:
        out = out / jnp.maximum(jnp.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
      return out

    self._fns[dtype] = (fn, params, data)
    return self._fns[dtype]

  def tokenize(self, texts: Sequence[str]) -> list[np.ndarray]:
    """[CLS] ... [SEP] ids of each text, stripped (and lower-cased when the model says so) first, as
    sentence-transformers does."""
    from jembed.data import encode
    texts = [t.strip().lower() if self.lowercase else t.strip() for t in texts]
    return encode.token_ids(self.tokenizer, texts, self.max_seq_length, self.ids)

  def embed(self, texts: Sequence[str] | str, *, batch_size: int = 32, dtype: str = "float32",
            dim: int | None = None, progress: bool = False) -> np.ndarray:
    """(N, D) float32 embeddings of `texts`, one row per text, in input order."""
    if isinstance(texts, str):
      texts = [texts]
    texts = list(texts)
    check_options(batch_size=batch_size, dtype=dtype, dim=dim, width=self.dim)
    out = np.empty((len(texts), dim or self.dim), np.float32)
    bar = _Progress(len(texts), progress)
    for lo in range(0, len(texts), CHUNK):
      chunk = texts[lo:lo + CHUNK]
      out[lo:lo + len(chunk)] = self._embed_rows(self.tokenize(chunk), batch_size, dtype, dim, bar)
    bar.close()
    return out

  def _embed_rows(self, rows: list[np.ndarray], batch_size: int, dtype: str, dim: int | None,
                  bar: "_Progress") -> np.ndarray:
    fn, params, data = self._forward(dtype)
    n_dev = self.mesh.size
    batch = -(-batch_size // n_dev) * n_dev  # a multiple of the devices: every device gets rows
    order = np.argsort([-len(r) for r in rows], kind="stable")  # longest first, ties in input order
    out = np.empty((len(rows), dim or self.dim), np.float32)
    from jembed.data.encode import pad_rows
    for lo in range(0, len(rows), batch):
      idx = order[lo:lo + batch]
      length = bucket(max(len(rows[i]) for i in idx), self.max_seq_length)
      tokens = pad_rows([rows[i] for i in idx] + [rows[idx[0]][:0]] * (batch - len(idx)), length,
                        self.ids["pad"])
      mask = tokens != self.ids["pad"]
      mask[:, 0] = True  # padding rows attend to something, so no NaN appears (they are dropped)
      vec = np.asarray(fn(params, jax.device_put(tokens, data), jax.device_put(mask, data)))
      out[idx] = truncate(vec[:len(idx)], dim, self.normalize)
      bar.update(len(idx))
    return out


class ImageEmbedder:
  """A vision backbone (ResNet / ViT) from a jembed workdir: pooled features of images."""

  modality = "image"

  def __init__(self, backbone: nnx.Module, image_shape, *, normalize: bool = False, source: str = ""):
    self.backbone = backbone
    self.image_shape = tuple(image_shape)
    self.normalize = normalize
    self.source = source
    self.dim = int(backbone.out_features)
    graphdef, state = nnx.split(backbone)
    from jembed.tasks.vision import backbone_features, to_float
    self._fn = jax.jit(lambda s, x: backbone_features(nnx.merge(graphdef, s), to_float(x)))
    self._state = state

  def embed(self, images: np.ndarray, *, batch_size: int = 64, dtype: str = "float32",
            dim: int | None = None, progress: bool = False) -> np.ndarray:
    check_options(batch_size=batch_size, dtype=dtype, dim=dim, width=self.dim)
    if dtype != "float32":
      raise UserError("--dtype bfloat16 is for text models; image backbones embed in float32")
    images = np.asarray(images)
    if images.ndim != 4 or tuple(images.shape[1:]) != self.image_shape:
      raise UserError(f"images of shape {images.shape[1:]} do not fit the model (it takes "
                      f"{self.image_shape}); resize them to that")
    out = np.empty((len(images), dim or self.dim), np.float32)
    bar = _Progress(len(images), progress)
    for lo in range(0, len(images), batch_size):
      chunk = images[lo:lo + batch_size]
      pad = np.zeros((batch_size - len(chunk),) + chunk.shape[1:], chunk.dtype)
      vec = np.asarray(self._fn(self._state, np.concatenate([chunk, pad])))[:len(chunk)]
      if self.normalize:
        vec = vec / np.maximum(np.linalg.norm(vec, axis=-1, keepdims=True), 1e-12)
      out[lo:lo + len(chunk)] = truncate(vec, dim, self.normalize)
      bar.update(len(chunk))
    bar.close()
    return out


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
  if normalize:
    out = out / np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
  return out


def check_options(*, batch_size: int, dtype: str, dim: int | None, width: int) -> None:
  if batch_size < 1:
    raise UserError(f"batch size {batch_size} must be positive")
  if dtype not in DTYPES:
    raise UserError(f"dtype '{dtype}' is not supported; use one of {', '.join(DTYPES)}")
  if dim is not None and not 0 < dim <= width:
    raise UserError(f"dim={dim} must be in 1..{width} (the model's embedding width)")


class _Progress:
  def __init__(self, total: int, enabled: bool):
    self.total, self.done, self.t0 = total, 0, time.perf_counter()
    self.enabled = enabled and sys.stderr.isatty() and total > 0

  def update(self, n: int) -> None:
    self.done += n
    if self.enabled:
      rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
      sys.stderr.write(f"\rembedded {self.done}/{self.total} ({rate:.0f}/s)")
      sys.stderr.flush()

  def close(self) -> None:
    if self.enabled:
      sys.stderr.write("\n")


# ---------------------------------------------------------------------------------------------------
# Loading a model
# ---------------------------------------------------------------------------------------------------
def load(path: str, *, max_seq_length: int | None = None, step: int | None = None):
  """A TextEmbedder or ImageEmbedder for a jembed workdir, a jembed export or a Hugging Face /
  sentence-transformers directory."""
  from jembed import modelspec
  if not os.path.isdir(path):
    raise UserError(f"model '{path}' does not exist; give a jembed workdir or a Hugging Face "
                    "model directory")
  if modelspec.read(path) is not None:
    return _load_workdir(path, max_seq_length, step)
  if os.path.exists(os.path.join(path, "config.json")) and not os.path.isdir(os.path.join(path, "checkpoints")):
    from jembed import hf
    from jembed.models.transformer import TransformerConfig
    m = hf.load_dir(path)
    return TextEmbedder(TransformerConfig.from_json(m.encoder_config), m.params, m.tokenizer,
                        m.special_ids, pooling=m.pooling, normalize=m.normalize,
                        max_seq_length=max_seq_length or m.max_seq_length, lowercase=m.lowercase,
                        source=path)
  raise UserError(f"'{path}' is not a model directory: it has neither a jembed model.json nor a "
                  "Hugging Face config.json")


def _load_workdir(path: str, max_seq_length: int | None, step: int | None):
  from jembed import modelspec
  from jembed.tasks import task_class
  spec, model, step = modelspec.load_model(path, step)
  if spec["task"] == "two_tower":   # a recommender: recommend(users, k), similar_items(items, k)
    from jembed.recommend import Recommender
    return Recommender.from_workdir(path, spec, model, step)
  backbone = getattr(model, task_class(spec["task"]).backbone_of(spec))
  desc = f"{path} step {step}"
  if "encoder" in spec:
    import tokenizers
    from jembed.models.transformer import TransformerConfig
    tokenizer = tokenizers.Tokenizer.from_file(os.path.join(path, spec["tokenizer"]))
    params = nnx.to_pure_dict(nnx.state(backbone, nnx.Param))
    return TextEmbedder(TransformerConfig.from_json(spec["encoder"]), params, tokenizer,
                        spec["special_ids"], pooling=spec.get("pooling", "mean"),
                        normalize=spec.get("normalize", False),
                        max_seq_length=max_seq_length or spec.get("max_seq_length") or spec["seq_len"],
                        source=desc)
  return ImageEmbedder(backbone, spec["image_shape"], normalize=spec.get("normalize", False),
                       source=desc)


# ---------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------
def read_records(path: str, field: str = "text", id_field: str = "id") -> Iterator[tuple[Any, str]]:
  """(id or None, text) of each record: a .txt line, a .jsonl object's `field`, a .csv column."""
  if not os.path.isfile(path):
    raise UserError(f"input file '{path}' does not exist; fix --input")
  ext = os.path.splitext(path)[1].lower()
  if ext == ".txt":
    with open(path, encoding="utf-8", errors="strict") as f:
      for i, line in enumerate(f, 1):
        yield None, line.rstrip("\n")
  elif ext == ".jsonl":
    with open(path, encoding="utf-8") as f:
      for i, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          obj = json.loads(line)
        except ValueError:
          raise UserError(f"{path}:{i} is not valid JSON; fix or remove that line") from None
        if field not in obj:
          raise UserError(f"{path}:{i} has no field '{field}' (it has {sorted(obj)[:8]}); pass "
                          "--field NAME") from None
        yield obj.get(id_field), str(obj[field])
  elif ext == ".csv":
    with open(path, encoding="utf-8", newline="") as f:
      reader = csv.DictReader(f)
      if field not in (reader.fieldnames or []):
        raise UserError(f"{path} has no column '{field}' (it has {reader.fieldnames}); pass "
                        "--field NAME")
      for row in reader:
        yield row.get(id_field), row[field]
  else:
    raise UserError(f"input '{path}' is not .txt, .jsonl or .csv; use one of those")


def _count(path: str, field: str, id_field: str) -> tuple[int, bool]:
  n, has_ids = 0, False
  for ident, _ in read_records(path, field, id_field):
    n += 1
    has_ids = has_ids or ident is not None
  return n, has_ids


def read_images(path: str, image_shape) -> tuple[list[str], np.ndarray]:
  """Every image file under the folder `path` (sorted by path), converted to the model's shape."""
  if not os.path.isdir(path):
    raise UserError(f"image folder '{path}' does not exist; fix --input")
  names, arrays = [], []
  for root, _, files in sorted(os.walk(path)):
    for name in sorted(files):
      if os.path.splitext(name)[1].lower() not in (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"):
        continue
      full = os.path.join(root, name)
      arrays.append(load_image(full, image_shape))
      names.append(os.path.relpath(full, path))
  if not arrays:
    raise UserError(f"no images under '{path}'; give a folder of .png/.jpg files")
  return names, np.stack(arrays)


def load_image(full: str, image_shape) -> np.ndarray:
  """One image file as a uint8 (H, W, C) array of the model's shape (also used by jembed.index)."""
  from PIL import Image, UnidentifiedImageError
  h, w, c = image_shape
  try:
    img = Image.open(full).convert("L" if c == 1 else "RGB").resize((w, h))
  except (UnidentifiedImageError, OSError):
    raise UserError(f"{full} is not a readable image; remove it or fix it") from None
  arr = np.asarray(img, np.uint8)
  return arr[..., None] if c == 1 else arr


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


def run(args) -> str:
  model = load(args.model, max_seq_length=args.max_seq_length)
  out_path = args.output
  if not out_path.endswith(".npy"):
    raise UserError(f"--output '{out_path}' must end in .npy")
  check_options(batch_size=args.batch_size, dtype=args.dtype, dim=args.dim, width=model.dim)
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  tmp = out_path + ".tmp.npy"
  if model.modality == "image":
    names, images = read_images(args.input, model.image_shape)
    vectors = model.embed(images, batch_size=args.batch_size, dim=args.dim, progress=True)
    np.save(tmp, vectors)
    os.replace(tmp, out_path)
    if args.projector:
      _write_projector(args.projector, vectors, names, images)
    return f"{len(vectors)} images -> {out_path} ({vectors.shape[1]} dims)"

  n, has_ids = _count(args.input, args.field, args.id_field)
  if n == 0:
    raise UserError(f"input '{args.input}' holds no texts; give a non-empty file")
  width = args.dim or model.dim
  out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, width))
  ids, kept_texts = [], []
  bar = _Progress(n, True)
  lo = 0
  records = read_records(args.input, args.field, args.id_field)
  t0 = time.perf_counter()
  while lo < n:
    chunk = [next(records) for _ in range(min(CHUNK, n - lo))]
    texts = [t for _, t in chunk]
    ids.extend(str(i) if i is not None else "" for i, _ in chunk)
    if args.projector and len(kept_texts) < args.projector_max:
      kept_texts.extend(texts[:args.projector_max - len(kept_texts)])
    out[lo:lo + len(chunk)] = model._embed_rows(model.tokenize(texts), args.batch_size, args.dtype,
                                                args.dim, bar)
    lo += len(chunk)
  bar.close()
  out.flush()
  del out
  os.replace(tmp, out_path)
  if has_ids:
    with open(out_path[:-4] + ".ids.txt", "w") as f:
      f.write("\n".join(ids) + "\n")
  if args.projector:
    vectors = np.load(out_path, mmap_mode="r")[:len(kept_texts)]
    _write_projector(args.projector, np.asarray(vectors), kept_texts)
  dt = time.perf_counter() - t0
  return (f"{n} texts -> {out_path} ({width} dims, {args.dtype}, {n / dt:.0f} texts/s)"
          + (f"; ids -> {out_path[:-4]}.ids.txt" if has_ids else ""))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m jembed.embed", description=__doc__.split("\n\n")[0])
  p.add_argument("--model", required=True, help="jembed workdir or export, or a Hugging Face dir")
  p.add_argument("--input", required=True, help=".txt (a text a line), .jsonl, .csv; or an image folder")
  p.add_argument("--output", required=True, help="where the .npy of vectors goes")
  p.add_argument("--field", default="text", help="the .jsonl field / .csv column holding the text")
  p.add_argument("--id-field", default="id", help="the field holding an id (written to OUTPUT.ids.txt)")
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--dtype", default="float32", choices=DTYPES)
  p.add_argument("--dim", type=int, default=None, help="keep the first DIM dimensions (Matryoshka)")
  p.add_argument("--max-seq-length", type=int, default=None, help="truncate texts to this many tokens")
  p.add_argument("--projector", default="", help="also write TensorBoard Embedding Projector files here")
  p.add_argument("--projector-max", type=int, default=10000, help="at most this many points there")
  return run_cli(p, run)(argv)


if __name__ == "__main__":
  sys.exit(main())
