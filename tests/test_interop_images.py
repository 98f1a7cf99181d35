"""Pretrained image models in and out (jembed/interop): torchvision / timm / Hugging Face ResNet and
ViT, big_vision .npz, the torch-free .pth reader, init.pretrained fine-tuning and the Hugging Face
export. Parity tests feed the same normalised NCHW / NHWC input to both sides in eval mode and skip
without torch; the torch-free round trips always run."""
import io
import json
import os
import pickle
import sys
import types
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from jembed import init as init_lib
from jembed import modelspec, train, tree
from jembed.errors import UserError
from jembed.interop import hf_image, open_image_model
from jembed.interop import resnet as resnet_io
from jembed.interop import torchzip
from jembed.interop import vit as vit_io
from jembed.models import vit as vit_model
from jembed.models.resnet import ResNet
from spine_helpers import load_config_file

TOL = 1e-4
X = np.random.RandomState(0).randn(2, 3, 32, 32).astype(np.float32)  # normalised NCHW input
XJ = jnp.asarray(X.transpose(0, 2, 3, 1))


def _torch():
  # torchvision's compiled ops are stubbed for every test in tests/conftest.py.
  return pytest.importorskip("torch")


def _max_diff(a, b) -> float:
  return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


def _check(path, logits_ref, features_ref):
  imp = open_image_model(str(path))
  model = imp.build()
  assert _max_diff(model.features(XJ), features_ref) < TOL
  if logits_ref is not None:
    assert _max_diff(model(XJ), logits_ref) < TOL
  return imp


# ----------------------------------------------------------------------------- torch-free


@pytest.fixture(scope="module")
def tiny_resnet(tmp_path_factory):
  """A ResNet-18 of width 8 written torch-free in torchvision's layout (non-trivial BN statistics,
  a 10-class head), as .safetensors."""
  # Shapes only (no eager init): weights drawn with NumPy, He-scaled so activations stay O(1).
  m = nnx.eval_shape(lambda: ResNet(depth=18, width=8, stem="imagenet", num_stages=4, rngs=nnx.Rngs(0)))
  rng = np.random.RandomState(1)

  def draw(path, leaf):
    if path.endswith("kernel"):
      return (rng.randn(*leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))).astype(np.float32)
    return (float(path.endswith("scale")) + 0.1 * rng.randn(*leaf.shape)).astype(np.float32)

  params = {k: draw(k, v) for k, v in tree.flatten(nnx.to_pure_dict(nnx.state(m, nnx.Param))).items()}
  stats = {k: rng.rand(*v.shape).astype(np.float32) + (0.5 if k.endswith("var") else -0.5)
           for k, v in tree.flatten(nnx.to_pure_dict(nnx.state(m, nnx.BatchStat))).items()}
  head = (0.1 * rng.randn(64, 10).astype(np.float32), 0.1 * rng.randn(10).astype(np.float32))
  sd = resnet_io.from_jembed(params, stats, dict(depth=18, num_stages=4), head)
  path = tmp_path_factory.mktemp("tiny") / "tiny_r18.safetensors"
  save_file(sd, str(path), metadata={"format": "pt"})
  return str(path), sd, params, stats


def test_resnet_safetensors_round_trip_is_exact(tiny_resnet):
  path, sd, params, stats = tiny_resnet
  imp = open_image_model(path)
  assert imp.format == "torchvision" and imp.head
  assert imp.spec["backbone"]["resnet"]["depth"] == 18 and imp.spec["backbone"]["resnet"]["width"] == 8
  assert imp.spec["preprocess"]["mean"] == [0.485, 0.456, 0.406] and imp.spec["class_names"][0] == "0"
  got = tree.flatten(imp.params["backbone"])
  assert all(np.array_equal(got[k], params[k]) for k in params)
  got_stats = tree.flatten(imp.model_state["backbone"])
  assert all(np.array_equal(got_stats[k], stats[k]) for k in stats)
  back = resnet_io.from_jembed(got, got_stats, imp.spec["backbone"]["resnet"],
                               (imp.params["head"]["dense"]["kernel"], imp.params["head"]["dense"]["bias"]))
  assert set(back) == set(sd) and all(np.array_equal(back[k], sd[k]) for k in sd)


def test_uint8_input_is_normalised_with_the_declared_preprocess(tiny_resnet):
  model = open_image_model(tiny_resnet[0]).build()
  img = np.random.RandomState(2).randint(0, 256, (2, 32, 32, 3)).astype(np.uint8)
  mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
  by_hand = (img.astype(np.float32) / 255.0 - mean) / std
  assert _max_diff(model(jnp.asarray(img)), model(jnp.asarray(by_hand))) < 1e-5
  assert _max_diff(model(jnp.asarray(img)), model(jnp.asarray(img / 255.0, jnp.float32))) > 1e-3


def _write_torch_zip(path, pkl: bytes, storages: dict | None = None):
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", pkl)
    z.writestr("archive/byteorder", "little")
    for k, v in (storages or {}).items():
      z.writestr(f"archive/data/{k}", v)


CALLED = []


def _mark(x):
  CALLED.append(x)


class _Harmless:
  def __reduce__(self):
    return (_mark, ("ran",))


def test_pickle_with_a_non_tensor_global_is_refused_without_running_it(tmp_path):
  path = tmp_path / "evil.pth"
  _write_torch_zip(path, pickle.dumps({"w": _Harmless()}, protocol=2))
  with pytest.raises(UserError, match="refusing to unpickle GLOBAL .*_mark: jembed loads tensors only"):
    open_image_model(str(path))
  assert CALLED == []


def test_bad_files_are_one_line_each(tmp_path, tiny_resnet):
  cases = {}
  legacy = tmp_path / "legacy.pth"
  legacy.write_bytes(pickle.dumps({"a": 1}, protocol=2))
  cases[legacy] = "legacy"
  data = open(tiny_resnet[0], "rb").read()
  cut = tmp_path / "cut.safetensors"
  cut.write_bytes(data[:len(data) // 2])
  cases[cut] = "truncated"
  zipped = io.BytesIO()
  _write_torch_zip(zipped, pickle.dumps({"a": 1}, protocol=2) * 50)
  cutzip = tmp_path / "cut.pth"
  cutzip.write_bytes(zipped.getvalue()[:len(zipped.getvalue()) // 2])
  cases[cutzip] = "truncated or damaged"
  sd = {k: v for k, v in open_image_model.__globals__["read_weights"](tiny_resnet[0]).items()}
  extra = dict(sd, **{"layer1.0.se.fc.weight": np.zeros((2, 2), np.float32)})
  save_file(extra, str(tmp_path / "extra.safetensors"))
  cases[tmp_path / "extra.safetensors"] = "'layer1.0.se.fc.weight', which no supported ResNet layout"
  resnext = dict(sd)
  w = sd["layer1.0.conv2.weight"]
  resnext["layer1.0.conv2.weight"] = np.zeros((w.shape[0], w.shape[1] // 2, 3, 3), np.float32)
  for k in ("layer1.0.conv1.weight",):
    resnext[k] = sd[k]
  save_file(resnext, str(tmp_path / "resnext.safetensors"))
  cases[tmp_path / "resnext.safetensors"] = "ResNeXt|grouped"
  eff = {"conv_stem.weight": np.zeros((8, 3, 3, 3), np.float32), "bn1.weight": np.zeros(8, np.float32),
         "blocks.0.0.conv_dw.weight": np.zeros((8, 1, 3, 3), np.float32)}
  save_file(eff, str(tmp_path / "efficientnet.safetensors"))
  cases[tmp_path / "efficientnet.safetensors"] = "match no supported layout; jembed imports ResNet-18/34/50/101"
  cases[tmp_path / "missing.pth"] = "does not exist"
  for path, pattern in cases.items():
    with pytest.raises(UserError, match=pattern) as e:
      open_image_model(str(path))
    assert "\n" not in str(e.value), path


def _tiny_vit(image=32, class_token=True, pooling="cls", fc_norm=False):
  cfg = dict(vit_model.DEFAULTS, size="", patch_size=8, hidden_size=32, num_layers=2, num_heads=2,
             mlp_dim=64, class_token=class_token, pooling=pooling, fc_norm=fc_norm)
  return cfg, vit_model.vit_from_config(cfg, image_shape=(image, image, 3), rngs=nnx.Rngs(3))


def test_vit_round_trips_and_position_resampling(tmp_path):
  cfg, m = _tiny_vit()
  params = {k: np.asarray(v) for k, v in tree.flatten(nnx.to_pure_dict(nnx.state(m, nnx.Param))).items()}
  sd = vit_io.from_jembed(params, cfg, (32, 32, 3))
  back, head = vit_io.to_jembed(sd, cfg, "x")
  assert head is None and set(back) == set(params) and all(np.array_equal(back[k], params[k]) for k in params)
  hf = vit_io.hf_to_timm(vit_io.timm_to_hf(sd))[0]
  assert set(hf) == set(sd) and all(np.array_equal(hf[k], sd[k]) for k in sd)
  # resampling: [CLS] row kept, a constant grid stays constant, same grid is the identity
  pos = params["position"]
  assert np.array_equal(vit_model.resample_position(pos, (4, 4), (4, 4), True), pos)
  const = np.concatenate([pos[:, :1], np.full((1, 16, 32), 0.25, np.float32)], 1)
  big = vit_model.resample_position(const, (4, 4), (6, 6), True)
  assert big.shape == (1, 37, 32) and np.array_equal(big[:, 0], pos[:, 0]) and np.allclose(big[:, 1:], 0.25)
  # init.pretrained at another image size: warm_start resamples the position table
  path = tmp_path / "vit.safetensors"
  save_file(sd, str(path))
  source = init_lib.open_pretrained(str(path))
  assert source.spec["backbone"]["vit"]["num_heads"] == 1  # a bare file: hidden / 64 heads
  spec = dict(source.spec, image_shape=[48, 48, 3], class_names=["a", "b"])
  target = modelspec.build(spec, nnx.Rngs(params=0, dropout=0))
  ours = nnx.to_pure_dict(nnx.state(target, nnx.Param))
  new, _ = init_lib.warm_start(source, ours, {}, backbone="backbone", same_task=True)
  got = np.asarray(new["backbone"]["position"])
  assert got.shape == (1, 37, 32) and np.array_equal(got[:, 0], pos[:, 0])
  assert np.allclose(got[:, 1:], vit_model.resample_position(pos, (4, 4), (6, 6), True)[:, 1:])
  assert "no classifier head" in source.note


def test_head_restored_or_fresh(tiny_resnet):
  source = init_lib.open_pretrained(tiny_resnet[0])
  for classes, restored in ((10, True), (3, False)):
    spec = dict(source.spec, image_shape=[32, 32, 3], class_names=[str(i) for i in range(classes)])
    model = modelspec.build(spec, nnx.Rngs(params=0, dropout=0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    fresh = np.asarray(params["head"]["dense"]["kernel"])
    new, new_stats = init_lib.warm_start(source, params, stats, backbone="backbone", same_task=True)
    kernel = np.asarray(new["head"]["dense"]["kernel"])
    if restored:
      assert np.array_equal(kernel, tiny_resnet[1]["fc.weight"].T) and "restored" in source.note
    else:
      assert np.array_equal(kernel, fresh) and "fresh classifier head" in source.note
    assert np.array_equal(np.asarray(new_stats["backbone"]["stem_norm"]["var"]),
                          tiny_resnet[1]["bn1.running_var"])


def test_init_pretrained_refusals(tmp_path, tiny_resnet):
  c = load_config_file("finetune_image")
  c.init.pretrained, c.init.checkpoint = tiny_resnet[0], str(tmp_path)
  with pytest.raises(UserError, match="init.checkpoint and config.init.pretrained are both set"):
    init_lib.source_from_config(c)
  t = load_config_file("finetune_text")
  t.init.pretrained = tiny_resnet[0]
  with pytest.raises(UserError, match="for image tasks"):
    init_lib.source_from_config(t)
  c = load_config_file("finetune_image")
  c.init.pretrained = str(tmp_path / "nope.pth")
  with pytest.raises(UserError, match="does not exist"):
    train.train_and_evaluate(c, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def test_scratch_runs_declare_plain_preprocess(tmp_path):
  from jembed.tasks import task_class
  c = load_config_file("finetune_image")
  task = task_class("classification").create(c, str(tmp_path))
  task.load_data()
  spec = task.model_spec()
  assert spec["preprocess"] == {"size": 8, "crop_pct": 1.0, "resize": "squash", "interpolation": "bilinear",
                                "mean": [0.0], "std": [1.0], "channels": 1}


@pytest.fixture(scope="module")
def finetuned(tiny_resnet, tmp_path_factory):
  """init.pretrained fine-tune of the tiny ResNet on the embedded digits (10 classes: head restored)
  for 2 steps through the real loop, then exported to a Hugging Face directory."""
  root = tmp_path_factory.mktemp("ft")
  c = load_config_file("finetune_image")
  c.init.pretrained = tiny_resnet[0]
  c.total_steps, c.batch_size, c.warmup_steps = 2, 16, 1
  c.eval_every = c.checkpoint_every = 2
  c.async_checkpointing = False
  c.data.image_size, c.data.channels = 16, 3  # 16 px: the stride-32 ResNet still ends at 1x1
  workdir = str(root / "run")
  import contextlib
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):  # the run log (metrics.Logger prints it)
    train.train_and_evaluate(c, workdir)
  out = str(root / "hf")
  from jembed import export
  assert export.main(["--model", workdir, "--output", out]) == 0
  return workdir, out, printed.getvalue()


def test_finetune_from_pretrained_and_export_round_trip(finetuned, tiny_resnet):
  workdir, out, log = finetuned
  spec = modelspec.read(workdir)
  assert spec["backbone"]["resnet"]["width"] == 8 and spec["image_shape"] == [16, 16, 3]
  assert spec["preprocess"]["mean"] == [0.485, 0.456, 0.406] and spec["preprocess"]["size"] == 16
  assert "(torchvision resnet); classifier head restored from the source (10 classes)" in log
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "preprocessor_config.json"]
  assert oct(os.stat(os.path.join(out, "model.safetensors")).st_mode & 0o777) == "0o644"
  cfg = json.load(open(os.path.join(out, "config.json")))
  assert cfg["architectures"] == ["ResNetForImageClassification"] and cfg["id2label"]["3"] == "3"
  _, model, _ = modelspec.load_model(workdir)
  imp = open_image_model(out)
  for mine, theirs in ((nnx.state(model, nnx.Param), imp.params), (nnx.state(model, nnx.BatchStat), imp.model_state)):
    a, b = tree.flatten(nnx.to_pure_dict(mine)), tree.flatten(theirs)
    assert set(a) == set(b) and all(np.array_equal(np.asarray(a[k]), b[k]) for k in a)
  assert imp.spec["preprocess"] == spec["preprocess"] and imp.spec["class_names"] == spec["class_names"]
  # trained: the backbone moved away from the source
  assert not np.array_equal(tree.flatten(imp.params)["backbone/stem_conv/kernel"],
                            tiny_resnet[1]["conv1.weight"].transpose(2, 3, 1, 0))


def test_export_refuses_non_classifiers(tmp_path):
  with pytest.raises(UserError, match="image classifiers"):
    hf_image.save_dir(str(tmp_path / "o"), {"task": "rotation", "modality": "image"}, {}, {})
  assert not os.path.exists(tmp_path / "o")


# ----------------------------------------------------------------------------- parity (torch)


def test_export_loads_in_transformers_with_the_same_logits(finetuned):
  torch = _torch()
  transformers = pytest.importorskip("transformers")
  workdir, out, _ = finetuned
  hm = transformers.ResNetForImageClassification.from_pretrained(out).eval()
  _, model, _ = modelspec.load_model(workdir)
  with torch.no_grad():
    ref = hm(torch.from_numpy(X)).logits.numpy()
  assert _max_diff(model(XJ), ref) < TOL


def _tv_features(m, x):
  x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
  x = m.layer4(m.layer3(m.layer2(m.layer1(x))))
  return m.avgpool(x).flatten(1)


def _with_bn_stats(torch, m, shape=(4, 3, 64, 64)):
  m.train()
  with torch.no_grad():
    m(torch.randn(*shape) * 2 + 0.5)
  return m.eval()


def test_torchvision_resnets(tmp_path):
  torch = _torch()
  tv = pytest.importorskip("torchvision")
  torch.manual_seed(0)
  for name in ("resnet18", "resnet50"):
    m = getattr(tv.models, name)(num_classes=7)
    if name == "resnet50":
      _with_bn_stats(torch, m)  # non-trivial running statistics
    m.eval()
    torch.save(m.state_dict(), tmp_path / f"{name}.pth")
    with torch.no_grad():
      t = torch.from_numpy(X)
      imp = _check(tmp_path / f"{name}.pth", m(t).numpy(), _tv_features(m, t).numpy())
    assert imp.spec["backbone"]["resnet"]["depth"] == int(name[6:])


def test_timm_resnet_directory(tmp_path):
  torch = _torch()
  timm = pytest.importorskip("timm")
  from timm.models._hub import save_for_hf
  torch.manual_seed(1)
  m = _with_bn_stats(torch, timm.create_model("resnet18", pretrained=False, num_classes=4))
  save_for_hf(m, str(tmp_path / "timm_r18"))
  with torch.no_grad():
    t = torch.from_numpy(X)
    imp = _check(tmp_path / "timm_r18", m(t).numpy(), m.forward_head(m.forward_features(t), pre_logits=True).numpy())
  assert imp.format == "timm" and imp.spec["preprocess"]["interpolation"] == m.pretrained_cfg["interpolation"]


def test_hf_resnets(tmp_path):
  torch = _torch()
  transformers = pytest.importorskip("transformers")
  cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[2, 2, 2, 2],
                                  layer_type="basic", num_labels=3,
                                  id2label={0: "cat", 1: "dog", 2: "cow"}, label2id={"cat": 0, "dog": 1, "cow": 2})
  torch.manual_seed(2)
  m = _with_bn_stats(torch, transformers.ResNetForImageClassification(cfg))
  m.save_pretrained(tmp_path / "hf_r")
  base = m.resnet
  base.save_pretrained(tmp_path / "hf_base")
  with torch.no_grad():
    t = torch.from_numpy(X)
    feats = base(t).pooler_output.flatten(1).numpy()
    imp = _check(tmp_path / "hf_r", m(t).logits.numpy(), feats)
    headless = _check(tmp_path / "hf_base", None, feats)
  assert imp.spec["class_names"] == ["cat", "dog", "cow"]
  assert not headless.head and "class_names" not in headless.spec
  assert headless.build()(XJ).shape == (2, 64)  # no head: the model returns the pooled features


def test_timm_vits(tmp_path):
  torch = _torch()
  pytest.importorskip("timm")
  from timm.models._hub import save_for_hf
  from timm.models.vision_transformer import VisionTransformer
  torch.manual_seed(3)
  for pool in ("token", "avg"):
    # A bare state dict: heads = hidden / 64 (timm's sizes); a directory: from model_args.
    bare = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=1, num_classes=5,
                             global_pool=pool).eval()
    d = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=5,
                          global_pool=pool).eval()
    for m in (bare, d):
      for p in m.parameters():
        p.data.normal_(0, 0.2)
    torch.save(bare.state_dict(), tmp_path / "vit.pth")
    d.pretrained_cfg = dict(architecture="vit_test", input_size=(3, 32, 32), crop_pct=0.9,
                            interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3, num_classes=5)
    save_for_hf(d, str(tmp_path / f"timm_vit_{pool}"), model_args=dict(num_heads=4, global_pool=pool))
    with torch.no_grad():
      t = torch.from_numpy(X)
      for m, path in ((bare, tmp_path / "vit.pth"), (d, tmp_path / f"timm_vit_{pool}")):
        imp = _check(path, m(t).numpy(), m.forward_head(m.forward_features(t), pre_logits=True).numpy())
        assert imp.spec["backbone"]["vit"]["pooling"] == {"token": "cls", "avg": "mean"}[pool]


def _big_vision_npz(m) -> dict:
  """A timm ViT's weights in big_vision / AugReg naming (the layout timm's `_load_weights` reads)."""
  sd = {k: v.detach().numpy() for k, v in m.state_dict().items()}
  d = sd["cls_token"].shape[-1]
  h = m.blocks[0].attn.num_heads
  out = {"embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
         "embedding/bias": sd["patch_embed.proj.bias"], "cls": sd["cls_token"],
         "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
         "Transformer/encoder_norm/scale": sd["norm.weight"], "Transformer/encoder_norm/bias": sd["norm.bias"],
         "head/kernel": sd["head.weight"].T, "head/bias": sd["head.bias"]}
  for i in range(len(m.blocks)):
    b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
    out[p + "LayerNorm_0/scale"], out[p + "LayerNorm_0/bias"] = sd[b + "norm1.weight"], sd[b + "norm1.bias"]
    out[p + "LayerNorm_2/scale"], out[p + "LayerNorm_2/bias"] = sd[b + "norm2.weight"], sd[b + "norm2.bias"]
    qkv_w, qkv_b = sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]
    for j, n in enumerate(("query", "key", "value")):
      out[f"{p}MultiHeadDotProductAttention_1/{n}/kernel"] = qkv_w[j * d:(j + 1) * d].T.reshape(d, h, d // h)
      out[f"{p}MultiHeadDotProductAttention_1/{n}/bias"] = qkv_b[j * d:(j + 1) * d].reshape(h, d // h)
    out[p + "MultiHeadDotProductAttention_1/out/kernel"] = sd[b + "attn.proj.weight"].T.reshape(h, d // h, d)
    out[p + "MultiHeadDotProductAttention_1/out/bias"] = sd[b + "attn.proj.bias"]
    for j, fc in ((0, "fc1"), (1, "fc2")):
      out[f"{p}MlpBlock_3/Dense_{j}/kernel"] = sd[f"{b}mlp.{fc}.weight"].T
      out[f"{p}MlpBlock_3/Dense_{j}/bias"] = sd[f"{b}mlp.{fc}.bias"]
  return out


def test_big_vision_npz(tmp_path):
  torch = _torch()
  pytest.importorskip("timm")
  from timm.models.vision_transformer import VisionTransformer
  torch.manual_seed(4)
  # big_vision's MLP uses flax's nn.gelu, the tanh approximation: so does the reference here.
  m = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=6,
                        act_layer="gelu_tanh").eval()
  for p in m.parameters():
    p.data.normal_(0, 0.2)
  np.savez(tmp_path / "vit.npz", **_big_vision_npz(m))
  with torch.no_grad():
    t = torch.from_numpy(X)
    imp = _check(tmp_path / "vit.npz", m(t).numpy(), m.forward_head(m.forward_features(t), pre_logits=True).numpy())
  assert imp.format == "big_vision" and imp.spec["backbone"]["vit"]["num_heads"] == 4
  assert imp.spec["backbone"]["vit"]["hidden_act"] == "gelu_new"


def test_hf_vits_and_vit_export(tmp_path):
  torch = _torch()
  transformers = pytest.importorskip("transformers")
  cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                               image_size=32, patch_size=8, num_labels=3,
                               id2label={0: "cat", 1: "dog", 2: "cow"}, label2id={"cat": 0, "dog": 1, "cow": 2})
  torch.manual_seed(5)
  m = transformers.ViTForImageClassification(cfg).eval()
  for p in m.parameters():
    p.data.normal_(0, 0.2)
  m.save_pretrained(tmp_path / "hf_vit")
  base = transformers.ViTModel(cfg).eval()
  base.save_pretrained(tmp_path / "hf_vit_base")
  with torch.no_grad():
    t = torch.from_numpy(X)
    imp = _check(tmp_path / "hf_vit", m(t).logits.numpy(), m.vit(t).last_hidden_state[:, 0].numpy())
    _check(tmp_path / "hf_vit_base", None, base(t).last_hidden_state[:, 0].numpy())
  assert imp.spec["backbone"]["vit"]["layer_norm_eps"] == 1e-12 and imp.spec["class_names"][2] == "cow"
  # export back to Hugging Face: transformers loads it with the same logits; jembed reads it back exactly
  hf_image.save_dir(str(tmp_path / "out"), imp.spec, imp.params, imp.model_state)
  again = transformers.ViTForImageClassification.from_pretrained(tmp_path / "out").eval()
  with torch.no_grad():
    assert _max_diff(again(torch.from_numpy(X)).logits.numpy(), m(torch.from_numpy(X)).logits.numpy()) < TOL
  back = open_image_model(str(tmp_path / "out"))
  a, b = tree.flatten(imp.params), tree.flatten(back.params)
  assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_each_vit_option_changes_the_features():
  """layer_norm_eps, hidden_act, class_token, pooling and fc_norm are read (none is a no-op)."""
  base_cfg = dict(vit_model.DEFAULTS, size="", patch_size=8, hidden_size=32, num_layers=1, num_heads=2,
                  mlp_dim=64)
  x = jnp.asarray(np.random.RandomState(6).rand(2, 16, 16, 3), jnp.float32)

  def features(**options):
    m = vit_model.vit_from_config(dict(base_cfg, **options), image_shape=(16, 16, 3), rngs=nnx.Rngs(7))
    state = nnx.state(m, nnx.Param)
    # Non-trivial norms and [CLS] so every option shows in the output.
    rng = np.random.RandomState(8)
    nnx.update(m, jax.tree.map(lambda v: v + 0.5 * rng.randn(*v.shape).astype(np.float32), state))
    return np.asarray(m(x))

  base = features()
  for options in (dict(layer_norm_eps=0.5), dict(hidden_act="gelu_new"), dict(pooling="mean"),
                  dict(fc_norm=True, pooling="mean"), dict(class_token=False, pooling="mean")):
    other = features(**options)
    assert other.shape == base.shape and _max_diff(other, base) > 1e-5, options
  with pytest.raises(UserError, match="needs model.vit.class_token=True"):
    features(class_token=False)
