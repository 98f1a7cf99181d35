"""Warm starts for every task, from `config.init`: a jembed workdir or a Hugging Face directory.

    --config.init.checkpoint=runs/mlm        a jembed workdir (its latest checkpoint, or init.step)
    --config.init.hf=path/to/all-MiniLM-L6-v2  a transformers / sentence-transformers directory
    --config.init.pretrained=resnet18.pth    a pretrained image model: torchvision / timm / Hugging
                                             Face ResNet or ViT, big_vision .npz (jembed/interop)

A source is resolved before any data is read: it brings the model description it was trained with
(so a task takes the architecture, tokenizer and pooling from it) and, when the loop asks, its
parameters. `warm_start` copies them onto the freshly initialised (sharded) state: every backbone
parameter must be there with the same shape (or the run stops with one line naming the first that
is not), heads are copied only when the source was trained for the same task, and parameters a
tuning adds (adapters) may be missing. A new source kind is one more `_open_*` function.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import jax
import numpy as np

from jembed import checkpoint as ckpt_lib
from jembed import config as config_lib
from jembed import fs, hf, interop, modelspec, tree
from jembed.errors import UserError
from jembed.models import vit as vit_model
from jembed.tasks import task_class


@dataclasses.dataclass
class Source:
  kind: str                        # "workdir" | "hf" | "pretrained"
  path: str
  spec: dict[str, Any]             # the source model's description (modelspec), task included
  load: Callable[[], tuple[dict, dict]]   # -> (params, model_state) of the source's task model
  tokenizer: Any = None            # a tokenizers.Tokenizer, when the source has one
  description: str = ""
  # (path, value, target shape) -> value for a parameter whose shape legitimately differs (a ViT's
  # position table at another image size); None: a differing shape is an architecture mismatch.
  adapt: Callable[[str, np.ndarray, tuple], np.ndarray] | None = None
  note: str = ""                   # what warm_start did with the source's head, for the run log

  @property
  def task(self) -> str:
    return self.spec.get("task", "")

  @property
  def backbone(self) -> str:
    """The attribute of the source's task model that holds its backbone."""
    if self.kind == "hf":
      return "encoder"
    return task_class(self.task).backbone_of(self.spec)


def source_from_config(config) -> Source | None:
  init = config_lib.complete(config).init
  checkpoint, hf_dir = str(init.checkpoint or ""), str(init.hf or "")
  pretrained = str(init.pretrained or "")
  named = [k for k, v in (("checkpoint", checkpoint), ("hf", hf_dir), ("pretrained", pretrained)) if v]
  if len(named) > 1:
    raise UserError(f"config.init.{named[0]} and config.init.{named[1]} are both set; a run warm-starts "
                    "from one source: clear one of them")
  if pretrained:
    image_task = config.task in ("rotation", "simclr") or (
        config.task == "classification" and config.data.modality == "image")
    if not image_task:
      raise UserError("config.init.pretrained is for image tasks (rotation, simclr, image "
                      "classification); warm-start a text model with config.init.hf")
    return open_pretrained(pretrained)
  if checkpoint:
    return open_workdir(checkpoint, int(init.step or 0) or None)
  if hf_dir:
    return open_hf(hf_dir)
  return None


def open_workdir(workdir: str, step: int | None = None) -> Source:
  if not fs.isdir(workdir):
    raise UserError(f"init.checkpoint '{workdir}' does not exist; point it at the --workdir of a "
                    "jembed run")
  spec = modelspec.read(workdir)
  if spec is None:
    raise UserError(f"init.checkpoint '{workdir}' has no {modelspec.MODEL_FILE}; it is not a jembed "
                    "workdir, or was written by a jembed older than 0.2: retrain it, or point "
                    "init.hf at a Hugging Face directory")
  tokenizer = None
  tok_file = spec.get("tokenizer")
  if tok_file:
    import tokenizers
    tokenizer = tokenizers.Tokenizer.from_str(fs.read_text(fs.join(workdir, tok_file)))

  def load():
    state, restored = ckpt_lib.restore_params_only(workdir, step)
    params = modelspec.dense_params(workdir, state)
    return params, dict(state.get("model_state") or {})

  return Source("workdir", workdir, spec, load, tokenizer, description=f"{workdir} (jembed workdir)")


def open_hf(path: str) -> Source:
  model = hf.load_dir(path)
  spec = {"task": "mlm" if model.mlm_head is not None else "hf",
          "encoder": dict(model.encoder_config), "pooling": model.pooling,
          "normalize": bool(model.normalize), "max_seq_length": int(model.max_seq_length)}
  params = {"encoder": model.params}
  if model.mlm_head is not None:
    params["mlm_head"] = model.mlm_head
  return Source("hf", path, spec, lambda: (params, {}), model.tokenizer,
                description=f"{path} (Hugging Face directory)")


def open_pretrained(path: str) -> Source:
  """A pretrained image model (jembed/interop): its architecture, preprocessing and head come along."""
  imported = interop.open_image_model(path)
  spec = imported.spec
  backbone = spec["backbone"]

  def adapt(name: str, value: np.ndarray, shape: tuple) -> np.ndarray:
    if backbone["backbone"] != "vit" or not name.endswith("backbone/position"):
      return value
    cls = int(bool(backbone["vit"].get("class_token", True)))
    old, new = value.shape[1] - cls, shape[1] - cls
    og, ng = int(round(np.sqrt(old))), int(round(np.sqrt(new)))
    if ng * ng != new:
      raise UserError(f"{path}: position embeddings can be resampled to square images only; set "
                      "data.image_size=N")
    return vit_model.resample_position(value, (og, og), (ng, ng), bool(cls))

  return Source("pretrained", path, spec, lambda: (imported.params, imported.model_state),
                description=imported.description, adapt=adapt)


def _head_note(source: Source, src_params: dict, params: dict) -> str:
  """Whether the pretrained source's classifier head was restored, in words for the log."""
  theirs = tree.flatten(src_params.get("head") or {})
  ours = tree.flatten(params.get("head") or {}) if isinstance(params, dict) else {}
  if not theirs:
    return "the source has no classifier head: the head starts fresh"
  n_src = len(source.spec.get("class_names") or [])
  if ours and all(k in ours and tuple(ours[k].shape) == tuple(v.shape) for k, v in theirs.items()):
    return f"classifier head restored from the source ({n_src} classes)"
  return f"fresh classifier head (the source has {n_src} classes, this run a different head)"


def warm_start(source: Source, params: dict, model_state: dict, *, backbone: str, same_task: bool,
               allow_missing: str | None = None) -> tuple[dict, dict]:
  """`params` / `model_state` with the source's values copied in, each placed with the sharding of
  the leaf it replaces."""
  src_params, src_state = source.load()
  if source.kind == "pretrained":
    source.note = (_head_note(source, src_params, params) if same_task
                   else "backbone only (the source's head is for another task)")
  params = _copy(params, src_params, source, backbone, same_task, allow_missing, "parameter")
  if model_state:
    model_state = _copy(model_state, src_state, source, backbone, same_task, None,
                        "BatchNorm statistic")
  return params, model_state


def _copy(target: dict, source_tree: dict, source: Source, backbone: str, same_task: bool,
          allow_missing: str | None, what: str) -> dict:
  src_prefix, prefix = source.backbone + "/", backbone + "/"
  have = {}
  for path, leaf in tree.flatten(source_tree).items():
    if path.startswith(src_prefix):
      have[prefix + path[len(src_prefix):]] = leaf
    elif same_task:
      have[path] = leaf
  want = tree.flatten(target)
  if not any(p.startswith(prefix) for p in have) and any(p.startswith(prefix) for p in want):
    raise UserError(f"{source.description} has no {what}s under '{source.backbone}/'; it is not a "
                    "checkpoint of this kind of backbone")
  new = {}
  for path, leaf in want.items():
    if path not in have:
      if not path.startswith(prefix) or (allow_missing and re.search(allow_missing, path)):
        continue  # a fresh head, or what the tuning adds
      raise UserError(f"architecture mismatch: {what} '{path}' {tuple(leaf.shape)} is not in "
                      f"{source.description}; use the source's model settings")
    value = np.asarray(jax.device_get(have[path]))
    if value.shape != tuple(leaf.shape) and source.adapt is not None:
      value = source.adapt(path, value, tuple(leaf.shape))
    if value.shape != tuple(leaf.shape):
      if not path.startswith(prefix):
        continue  # a head of another size (e.g. other classes): trained afresh
      raise UserError(f"architecture mismatch at {what} '{path}': the model has shape "
                      f"{tuple(leaf.shape)}, {source.description} {value.shape}; use the source's "
                      "model settings (leave config.model fields at 0/'' to take them from it)")
    new[path] = jax.device_put(value.astype(leaf.dtype), leaf.sharding)
  extra = sorted(p for p in have if p.startswith(prefix) and p not in want)
  if extra:
    raise UserError(f"architecture mismatch: {source.description} has {what} '{extra[0]}', which "
                    "this model lacks; use the source's model settings")
  return tree.replace(target, new)
