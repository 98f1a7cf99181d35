"""LoRA as a pure transform of the parameter tree.

The base tree (``nnx.to_pure_dict`` output) stays frozen and untouched; the low-rank
factors live in a separate flat dict keyed by jembed.tree path
(``"layers/0/attention/query/kernel"``). ``apply`` folds them into the kernels
(``W + s * A @ B``) so any model runs unchanged on the result, and gradients are taken
w.r.t. the adapters (and optional ``extra`` leaves) only, so the optimizer never holds
state for the base.

Shapes: a kernel ``W`` of shape ``(*in_dims, out)`` gets ``A: (*in_dims, r)`` and
``B: (r, out)``. For 2-D dense kernels that is ``(in, r)`` / ``(r, out)``; for conv kernels
``(kh, kw, in, out)`` A keeps the ``(kh, kw, in)`` dims instead of flattening them,
because a flattened A sharded on its first dim would split ``kh`` rather than ``in`` and
the merge would then need an all-to-all. The math is the same as flattening
(``einsum('...r,ro->...o')``), equivalent to PEFT's "conv A + 1x1 conv B".

Dropout: PEFT drops the LoRA *input* per example, which needs x @ A computed apart from x @ W. In
merged mode we drop whole rows of A (input features of the low-rank path) with rate p,
rescaled by 1/(1-p): the same mask for every example in the batch, fresh per step.

Targets, exclude and trainable are regexes applied with ``re.search`` to the path string
(anchor with ``^``/``$`` when needed). ``targets`` may also be a preset name.

``LoraTuning`` keeps the adapters in the train state nested like the base tree (``{"a", "b"}``
in place of each adapted kernel), beside the fully trained ``extra`` leaves.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jembed import fs, tree
from jembed.errors import UserError
from jembed.peft import export
from jembed.peft.base import HEAD_REGEX, Tuning, count

Tree = dict[Any, Any]

# Preset -> (regex over paths, kernel ndims it may match). Embeddings are named
# "embedding" in NNX, so "kernel" never matches them.
PRESETS: dict[str, tuple[str, tuple[int, ...]]] = {
    "attention_qv": (r"(^|/)attention/(query|value)/kernel$", (2,)),
    "attention": (r"(^|/)attention/(query|key|value|out)/kernel$", (2,)),
    "all_dense": (r"(^|/)kernel$", (2,)),
    "all_dense_and_conv": (r"(^|/)kernel$", (2, 4)),
}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA hyper-parameters and which leaves they apply to (see module docstring). The defaults
  are those of the `peft` config section (configs/common.py; a test keeps them equal)."""
  rank: int = 8
  alpha: float = 16.0
  rslora: bool = False
  dropout: float = 0.0
  targets: str = "attention_qv"
  exclude: str = HEAD_REGEX
  trainable: str = HEAD_REGEX

  def __post_init__(self):
    if self.rank < 1:
      raise UserError(f"LoRA rank must be >= 1, got {self.rank}; set lora.rank to a positive int")
    if not 0.0 <= self.dropout < 1.0:
      raise UserError(f"LoRA dropout must be in [0, 1), got {self.dropout}; fix lora.dropout")
    for name in ("targets", "exclude", "trainable"):
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

  @classmethod
  def from_peft(cls, peft: Any) -> "LoraConfig":
    """From a `peft` config section; fields it lacks take these defaults."""
    return cls(**{f.name: type(f.default)(peft[f.name]) for f in dataclasses.fields(cls)
                  if f.name in peft})


# ----------------------------------------------------------------------------- targets


def _target_regex(cfg: LoraConfig) -> tuple[str, tuple[int, ...]]:
  if cfg.targets in PRESETS:
    return PRESETS[cfg.targets]
  return cfg.targets, (2, 4)


def lora_targets(base: Tree, cfg: LoraConfig) -> list[str]:
  """Sorted paths of the kernels LoRA applies to (matched by re.search, ndim 2 or 4)."""
  regex, ndims = _target_regex(cfg)
  found = []
  for path, leaf in tree.flatten(base).items():
    if np.ndim(leaf) not in ndims or not re.search(regex, path):
      continue
    if cfg.exclude and re.search(cfg.exclude, path):
      continue
    found.append(path)
  if not found:
    kernels = [p for p, x in tree.flatten(base).items() if np.ndim(x) in (2, 4)][:6]
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
  shapes = tuple(tuple(np.shape(tree.get(base, p))) for p in paths)
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

  ``extra`` (fully trained leaves) overrides base leaves. Leaves that are neither adapted nor
  in extra are passed through as the same objects. With ``dropout_key`` (training), rows of A
  are dropped at rate cfg.dropout; without it this is the dense tree for export. Jit-able and
  differentiable w.r.t. adapters and extra.
  """
  params = tree.merge(base, extra) if extra else base
  merged = {}
  for i, path in enumerate(sorted(adapters)):
    a, b = adapters[path]["a"], adapters[path]["b"]
    if dropout_key is not None and cfg.dropout > 0:
      a = _drop_rows(a, cfg.dropout, jax.random.fold_in(dropout_key, i))
    merged[path] = _merge_one(tree.get(params, path), a, b, cfg.scale)
  return tree.replace(params, merged)


# ----------------------------------------------------------------------------- sharding


def adapter_partition_specs(base_specs: Tree, adapters: dict) -> dict:
  """Specs for the adapters from the base kernels' specs (PartitionSpec or name tuples).

  A inherits the kernel's input-dim specs with the rank dim replicated; B has the rank dim
  replicated and the output-dim spec. A @ B contracts an unsharded axis, so the delta is
  produced directly in W's layout with no communication.
  """
  out = {}
  for path, ab in adapters.items():
    spec = tree.get(base_specs, path)
    ndim = np.ndim(ab["a"])
    dims = tuple(spec) + (None,) * (ndim - len(tuple(spec)))
    make = (lambda *d: jax.sharding.PartitionSpec(*d)) if isinstance(
        spec, jax.sharding.PartitionSpec) else (lambda *d: tuple(d))
    out[path] = {"a": make(*dims[:-1], None), "b": make(None, dims[-1])}
  return out


# ----------------------------------------------------------------------------- the tuning


def nest(adapters: dict, like: Tree | None = None) -> Tree:
  """{path: {"a", "b"}} -> a tree with {"a", "b"} where each adapted kernel is (key types of `like`)."""
  return tree.unflatten({f"{p}/{k}": v for p, ab in adapters.items() for k, v in ab.items()}, like)


def flat(nested: Tree) -> dict:
  """The inverse of `nest`: {kernel path: {"a", "b"}}."""
  out: dict = {}
  for path, leaf in tree.flatten(nested).items():
    kernel, _, ab = path.rpartition("/")
    out.setdefault(kernel, {})[ab] = leaf
  return out


class LoraTuning(Tuning):
  """Trained: {"adapters": low-rank factors nested like the base, "extra": the base leaves matching
  cfg.trainable, trained in full}; frozen: the rest of the base. `combine` folds W + s * A @ B into
  the base inside the step; `export` writes the adapter-only checkpoint and the merged weights."""
  name = "lora"

  def __init__(self, cfg: LoraConfig | None = None):
    self.cfg = cfg or LoraConfig()
    self._trainable = re.compile(self.cfg.trainable) if self.cfg.trainable else None

  def trains(self, path, leaf):
    return self._trainable is not None and self._trainable.search(path) is not None

  def split(self, params, key):
    extra, frozen = super().split(params, key)
    adapters = init_adapters(params, self.cfg, key)
    return {"adapters": nest(adapters, like=params), "extra": extra}, frozen

  def split_specs(self, specs, abstract_params):
    extra, frozen = super().split_specs(specs, abstract_params)
    shapes = jax.eval_shape(lambda p: init_adapters(p, self.cfg, jax.random.key(0)), abstract_params)
    adapter_specs = adapter_partition_specs(specs, shapes)
    return {"adapters": nest(adapter_specs, like=specs), "extra": extra}, frozen

  def combine(self, trained, frozen, *, rng=None, train=False):
    return apply(frozen, flat(trained["adapters"]), self.cfg, extra=trained["extra"],
                 dropout_key=rng if train else None)

  def export(self, workdir, state):
    export.export_lora(workdir, self, state.params, state.frozen)

  def describe(self, trained, frozen):
    n_ad, n_extra = count(trained["adapters"]), count(trained["extra"])
    base = count(frozen) + n_extra
    return (f"lora (rank {self.cfg.rank}, alpha {self.cfg.alpha}{', rsLoRA' if self.cfg.rslora else ''},"
            f" {len(flat(trained['adapters']))} kernels): {n_ad + n_extra:,} trained parameters"
            f" ({n_ad:,} LoRA + {n_extra:,} extra) on a {base:,}-parameter base"
            f" ({100 * (n_ad + n_extra) / max(base, 1):.2f}%)")


def read_adapter_config(directory: str) -> tuple[LoraConfig, str]:
  path = fs.join(directory, export.CONFIG_FILE)
  if not fs.isdir(directory):
    raise UserError(f"adapter directory {directory} does not exist; pass the directory written "
                    "by save_adapters (WORKDIR/lora_adapter)")
  try:
    meta = json.loads(fs.read_text(path))
    return LoraConfig.from_peft(meta["config"]), str(meta["base_fingerprint"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise UserError(f"{path} is missing or corrupt ({type(e).__name__}: {e}); re-save the "
                    "adapter with save_adapters") from None


def load_adapters(directory: str, frozen: dict, extra_like: dict) -> tuple[dict, LoraConfig]:
  """(trained, cfg) from an adapter-only checkpoint, for `LoraTuning(cfg).combine(trained, frozen)`.
  `frozen` is the base the adapters were trained on (refused otherwise); `extra_like` has the
  structure of the trained extras (e.g. a fresh head). Leaves keep `frozen`'s and `extra_like`'s
  shardings (the default device where they have none)."""
  import orbax.checkpoint as ocp
  directory = fs.absolute(directory)
  cfg, saved_fp = read_adapter_config(directory)
  actual = export.fingerprint(frozen)
  if saved_fp != actual:
    raise UserError(f"adapter was trained on a different base model: {directory} expects base "
                    f"fingerprint {saved_fp}, this base is {actual}; load the matching base weights")
  full = tree.merge(frozen, extra_like)
  shapes = jax.eval_shape(lambda p: init_adapters(p, cfg, jax.random.key(0)), full)
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  like = lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                        sharding=getattr(x, "sharding", None) or dev)
  abstract = {"adapters": jax.tree.map(like, nest(shapes, like=frozen)),
              "extra": jax.tree.map(like, extra_like)}
  try:
    trained = ocp.StandardCheckpointer().restore(fs.path(fs.join(directory, export.STATE_DIR)), abstract)
  except (FileNotFoundError, ValueError, KeyError) as e:
    raise UserError(f"cannot restore adapters from {directory} ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}); re-save them with "
                    "save_adapters") from None
  return trained, cfg
