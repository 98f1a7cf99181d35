"""LoRA as a pure transform of the parameter tree.

The base tree (``nnx.to_pure_dict`` output: nested dicts keyed by str or int) stays
frozen and untouched; the low-rank factors live in a separate flat dict keyed by path
string (``"layers/0/attention/query/kernel"``). ``apply`` folds them into the kernels
(``W + s * A @ B``) so any model runs unchanged on the result, and gradients are taken
w.r.t. the adapters (and optional ``extra`` leaves) only, so the optimizer never holds
state for the base.

Shapes: a kernel ``W`` of shape ``(*in_dims, out)`` gets ``A: (*in_dims, r)`` and
``B: (r, out)``. For 2-D dense kernels that is ``(in, r)`` / ``(r, out)``; for conv kernels
``(kh, kw, in, out)`` A keeps the ``(kh, kw, in)`` dims instead of flattening them,
because a flattened A sharded on its first dim would split ``kh`` rather than ``in`` and
the merge would then need an all-to-all. The math is the same as flattening
(``einsum('...r,ro->...o')``), equivalent to PEFT's "conv A + 1x1 conv B".

Dropout: PEFT drops the LoRA *input* per example, which needs the unmerged path. In
merged mode we drop whole rows of A (input features of the low-rank path) with rate p,
rescaled by 1/(1-p): the same mask for every example in the batch, fresh per step.

Targets, exclude, trainable and unmerged are regexes applied with ``re.search`` to the
path string (anchor with ``^``/``$`` when needed). ``targets`` may also be a preset name.

Unmerged path: merging means the model's backward pass materialises a full-size dW even
though only A, B are trained. Paths matching ``cfg.unmerged`` are left unmerged by
``apply`` and must be computed by the model with ``unmerged_dense`` (not yet wired into
the models).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import shutil
import uuid
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jembed.errors import UserError

Tree = dict[Any, Any]

# Preset -> (regex over paths, kernel ndims it may match). Embeddings are named
# "embedding" in NNX, so "kernel" never matches them.
PRESETS: dict[str, tuple[str, tuple[int, ...]]] = {
    "attention_qv": (r"(^|/)attention/(query|value)/kernel$", (2,)),
    "attention": (r"(^|/)attention/(query|key|value|out)/kernel$", (2,)),
    "all_dense": (r"(^|/)kernel$", (2,)),
    "all_dense_and_conv": (r"(^|/)kernel$", (2, 4)),
}
_CONFIG_FILE = "lora_config.json"
_STATE_DIR = "state"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA hyper-parameters and which leaves they apply to (see module docstring)."""
  rank: int = 8
  alpha: float = 16.0
  rslora: bool = False
  dropout: float = 0.0
  targets: str = "attention_qv"
  exclude: str = ""
  trainable: str = ""
  unmerged: str = ""

  def __post_init__(self):
    if self.rank < 1:
      raise UserError(f"LoRA rank must be >= 1, got {self.rank}; set lora.rank to a positive int")
    if not 0.0 <= self.dropout < 1.0:
      raise UserError(f"LoRA dropout must be in [0, 1), got {self.dropout}; fix lora.dropout")
    for name in ("targets", "exclude", "trainable", "unmerged"):
      value = getattr(self, name)
      if name == "targets" and value in PRESETS:
        continue
      try:
        re.compile(value)
      except re.error as e:
        raise UserError(f"lora.{name}={value!r} is not a valid regex ({e}); fix the pattern") from None

  @property
  def scale(self) -> float:
    # rsLoRA keeps the update magnitude rank-independent, so higher ranks actually help.
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


# ----------------------------------------------------------------------------- tree paths


def _flatten(tree: Tree, prefix: str = "") -> dict[str, Any]:
  """{path string: leaf}, in the tree's (insertion) order."""
  out = {}
  for k, v in tree.items():
    path = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, path + "/"))
    else:
      out[path] = v
  return out


def _key_in(node: dict, part: str):
  if part in node:
    return part
  if part.lstrip("-").isdigit() and int(part) in node:
    return int(part)
  raise KeyError(part)


def _get(tree: Tree, path: str):
  node = tree
  for part in path.split("/"):
    node = node[_key_in(node, part)]
  return node


def _replace(tree: Tree, new_leaves: dict[str, Any]) -> Tree:
  """Copy of the dict spine with some leaves replaced; other leaves are the same objects."""
  if not new_leaves:
    return tree
  out = dict(tree)
  groups: dict[Any, dict[str, Any]] = {}
  for path, leaf in new_leaves.items():
    head, _, rest = path.partition("/")
    key = _key_in(tree, head)
    if rest:
      groups.setdefault(key, {})[rest] = leaf
    else:
      out[key] = leaf
  for key, sub in groups.items():
    out[key] = _replace(tree[key], sub)
  return out


def _select(tree: Tree, keep) -> Tree:
  """Subtree of leaves whose path satisfies keep(path); empty dicts pruned."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      sub = _select(v, lambda p, k=k: keep(f"{k}/{p}"))
      if sub:
        out[k] = sub
    elif keep(str(k)):
      out[k] = v
  return out


def combine(*trees: Tree) -> Tree:
  """Deep union of trees; later trees win on equal paths (inverse of split_trainable)."""
  out: Tree = {}
  for tree in trees:
    for k, v in tree.items():
      if isinstance(v, dict) and isinstance(out.get(k), dict):
        out[k] = combine(out[k], v)
      else:
        out[k] = v
  return out


# ----------------------------------------------------------------------------- targets


def _target_regex(cfg: LoraConfig) -> tuple[str, tuple[int, ...]]:
  if cfg.targets in PRESETS:
    return PRESETS[cfg.targets]
  return cfg.targets, (2, 4)


def lora_targets(base: Tree, cfg: LoraConfig) -> list[str]:
  """Sorted paths of the kernels LoRA applies to (matched by re.search, ndim 2 or 4)."""
  regex, ndims = _target_regex(cfg)
  found = []
  for path, leaf in _flatten(base).items():
    if np.ndim(leaf) not in ndims or not re.search(regex, path):
      continue
    if cfg.exclude and re.search(cfg.exclude, path):
      continue
    found.append(path)
  if not found:
    kernels = [p for p, x in _flatten(base).items() if np.ndim(x) in (2, 4)][:6]
    raise UserError(
        f"lora.targets={cfg.targets!r} (regex {regex!r}, exclude {cfg.exclude!r}) matches no "
        f"{'/'.join(map(str, ndims))}-D kernel; available kernels include {kernels}; fix lora.targets")
  if cfg.trainable:
    both = [p for p in found if re.search(cfg.trainable, p)]
    if both:
      raise UserError(f"{both[:3]} match both lora.targets and lora.trainable; a kernel is either "
                      "LoRA-adapted or fully trained: narrow one of the regexes")
  return sorted(found)


def init_adapters(base: Tree, cfg: LoraConfig, key: jax.Array) -> dict[str, dict[str, jax.Array]]:
  """{path: {"a": (*in_dims, r), "b": (r, out)}} in float32, with B = 0.

  A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PEFT's kaiming_uniform(a=sqrt(5))); B = 0 makes
  the adapted model start exactly at the base.
  """
  paths = lora_targets(base, cfg)
  shapes = tuple(tuple(np.shape(_get(base, p))) for p in paths)
  factors = _init_factors(key, shapes, cfg.rank)
  return {p: {"a": a, "b": b} for p, (a, b) in zip(paths, factors)}


@functools.partial(jax.jit, static_argnums=(1, 2))
def _init_factors(key, shapes, rank):
  # One random draw for all A's: threefry compiles slowly, so one call per kernel made
  # init take seconds for a small model.
  sizes = [math.prod(s[:-1]) * rank for s in shapes]
  u = jax.random.uniform(key, (sum(sizes),), jnp.float32, -1.0, 1.0)
  out, start = [], 0
  for shape, size in zip(shapes, sizes):
    bound = 1.0 / math.sqrt(math.prod(shape[:-1]))
    a = (u[start:start + size] * bound).reshape(*shape[:-1], rank)
    out.append((a, jnp.zeros((rank, shape[-1]), jnp.float32)))
    start += size
  return out


def split_trainable(base: Tree, cfg: LoraConfig) -> tuple[Tree, Tree]:
  """(extra, frozen): leaves matching cfg.trainable, and the rest; combine() restores base."""
  if not cfg.trainable:
    return {}, base
  hit = lambda p: re.search(cfg.trainable, p) is not None
  return _select(base, hit), _select(base, lambda p: not hit(p))


# ----------------------------------------------------------------------------- merge


def _delta(a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
  return scale * jnp.einsum("...r,ro->...o", a.astype(jnp.float32), b.astype(jnp.float32))


def _merge_one(w: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
  if a.shape[:-1] != w.shape[:-1] or b.shape[-1] != w.shape[-1]:
    raise UserError(f"adapter shapes A{a.shape} B{b.shape} do not fit kernel {w.shape}; "
                    "the adapters belong to a different model")
  return (jnp.asarray(w, jnp.float32) + _delta(a, b, scale)).astype(w.dtype)


def _drop_rows(a: jax.Array, rate: float, key: jax.Array) -> jax.Array:
  keep = jax.random.bernoulli(key, 1.0 - rate, (*a.shape[:-1], 1))
  return jnp.where(keep, a / (1.0 - rate), 0.0).astype(a.dtype)


def apply(base: Tree, adapters: dict, cfg: LoraConfig, *, extra: Tree | None = None,
          dropout_key: jax.Array | None = None) -> Tree:
  """Merged parameter tree: W + s * A @ B (f32, cast back to W.dtype) for each adapter.

  ``extra`` (fully trained leaves, see split_trainable) overrides base leaves. Leaves that
  are neither adapted nor in extra are passed through as the same objects. Targets matching
  cfg.unmerged are left as W (the model computes them with unmerged_dense). Jit-able and
  differentiable w.r.t. adapters and extra.
  """
  tree = combine(base, extra) if extra else base
  merged = {}
  for i, path in enumerate(sorted(adapters)):
    if cfg.unmerged and re.search(cfg.unmerged, path):
      continue
    a, b = adapters[path]["a"], adapters[path]["b"]
    if dropout_key is not None and cfg.dropout > 0:
      a = _drop_rows(a, cfg.dropout, jax.random.fold_in(dropout_key, i))
    merged[path] = _merge_one(_get(tree, path), a, b, cfg.scale)
  return _replace(tree, merged)


def merge(base: Tree, adapters: dict, cfg: LoraConfig, extra: Tree | None = None) -> Tree:
  """Dense tree for export: every adapter folded in (unmerged ones too), no dropout."""
  return apply(base, adapters, dataclasses.replace(cfg, unmerged=""), extra=extra)


def unmerged_dense(x: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array,
                   scale: float) -> jax.Array:
  """x @ W + s * (x @ A) @ B, for 2-D W: never builds a full-size dW in the backward pass."""
  y = x @ w
  low = (x.astype(a.dtype) @ a) @ b
  return (y + (scale * low).astype(y.dtype)).astype(y.dtype)


def unmerged_targets(adapters: dict, cfg: LoraConfig) -> list[str]:
  """Adapter paths that apply() leaves for the model to compute with unmerged_dense."""
  if not cfg.unmerged:
    return []
  return sorted(p for p in adapters if re.search(cfg.unmerged, p))


# ----------------------------------------------------------------------------- sharding


def adapter_partition_specs(base_specs: Tree, adapters: dict) -> dict:
  """Specs for the adapters from the base kernels' specs (PartitionSpec or name tuples).

  A inherits the kernel's input-dim specs with the rank dim replicated; B has the rank dim
  replicated and the output-dim spec. A @ B contracts an unsharded axis, so the delta is
  produced directly in W's layout with no communication.
  """
  out = {}
  for path, ab in adapters.items():
    spec = _get(base_specs, path)
    ndim = np.ndim(ab["a"])
    dims = tuple(spec) + (None,) * (ndim - len(tuple(spec)))
    make = (lambda *d: jax.sharding.PartitionSpec(*d)) if isinstance(
        spec, jax.sharding.PartitionSpec) else (lambda *d: tuple(d))
    out[path] = {"a": make(*dims[:-1], None), "b": make(None, dims[-1])}
  return out


# ----------------------------------------------------------------------------- checkpoints


def _sample_index(shape: tuple[int, ...]) -> tuple[np.ndarray, ...]:
  size = math.prod(shape)
  rng = np.random.default_rng(size)
  flat = np.unique(np.concatenate([np.arange(min(size, 4)), rng.integers(0, size, 12)]))
  return np.unravel_index(flat, shape)


def fingerprint(base: Tree) -> str:
  """Hash of paths, shapes, dtypes and a few exact sample values of every leaf.

  Samples are gathered at fixed indices (first elements plus a fixed pseudo-random set)
  rather than summed, so the result does not depend on how the base is sharded, and only
  ~16 values per leaf leave the device (one jitted gather for the whole tree).
  """
  items = sorted(_flatten(base).items())
  shapes = [tuple(np.shape(leaf)) for _, leaf in items]
  sampled = [i for i, s in enumerate(shapes) if math.prod(s) > 0 and s]
  on_device = [i for i in sampled if isinstance(items[i][1], jax.Array)]
  gather = jax.jit(lambda xs: [x[_sample_index(x.shape)] for x in xs])
  samples = dict(zip(on_device, jax.device_get(gather([items[i][1] for i in on_device]))))
  h = hashlib.sha256()
  for i, (path, leaf) in enumerate(items):
    h.update(f"{path}|{shapes[i]}|{np.dtype(getattr(leaf, 'dtype', np.asarray(leaf).dtype))}|".encode())
    if i in samples:
      values = samples[i]
    elif i in sampled:
      values = np.asarray(leaf)[_sample_index(shapes[i])]
    else:
      values = np.asarray(leaf).ravel()
    h.update(np.asarray(values, np.float64).tobytes())
  return h.hexdigest()[:32]


def _saveable(adapters: dict, extra: Tree) -> Tree:
  """Nested, string-keyed form (orbax-friendly; path strings are not valid names)."""
  nest = {}
  for path, ab in adapters.items():
    nest = combine(nest, _nest(path, ab))
  return {"adapters": nest, "extra": _str_keys(extra)}


def _nest(path: str, leaf) -> Tree:
  for part in reversed(path.split("/")):
    leaf = {part: leaf}
  return leaf


def _str_keys(tree: Tree) -> Tree:
  return {str(k): _str_keys(v) if isinstance(v, dict) else v for k, v in tree.items()}


def _unsaveable(saved: Tree, like_extra: Tree) -> tuple[dict, Tree]:
  flat = _flatten(saved["adapters"])
  adapters: dict[str, dict] = {}
  for path, leaf in flat.items():
    head, _, ab = path.rpartition("/")
    adapters.setdefault(head, {})[ab] = leaf
  extra = _replace(like_extra, _flatten(saved["extra"]))
  return adapters, extra


def save_adapters(directory: str, adapters: dict, extra: Tree, cfg: LoraConfig,
                  base_fingerprint: str) -> None:
  """Orbax checkpoint of {adapters, extra} + lora_config.json, published atomically.

  Written into a sibling temp dir, then renamed, so readers never see a half-written
  adapter. Single-process only.
  """
  import orbax.checkpoint as ocp  # heavy import, only needed here
  directory = os.path.abspath(os.fspath(directory))
  tmp = f"{directory}.tmp-{uuid.uuid4().hex[:8]}"
  os.makedirs(tmp)
  try:
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.join(tmp, _STATE_DIR), _saveable(adapters, extra))
    ckpt.wait_until_finished()
    meta = {"config": dataclasses.asdict(cfg), "base_fingerprint": base_fingerprint}
    with open(os.path.join(tmp, _CONFIG_FILE), "w") as f:
      json.dump(meta, f, indent=2)
    if os.path.exists(directory):
      old = f"{directory}.old-{uuid.uuid4().hex[:8]}"
      os.rename(directory, old)
      os.rename(tmp, directory)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _read_config(directory: str) -> tuple[LoraConfig, str]:
  path = os.path.join(directory, _CONFIG_FILE)
  if not os.path.isdir(directory):
    raise UserError(f"adapter directory {directory} does not exist; pass the directory written "
                    "by save_adapters")
  try:
    with open(path) as f:
      meta = json.load(f)
    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    cfg = LoraConfig(**{k: v for k, v in meta["config"].items() if k in fields})
    return cfg, str(meta["base_fingerprint"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise UserError(f"{path} is missing or corrupt ({type(e).__name__}: {e}); re-save the "
                    "adapter with save_adapters") from None


def load_adapters(directory: str, base: Tree, abstract: dict | None = None
                  ) -> tuple[dict, Tree, LoraConfig]:
  """(adapters, extra, cfg) saved by save_adapters; checks they were trained on ``base``.

  ``abstract``: optional {"adapters": ..., "extra": ...} of jax.ShapeDtypeStruct (with
  shardings) in the in-memory layout, to restore straight into a sharded layout. By
  default it is derived from ``base`` and the saved config, on the default device.
  """
  import orbax.checkpoint as ocp
  directory = os.path.abspath(os.fspath(directory))
  cfg, saved_fp = _read_config(directory)
  actual = fingerprint(base)
  if saved_fp != actual:
    raise UserError(f"adapter was trained on a different base model: {directory} expects base "
                    f"fingerprint {saved_fp}, this base is {actual}; load the matching base weights")
  if abstract is None:
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    to_abstract = lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype, sharding=dev)
    shapes = jax.eval_shape(lambda b: init_adapters(b, cfg, jax.random.key(0)), base)
    abstract = {"adapters": jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                                        sharding=dev), shapes),
                "extra": jax.tree.map(to_abstract, split_trainable(base, cfg)[0])}
  target = _saveable(abstract["adapters"], abstract["extra"])
  try:
    restored = ocp.StandardCheckpointer().restore(os.path.join(directory, _STATE_DIR), target)
  except (FileNotFoundError, ValueError, KeyError) as e:
    raise UserError(f"cannot restore adapters from {directory} ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}); re-save them with "
                    "save_adapters") from None
  adapters, extra = _unsaveable(restored, abstract["extra"])
  return adapters, extra, cfg
