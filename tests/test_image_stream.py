"""Streamed image input (jembed/data/image_stream.py): folders of mixed sizes, CSV / JSONL lists,
TFDS data sources, per-process shards, exact resume, worker processes, bad images, the model's
preprocessing, and one short classification run from a folder through the real train loop.

Every generated image is one flat colour that encodes its record (value 8 * i + 4), so a batch
tells which records it holds whatever crop, resize or flip was applied to it."""
import io
import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from jembed.data import image_stream, image_transforms, pipeline
from jembed.errors import UserError

N_PER_CLASS = 10
CLASSES = ("cat", "dog")


def _value(i: int) -> int:
  return 8 * i + 4


def _record_of(image: np.ndarray) -> int:
  return (int(image[..., 0].mean().round()) - 4) // 8


def _cfg(**kw) -> ml_collections.ConfigDict:
  base = dict(source="", train="", eval="", eval_fraction=0.0, tfds_name="", tfds_split="train",
              tfds_eval_split="test", data_dir="", image_size=16, channels=3, on_bad_record="error",
              workers=0, crop_scale=(0.08, 1.0), flip=True)
  base.update(kw)
  return ml_collections.ConfigDict(base)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """DIR/<class>/<i>.jpg|png of mixed sizes (12..40 px), 20 images, record i coloured _value(i);
  plus train.csv (names) and train.jsonl (int labels) listing the same files."""
  root = tmp_path_factory.mktemp("imgs")
  rng = np.random.default_rng(0)
  rows = []
  i = 0
  for label, cls in enumerate(CLASSES):
    (root / "tree" / cls).mkdir(parents=True)
    for k in range(N_PER_CLASS):
      h, w = (int(v) for v in rng.integers(12, 40, 2))
      ext = "png" if k % 2 else "jpg"
      rel = f"tree/{cls}/{k:02d}.{ext}"
      # Lossless PNG and quality-100 JPEG keep a flat colour within a unit.
      Image.fromarray(np.full((h, w, 3), _value(i), np.uint8)).save(root / rel, quality=100)
      rows.append((rel, cls, label))
      i += 1
  with open(root / "train.csv", "w") as f:
    f.write("path,label\n" + "".join(f"{p},{c}\n" for p, c, _ in rows))
  with open(root / "train.jsonl", "w") as f:
    f.write("".join(json.dumps({"path": p, "label": l}) + "\n" for p, _, l in rows))
  # with_bad/: four good images per class and one that does not decode.
  for cls in CLASSES:
    (root / "with_bad" / cls).mkdir(parents=True)
    for k in range(4):
      Image.fromarray(np.full((9 + k, 12, 3), _value(k), np.uint8)).save(root / "with_bad" / cls / f"{k}.png")
  (root / "with_bad" / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
  return root


def _values(batches) -> list[int]:
  return [_record_of(img) for b in batches for img in b["image"]]


def test_folder_csv_and_jsonl_name_the_same_records(folder):
  streams = [image_stream.open_splits(_cfg(train=str(folder / name)))[0]
             for name in ("tree", "train.csv", "train.jsonl")]
  tree, csv_, jsonl = streams
  assert tree.class_names == ["cat", "dog"] and csv_.class_names == ["cat", "dog"]
  assert jsonl.class_names == ["0", "1"]
  for s in streams:
    assert len(s) == 20
    np.testing.assert_array_equal(s.records.labels, [0] * 10 + [1] * 10)
    assert [os.path.realpath(p) for p in s.records.paths] == [os.path.realpath(p) for p in tree.records.paths]
  # Memory holds names and labels only: the records are two small arrays.
  # relative to their common folder, one byte a character: "cat/00.jpg" is 10 bytes.
  assert tree.records.names.dtype.kind == "S" and tree.records.names.nbytes == 20 * 10


def test_views_give_the_model_size_from_mixed_sizes(folder):
  train, held = image_stream.open_splits(_cfg(train=str(folder / "tree"), eval_fraction=0.2))
  assert len(held) == 4 and sorted(held.records.labels.tolist()) == [0, 0, 1, 1]
  batch = next(train.train_iterator(4, seed=0))
  assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.uint8
  assert sorted(batch) == ["image", "label"]
  evals = list(held.eval_batches(2, 0))
  assert [b["image"].shape for b in evals] == [(2, 16, 16, 3)] * 2
  # Eval batches are in record order and carry each image's label.
  assert [l for b in evals for l in b["label"]] == held.records.labels.tolist()
  gray = image_stream.open_splits(_cfg(train=str(folder / "tree"), image_size=8, channels=1))[0]
  assert next(gray.train_iterator(2, seed=0))["image"].shape == (2, 8, 8, 1)
  assert [b["image"].shape[0] for b in held.batches(3)] == [3, 1]


def test_crop_scale_and_flip_are_applied(folder):
  """A full-area crop without flip is the squashed image; flip mirrors; the crop scale is read."""
  img = np.arange(12 * 20 * 3, dtype=np.uint8).reshape(12, 20, 3)
  pp = image_transforms.plain(8, 3)
  loader = lambda **kw: image_stream.LoadImage(_Fixed(img), image_stream.View(pp, True, **kw))
  rng = lambda: np.random.default_rng(3)
  full = loader(crop_scale=(1.0, 1.0), flip=False)(0, rng())["image"]
  # Scale 1 and the 3/4..4/3 ratio cannot fit 12x20, so torchvision's fallback is the central crop.
  np.testing.assert_array_equal(full, image_transforms.resize(img[:, 2:18], 8, 8))
  flips = {bool(np.array_equal(loader(crop_scale=(1.0, 1.0), flip=True)(0, np.random.default_rng(s))["image"],
                               full[:, ::-1])) for s in range(8)}
  assert flips == {True, False}
  small = loader(crop_scale=(0.1, 0.1), flip=False)(0, rng())["image"]
  assert not np.array_equal(small, full)
  # data.crop_scale / data.flip reach the training view the workers run (and not the eval view).
  stream = image_stream.open_splits(_cfg(train=str(folder / "tree"), crop_scale=(0.5, 0.9), flip=False))[0]
  assert stream.view(True) == image_stream.View(stream.pp, True, (0.5, 0.9), False, False)
  assert not stream.view(False).train
  with pytest.raises(UserError, match="crop_scale"):
    image_stream.open_splits(_cfg(train=str(folder / "tree"), crop_scale=(0.5, 2.0)))


class _Fixed:
  """Records that are one in-memory image (for the transform checks)."""

  def __init__(self, img):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    self.data = buf.getvalue()

  def __len__(self):
    return 1

  def read(self, i):
    return self.data, 0, "fixed.png", ""


def test_process_shards_are_disjoint_cover_and_reshuffle(folder):
  train = image_stream.open_splits(_cfg(train=str(folder / "tree")))[0]
  epochs = {}
  for p in range(2):
    it = train.train_iterator(4, seed=1, process_count=2, process_index=p)
    seen = _values(next(it) for _ in range(10))  # 2 epochs of this process's 10 records
    epochs[p] = (seen[:10], seen[10:])
  first = [set(epochs[p][0]) for p in range(2)]
  assert first[0].isdisjoint(first[1]) and first[0] | first[1] == set(range(20))
  for p in range(2):
    assert set(epochs[p][1]) == first[p] and epochs[p][1] != epochs[p][0]  # reshuffled per epoch


def test_resume_is_exact(folder, tmp_path):
  """Batches k..n after a restore from jembed's checkpoint (train state + iterator) equal those of
  an uninterrupted stream."""
  from jembed import checkpoint as ckpt
  import jax.numpy as jnp
  train = image_stream.open_splits(_cfg(train=str(folder / "tree")))[0]
  it = train.train_iterator(4, seed=5)
  uninterrupted = [next(it) for _ in range(9)]
  it = train.train_iterator(4, seed=5)
  for _ in range(4):
    next(it)
  state = {"step": jnp.asarray(4, jnp.int32)}
  saver = ckpt.Checkpointer(str(tmp_path), async_save=False)
  saver.save(4, state, it)
  saver.close()
  resumed = train.train_iterator(4, seed=5)
  next(resumed)  # a fresh run's iterator, elsewhere in the stream: the restore must move it
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  ckpt.restore(str(tmp_path), 4, abstract, resumed)
  for want in uninterrupted[4:]:
    got = next(resumed)
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])


def test_worker_processes_match_in_process(folder):
  """data.workers decodes in grain worker processes: the same batches as in-process (bad images
  skipped alike), and the skips found in a worker are counted in this process."""
  cfg = dict(train=str(folder / "with_bad"), on_bad_record="skip")
  want = image_stream.open_splits(_cfg(**cfg))[0].train_iterator(4, seed=2)
  want = [next(want) for _ in range(4)]
  pipeline.reset_bad_records()
  stream = image_stream.open_splits(_cfg(workers=1, **cfg))[0]
  assert stream.workers == 1  # read from data.workers
  it = stream.train_iterator(4, seed=2)
  got = [next(it) for _ in range(2)]
  state = it.get_state()
  assert "next_index_in_cycle" in json.dumps(state)  # grain's multi-process state
  next(it)
  it.set_state(state)  # what the loop's first-batch peek and a restore do: the workers restart there
  got += [next(it) for _ in range(2)]
  it.close()
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g["image"], w["image"])
  assert pipeline.bad_records()["skipped"] == 1
  pipeline.reset_bad_records()


def test_bad_images_error_or_counted_skip(folder, tmp_path):
  root = tmp_path / "data"
  for cls in CLASSES:
    (root / cls).mkdir(parents=True)
    for k in range(3):
      Image.fromarray(np.full((10, 14, 3), 100, np.uint8)).save(root / cls / f"{k}.png")
  (root / "dog" / "3.png").write_bytes(b"garbage")
  train = image_stream.open_splits(_cfg(train=str(root)))[0]
  it = train.train_iterator(2, seed=0)
  with pytest.raises(UserError, match=r"cannot decode image .*3\.png.*on_bad_record=skip") as e:
    for _ in range(4):  # one epoch
      next(it)
  assert "\n" not in str(e.value)
  pipeline.reset_bad_records()
  train = image_stream.open_splits(_cfg(train=str(root), on_bad_record="skip"))[0]
  it = train.train_iterator(2, seed=0)
  batches = [next(it) for _ in range(14)]  # 4 epochs of the 7 records
  assert all(b["image"].shape == (2, 16, 16, 3) for b in batches)
  bad = pipeline.bad_records()
  assert bad["skipped"] == 1 and "3.png" in bad["examples"][0]  # counted once, not every epoch
  pipeline.reset_bad_records()


def test_source_errors_are_one_line(folder, tmp_path):
  (tmp_path / "t" / "a").mkdir(parents=True)
  (tmp_path / "t" / "b").mkdir(parents=True)
  Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "t" / "a" / "1.png")
  with pytest.raises(UserError, match=r"class folder .*b'? has no images"):
    image_stream.open_splits(_cfg(train=str(tmp_path / "t")))
  with pytest.raises(UserError, match="does not exist"):
    image_stream.open_splits(_cfg(train=str(tmp_path / "missing")))
  (tmp_path / "l.csv").write_text("file,label\nx.png,a\n")
  with pytest.raises(UserError, match="header row with 'path' and 'label'"):
    image_stream.open_splits(_cfg(train=str(tmp_path / "l.csv")))
  (tmp_path / "e.csv").write_text("path,label\ntree/cat/00.jpg,cow\n")
  with pytest.raises(UserError, match=r"e\.csv:2: label 'cow' is not a class"):
    image_stream.open_splits(_cfg(train=str(folder / "train.csv"), eval=str(tmp_path / "e.csv")))
  with pytest.raises(UserError, match="data.workers"):
    image_stream.open_splits(_cfg(train=str(folder / "tree"), workers=-3))
  with pytest.raises(UserError, match=r"first image is \d+x\d+; set --config.data.image_size"):
    image_stream.open_splits(_cfg(train=str(folder / "tree"), image_size=0))


def test_model_preprocess_rules():
  cfg = lambda **kw: _cfg(image_size=kw.pop("image_size", 0), channels=kw.pop("channels", 0))
  declared = image_transforms.torchvision_imagenet(224).to_dict()
  assert image_stream.model_preprocess(cfg(), {"preprocess": declared}) == image_transforms.torchvision_imagenet(224)
  resized = image_stream.model_preprocess(cfg(image_size=160), {"preprocess": declared})
  assert resized.size == 160 and resized.mean == image_transforms.IMAGENET_MEAN
  assert image_stream.model_preprocess(cfg(), {"image_shape": [8, 8, 1]}) == image_transforms.plain(8, 1)
  assert image_stream.model_preprocess(cfg(image_size=32), None, (20, 20, 3)) == image_transforms.plain(32, 3)
  assert image_stream.model_preprocess(cfg(), None, (20, 20, 1)) == image_transforms.plain(20, 1)


def test_tfds_data_source(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")

  class TinyStreamImages(tfds.core.GeneratorBasedBuilder):
    """6 train / 4 test images of mixed sizes, stored already encoded (building needs no TF)."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3)),
          "label": tfds.features.ClassLabel(names=["a", "b"])}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(6, 0), "test": self._generate_examples(4, 10)}

    def _generate_examples(self, n, offset):
      for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(np.full((10 + i, 20 - i, 3), _value(offset + i), np.uint8)).save(buf, "PNG")
        yield i, {"image": buf.getvalue(), "label": i % 2}

  TinyStreamImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  train, held = image_stream.open_splits(_cfg(tfds_name="tiny_stream_images", data_dir=str(tmp_path)))
  assert train.class_names == ["a", "b"] and (len(train), len(held)) == (6, 4)
  it = train.train_iterator(3, seed=0)
  assert sorted(_values([next(it), next(it)])) == list(range(6))
  evals = list(held.eval_batches(2, 0))
  values = _values(evals)
  assert sorted(values) == [10, 11, 12, 13]
  assert [l for b in evals for l in b["label"]] == [(v - 10) % 2 for v in values]
  # No eval split: a fixed hold-out of the train split.
  tr, ev = image_stream.open_splits(_cfg(tfds_name="tiny_stream_images", data_dir=str(tmp_path),
                                         tfds_eval_split="", eval_fraction=0.5))
  assert len(tr) == len(ev) == 3 and set(tr.records.index).isdisjoint(ev.records.index)


def test_vision_tasks_bound_frozen_eval_memory(folder, tmp_path):
  from spine_helpers import load_config_file
  from jembed.tasks.rotation import RotationTask
  c = load_config_file("rotation")
  c.data.update(dict(train=str(folder / "tree"), image_size=16, workers=0, eval_fraction=0.2))
  c.frozen_eval.max_train = 0
  with pytest.raises(UserError, match="frozen_eval.max_train=0"):
    RotationTask(c, str(tmp_path)).load_data()
  c.frozen_eval.max_train = 5
  task = RotationTask(c, str(tmp_path))
  data = task.load_data()
  assert isinstance(data.train, image_stream.ImageStream) and task.image_shape == (16, 16, 3)
  assert task.model_spec()["preprocess"] == image_transforms.plain(16, 3).to_dict()
  (tr_x, tr_y), (te_x, te_y) = task._eval_split()
  assert tr_x.shape == (5, 16, 16, 3) and te_x.shape == (4, 16, 16, 3) and len(te_y) == 4


def test_classification_from_a_folder(folder, tmp_path):
  """A short fine-tuning run from a folder through jembed's train loop: trains from the stream,
  evaluates the streamed eval split, prints the report, records the preprocessing, and reports the
  image it skipped in metrics.jsonl."""
  import shutil
  from spine_helpers import load_config_file
  from jembed import train
  data = tmp_path / "data"
  shutil.copytree(folder / "tree", data)
  (data / "dog" / "zz_broken.jpg").write_bytes(b"not a jpeg")
  c = load_config_file("finetune_image")
  c.data.update(dict(train=str(data), image_size=16, workers=0, eval_fraction=0.4,
                     on_bad_record="skip"))
  c.model.resnet.update(dict(width=4, num_stages=1))
  c.update(dict(batch_size=8, total_steps=2, eval_every=2, eval_batches=0, warmup_steps=0,
                checkpoint_every=2, async_checkpointing=False))
  workdir = tmp_path / "run"
  metrics = train.train_and_evaluate(c, str(workdir))
  assert 0.0 <= metrics["accuracy"] <= 1.0
  report = json.load(open(workdir / "classification_report.json"))
  assert report["support"] == 8  # the whole streamed eval split, not eval_batches' share
  rows = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  assert max(r.get("skipped_records", 0) for r in rows) == 1  # met while streaming, reported once
  spec = json.load(open(workdir / "model.json"))
  assert spec["image_shape"] == [16, 16, 3] and spec["preprocess"]["size"] == 16
  assert spec["class_names"] == ["cat", "dog"]


def test_pil_views_equal_the_numpy_transforms():
  """The workers' PIL path (image_transforms.eval_view / train_view) gives image_transforms'
  eval_transform / train_transform pixel for pixel, same random draws."""
  rng = np.random.default_rng(0)
  for k in range(24):
    c = (1, 3)[k % 2]
    a = rng.integers(0, 255, tuple(int(v) for v in rng.integers(5, 60, 2)) + (c,), dtype=np.uint8)
    pil = Image.fromarray(a[..., 0] if c == 1 else a)
    size = int(rng.integers(4, 40))
    for pp in (image_transforms.plain(size, c),
               image_transforms.Preprocess(size=size, crop_pct=0.875, channels=c, mean=(0.0,) * c,
                                           std=(1.0,) * c, interpolation="bicubic")):
      np.testing.assert_array_equal(image_transforms.eval_view(pil, pp),
                                    image_transforms.eval_transform(a, pp))
      seed = int(rng.integers(1000))
      np.testing.assert_array_equal(
          image_transforms.train_view(pil, pp, np.random.default_rng(seed)),
          image_transforms.train_transform(a, pp, np.random.default_rng(seed)))


def test_eval_batches_split_each_global_batch_over_processes(folder):
  """Each process reads its contiguous slice of every global eval batch (as
  jax.make_array_from_process_local_data expects); together they are the single-process batches."""
  held = image_stream.open_splits(_cfg(train=str(folder / "tree")))[0]
  whole = _values(held.eval_batches(8, 0, process_count=1, process_index=0))
  parts = [list(held.eval_batches(8, 0, process_count=2, process_index=p)) for p in range(2)]
  assert len(whole) == 16 and all(len(b["label"]) == 4 for p in parts for b in p)
  joined = [v for b0, b1 in zip(*parts) for v in _values([b0]) + _values([b1])]
  assert joined == whole == list(range(16))
