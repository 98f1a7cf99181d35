"""ViT weights between timm / Hugging Face / big_vision names and jembed's models/vit.py.

timm's names are the pivot: Hugging Face `ViTModel` / `ViTForImageClassification`
(`vit.embeddings.*`, `vit.encoder.layer.i.*`, `vit.layernorm`, `classifier`) and big_vision /
AugReg `.npz` files (`embedding/kernel`, `cls`, `Transformer/posembed_input/pos_embedding`,
`Transformer/encoderblock_i/...`, `head`) are renamed to timm's (`patch_embed.proj`, `cls_token`,
`pos_embed`, `blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm` / `fc_norm`,
`head`), and one table maps those onto jembed's tree (the shared Transformer encoder's
`encoder/layers/i/...`). Torch Linear weights are (out, in), jembed kernels (in, out); the patch
convolution (D, C, p, p) becomes a Dense over (p, p, C)-ordered patches.
"""
from __future__ import annotations

import re

import numpy as np

from jembed.errors import UserError
from jembed.interop.resnet import SUPPORTED
from jembed.models import vit as vit_model


def is_vit(keys) -> bool:
  keys = set(keys)
  return ("patch_embed.proj.weight" in keys
          or any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in keys))


# ----------------------------------------------------------------------------- Hugging Face <-> timm


_HF_LAYER = {
    "layernorm_before": "norm1", "layernorm_after": "norm2", "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2",
}


def hf_to_timm(sd: dict) -> tuple[dict, bool]:
  """Hugging Face ViT names -> timm's ((q, k, v) fused into qkv); also whether a pooler was dropped
  (ViTModel's tanh pooler: jembed's features are the final-norm [CLS] state, as
  ViTForImageClassification uses)."""
  out, qkv, pooler = {}, {}, False
  for k, v in sd.items():
    n = re.sub(r"^vit\.", "", k)
    if n.startswith("pooler."):
      pooler = True
      continue
    n = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
         "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}.get(n, n)
    n = n.replace("embeddings.patch_embeddings.projection.", "patch_embed.proj.")
    n = re.sub(r"^classifier\.", "head.", n)
    m = re.match(r"encoder\.layer\.(\d+)\.(.*)\.(weight|bias)$", n)
    if m:
      i, mid, wb = m.groups()
      a = re.match(r"attention\.attention\.(query|key|value)$", mid)
      if a:
        qkv.setdefault((i, wb), {})[a.group(1)] = v
        continue
      n = f"blocks.{i}.{_HF_LAYER.get(mid, mid)}.{wb}"
    out[n] = v
  for (i, wb), parts in qkv.items():
    if set(parts) != {"query", "key", "value"}:
      raise UserError(f"the ViT weights of layer {i} lack some of query/key/value")
    out[f"blocks.{i}.attn.qkv.{wb}"] = np.concatenate([parts["query"], parts["key"], parts["value"]], 0)
  return out, pooler


def timm_to_hf(sd: dict) -> dict:
  """timm names -> ViTForImageClassification's."""
  inv = {v: k for k, v in _HF_LAYER.items()}
  out = {}
  for k, v in sd.items():
    n = {"cls_token": "vit.embeddings.cls_token", "pos_embed": "vit.embeddings.position_embeddings",
         "norm.weight": "vit.layernorm.weight", "norm.bias": "vit.layernorm.bias"}.get(k)
    if n is None and k.startswith("patch_embed.proj."):
      n = "vit.embeddings.patch_embeddings.projection." + k[len("patch_embed.proj."):]
    if n is None and k.startswith("head."):
      n = "classifier." + k[len("head."):]
    if n is None:
      i, mid, wb = re.match(r"blocks\.(\d+)\.(.*)\.(weight|bias)$", k).groups()
      if mid == "attn.qkv":
        for name, part in zip(("query", "key", "value"), np.split(v, 3, axis=0)):
          out[f"vit.encoder.layer.{i}.attention.attention.{name}.{wb}"] = np.ascontiguousarray(part)
        continue
      n = f"vit.encoder.layer.{i}.{inv[mid]}.{wb}"
    out[n] = v
  return out


# ----------------------------------------------------------------------------- big_vision .npz -> timm


def npz_to_timm(npz: dict, source: str) -> tuple[dict, int]:
  """big_vision / AugReg (vit_jax) arrays -> timm-named torch-layout arrays, and the head count
  (read off the query kernel (D, heads, head_dim)). The layout follows timm's own `_load_weights`
  for these files; a [CLS] token that big_vision adds after the position embeddings gets a zero
  position row (the same sum)."""
  w = {re.sub(r"^(params/|opt/target/)(img/)?", "", k): np.asarray(v) for k, v in npz.items()}
  if "embedding/kernel" not in w:
    raise UserError(f"{source} has no 'embedding/kernel'; it is not a big_vision / AugReg ViT .npz "
                    f"({SUPPORTED})")
  if any(k.startswith("pre_logits/") for k in w):
    raise UserError(f"{source} has a pre-logits layer (representation_size), which jembed's ViT does "
                    "not have; use a checkpoint without one (the AugReg fine-tuned ones)")
  used, out = set(), {}

  def take(k):
    if k not in w:
      raise UserError(f"{source} lacks '{k}'; the .npz is incomplete or not a ViT ({SUPPORTED})")
    used.add(k)
    return w[k].astype(np.float32)

  out["patch_embed.proj.weight"] = take("embedding/kernel").transpose(3, 2, 0, 1)
  out["patch_embed.proj.bias"] = take("embedding/bias")
  pos_key = next((k for k in ("Transformer/posembed_input/pos_embedding", "pos_embedding") if k in w), None)
  if pos_key is None:
    raise UserError(f"{source} has no learned position embedding; {SUPPORTED}")
  pos = take(pos_key)
  if "cls" in w:
    out["cls_token"] = take("cls")
    d = pos.shape[-1]
    n = pos.reshape(-1, d).shape[0]
    if int(np.sqrt(n)) ** 2 == n:  # big_vision: no position for [CLS]
      pos = np.concatenate([np.zeros((1, 1, d), np.float32), pos.reshape(1, n, d)], 1)
  out["pos_embed"] = pos.reshape(1, -1, pos.shape[-1])
  blocks = sorted({int(m.group(1)) for k in w for m in [re.match(r"Transformer/encoderblock_(\d+)/", k)] if m})
  heads = 0
  for i in blocks:
    p = f"Transformer/encoderblock_{i}/"
    mha = next(n for n in ("MultiHeadDotProductAttention_1", "MultiHeadDotProductAttention_0")
               if f"{p}{n}/query/kernel" in w)
    mlp = next(n for n in ("MlpBlock_3", "MlpBlock_0", "MlpBlock_1") if f"{p}{n}/Dense_0/kernel" in w)
    ln2 = "LayerNorm_2" if f"{p}LayerNorm_2/scale" in w else "LayerNorm_1"
    out[f"blocks.{i}.norm1.weight"] = take(f"{p}LayerNorm_0/scale")
    out[f"blocks.{i}.norm1.bias"] = take(f"{p}LayerNorm_0/bias")
    q = take(f"{p}{mha}/query/kernel")
    heads = int(q.shape[1])
    d = q.shape[0]
    kernels = [take(f"{p}{mha}/{n}/kernel").reshape(d, d).T for n in ("query", "key", "value")]
    out[f"blocks.{i}.attn.qkv.weight"] = np.concatenate(kernels, 0)
    out[f"blocks.{i}.attn.qkv.bias"] = np.concatenate(
        [take(f"{p}{mha}/{n}/bias").reshape(d) for n in ("query", "key", "value")])
    out[f"blocks.{i}.attn.proj.weight"] = take(f"{p}{mha}/out/kernel").reshape(d, d).T
    out[f"blocks.{i}.attn.proj.bias"] = take(f"{p}{mha}/out/bias")
    out[f"blocks.{i}.norm2.weight"] = take(f"{p}{ln2}/scale")
    out[f"blocks.{i}.norm2.bias"] = take(f"{p}{ln2}/bias")
    for j, fc in ((0, "fc1"), (1, "fc2")):
      out[f"blocks.{i}.mlp.{fc}.weight"] = take(f"{p}{mlp}/Dense_{j}/kernel").T
      out[f"blocks.{i}.mlp.{fc}.bias"] = take(f"{p}{mlp}/Dense_{j}/bias")
  out["norm.weight"] = take("Transformer/encoder_norm/scale")
  out["norm.bias"] = take("Transformer/encoder_norm/bias")
  if "head/kernel" in w:
    out["head.weight"] = take("head/kernel").T
    out["head.bias"] = take("head/bias")
  extra = sorted(k for k in w if k not in used)
  if extra:
    raise UserError(f"{source} has '{extra[0]}', which no supported ViT layout has; {SUPPORTED}")
  return {k: np.ascontiguousarray(v) for k, v in out.items()}, heads


# ----------------------------------------------------------------------------- timm <-> jembed


def infer(sd: dict, *, heads: int = 0, eps: float = 1e-6, hidden_act: str = "gelu",
          pooling: str = "", source: str = "") -> tuple[dict, tuple[int, int, int]]:
  """The `model.vit` description and the (H, W, C) image shape timm-named weights fit. `heads` 0 =
  hidden / 64 (every timm / DeiT / AugReg size has 64-wide heads; a config.json overrides it)."""
  proj = sd["patch_embed.proj.weight"]
  d, c, p = int(proj.shape[0]), int(proj.shape[1]), int(proj.shape[2])
  if proj.shape[2] != proj.shape[3]:
    raise UserError(f"{source} has non-square patches {tuple(proj.shape[2:])}; {SUPPORTED}")
  class_token = "cls_token" in sd
  n = int(sd["pos_embed"].shape[1]) - int(class_token)
  g = int(round(np.sqrt(n)))
  if g * g != n:
    raise UserError(f"{source} has {n} position embeddings, not a square grid; {SUPPORTED}")
  depth = len({int(m.group(1)) for k in sd for m in [re.match(r"blocks\.(\d+)\.", k)] if m})
  if depth == 0:
    raise UserError(f"{source} has no transformer blocks; {SUPPORTED}")
  heads = int(heads) or max(1, d // 64)
  if d % heads:
    raise UserError(f"{source}: hidden size {d} is not divisible by {heads} heads")
  fc_norm = "fc_norm.weight" in sd
  pooling = pooling or ("mean" if fc_norm or not class_token else "cls")
  cfg = dict(vit_model.DEFAULTS, size="", patch_size=p, hidden_size=d, num_layers=depth,
             num_heads=heads, mlp_dim=int(sd["blocks.0.mlp.fc1.weight"].shape[0]),
             layer_norm_eps=float(eps), hidden_act=hidden_act, class_token=class_token,
             pooling=pooling, fc_norm=fc_norm)
  return cfg, (g * p, g * p, c)


def to_jembed(sd: dict, cfg: dict, source: str) -> tuple[dict, tuple | None]:
  """timm-named weights -> (flat backbone params, head (kernel, bias) or None); every key used."""
  used = set()

  def take(k):
    if k not in sd:
      raise UserError(f"{source} lacks '{k}' of a ViT; the file is incomplete or another "
                      f"architecture ({SUPPORTED})")
    used.add(k)
    return np.asarray(sd[k], np.float32)

  d = int(cfg["hidden_size"])
  out = {}
  proj = take("patch_embed.proj.weight")
  out["patch_embed/kernel"] = proj.transpose(2, 3, 1, 0).reshape(-1, d)
  out["patch_embed/bias"] = take("patch_embed.proj.bias")
  if cfg["class_token"]:
    out["cls"] = take("cls_token").reshape(1, 1, d)
  out["position"] = take("pos_embed").reshape(1, -1, d)
  for i in range(int(cfg["num_layers"])):
    b, e = f"blocks.{i}.", f"encoder/layers/{i}/"
    dense = lambda name: take(b + name + ".weight").T
    qkv_w = take(b + "attn.qkv.weight")
    qkv_b = sd.get(b + "attn.qkv.bias")
    used.add(b + "attn.qkv.bias")
    # A checkpoint without qkv biases computes the same with zero ones.
    qkv_b = np.zeros(3 * d, np.float32) if qkv_b is None else np.asarray(qkv_b, np.float32)
    for j, name in enumerate(("query", "key", "value")):
      out[f"{e}attention/{name}/kernel"] = qkv_w[j * d:(j + 1) * d].T
      out[f"{e}attention/{name}/bias"] = qkv_b[j * d:(j + 1) * d]
    out[f"{e}attention/out/kernel"] = dense("attn.proj")
    out[f"{e}attention/out/bias"] = take(b + "attn.proj.bias")
    for ours, theirs in (("attention_norm", "norm1"), ("mlp_norm", "norm2")):
      out[f"{e}{ours}/scale"] = take(f"{b}{theirs}.weight")
      out[f"{e}{ours}/bias"] = take(f"{b}{theirs}.bias")
    out[f"{e}mlp/wi/kernel"] = dense("mlp.fc1")
    out[f"{e}mlp/wi/bias"] = take(b + "mlp.fc1.bias")
    out[f"{e}mlp/wo/kernel"] = dense("mlp.fc2")
    out[f"{e}mlp/wo/bias"] = take(b + "mlp.fc2.bias")
  norm = "fc_norm" if cfg["fc_norm"] else "encoder/final_norm"
  theirs = "fc_norm" if cfg["fc_norm"] else "norm"
  out[f"{norm}/scale"] = take(f"{theirs}.weight")
  out[f"{norm}/bias"] = take(f"{theirs}.bias")
  head = None
  if "head.weight" in sd:
    head = (take("head.weight").T, take("head.bias"))
  extra = sorted(k for k in sd if k not in used)
  if extra:
    raise UserError(f"{source} has '{extra[0]}', which no supported ViT layout has; {SUPPORTED}")
  return {k: np.ascontiguousarray(v) for k, v in out.items()}, head


def from_jembed(params: dict, cfg: dict, image_shape, head=None) -> dict:
  """Flat backbone params (jembed paths) -> timm-named torch-layout float32 arrays."""
  d = int(cfg["hidden_size"])
  p = int(cfg["patch_size"])
  c = int(image_shape[-1])
  f = lambda k: np.asarray(params[k], np.float32)
  out = {"patch_embed.proj.weight": f("patch_embed/kernel").reshape(p, p, c, d).transpose(3, 2, 0, 1),
         "patch_embed.proj.bias": f("patch_embed/bias")}
  if "cls" in params:
    out["cls_token"] = f("cls")
  out["pos_embed"] = f("position")
  for i in range(int(cfg["num_layers"])):
    b, e = f"blocks.{i}.", f"encoder/layers/{i}/"
    out[b + "norm1.weight"], out[b + "norm1.bias"] = f(e + "attention_norm/scale"), f(e + "attention_norm/bias")
    out[b + "attn.qkv.weight"] = np.concatenate([f(f"{e}attention/{n}/kernel").T for n in ("query", "key", "value")], 0)
    out[b + "attn.qkv.bias"] = np.concatenate([f(f"{e}attention/{n}/bias") for n in ("query", "key", "value")])
    out[b + "attn.proj.weight"], out[b + "attn.proj.bias"] = f(e + "attention/out/kernel").T, f(e + "attention/out/bias")
    out[b + "norm2.weight"], out[b + "norm2.bias"] = f(e + "mlp_norm/scale"), f(e + "mlp_norm/bias")
    out[b + "mlp.fc1.weight"], out[b + "mlp.fc1.bias"] = f(e + "mlp/wi/kernel").T, f(e + "mlp/wi/bias")
    out[b + "mlp.fc2.weight"], out[b + "mlp.fc2.bias"] = f(e + "mlp/wo/kernel").T, f(e + "mlp/wo/bias")
  if "fc_norm/scale" in params:
    out["fc_norm.weight"], out["fc_norm.bias"] = f("fc_norm/scale"), f("fc_norm/bias")
  else:
    out["norm.weight"], out["norm.bias"] = f("encoder/final_norm/scale"), f("encoder/final_norm/bias")
  if head is not None:
    out["head.weight"], out["head.bias"] = np.asarray(head[0], np.float32).T, np.asarray(head[1], np.float32)
  return {k: np.ascontiguousarray(v) for k, v in out.items()}
