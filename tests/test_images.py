"""Image sources: embedded digits, class folders, TFDS (errors and a mocked load)."""
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from jembed.data.images import load_image_splits, stratified_split
from jembed.errors import UserError


def _cfg(**kw) -> ml_collections.ConfigDict:
  base = dict(source="", train="", eval="", eval_fraction=0.2, tfds_name="",
              tfds_split="train", tfds_eval_split="test", data_dir="", image_size=0,
              channels=0)
  base.update(kw)
  return ml_collections.ConfigDict(base)


def _write(path, array, mode=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array, mode).save(path)


def test_embedded_digits_split_is_stratified_and_deterministic():
  train, evals = load_image_splits(_cfg())
  digits = load_digits()
  assert train.images.shape[1:] == (8, 8, 1) and train.images.dtype == np.uint8
  assert len(train) + len(evals) == 1797
  assert abs(len(evals) - 0.2 * 1797) <= 10
  assert train.class_names == [str(i) for i in range(10)]
  # Each class is held out in proportion to its size.
  overall = np.bincount(digits.target)
  np.testing.assert_allclose(np.bincount(evals.labels, minlength=10), 0.2 * overall, atol=1)
  # Pixels are the 0..16 digits scaled to 0..255 and labels stay attached to their image.
  expected = np.round(digits.images * 255 / 16).astype(np.uint8)
  all_images = np.concatenate([train.images, evals.images])[..., 0]
  all_labels = np.concatenate([train.labels, evals.labels])
  order = np.lexsort(all_images.reshape(len(all_images), -1).T)
  ref_order = np.lexsort(expected.reshape(1797, -1).T)
  np.testing.assert_array_equal(all_images[order], expected[ref_order])
  np.testing.assert_array_equal(np.sort(all_labels), np.sort(digits.target))
  assert train.images.max() == 255
  train2, evals2 = load_image_splits(_cfg())
  np.testing.assert_array_equal(evals.images, evals2.images)
  np.testing.assert_array_equal(train.labels, train2.labels)


def test_stratified_split_keeps_small_classes_on_both_sides():
  labels = np.array([0] * 10 + [1] * 2 + [2])
  tr, ev = stratified_split(labels, 0.2)
  assert sorted(np.concatenate([tr, ev]).tolist()) == list(range(13))
  assert np.bincount(labels[ev], minlength=3).tolist() == [2, 1, 0]


def test_embedded_resize_and_channels():
  train, evals = load_image_splits(_cfg(image_size=16, channels=3))
  assert train.images.shape[1:] == (16, 16, 3)
  assert evals.images.shape[1:] == (16, 16, 3)
  np.testing.assert_array_equal(train.images[..., 0], train.images[..., 2])


def test_folder_source_reads_classes_and_converts_modes(tmp_path):
  rng = np.random.default_rng(0)
  cats = [rng.integers(0, 256, (6, 5), np.uint8) for _ in range(3)]
  dogs = [rng.integers(0, 256, (6, 5, 3), np.uint8) for _ in range(2)]
  for i, a in enumerate(cats):
    _write(str(tmp_path / "train" / "cat" / f"{i}.png"), a)
  for i, a in enumerate(dogs):
    _write(str(tmp_path / "train" / "dog" / f"{i}.bmp"), a)
  (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
  _write(str(tmp_path / "eval" / "dog" / "x.png"), dogs[0])

  # Mixed gray/RGB files need data.channels.
  with pytest.raises(UserError, match=r"mixed channel counts.*data\.channels"):
    load_image_splits(_cfg(train=str(tmp_path / "train")))
  train, evals = load_image_splits(_cfg(train=str(tmp_path / "train"),
                                        eval=str(tmp_path / "eval"), channels=3))
  assert train.class_names == ["cat", "dog"]
  assert train.labels.tolist() == [0, 0, 0, 1, 1]
  np.testing.assert_array_equal(train.images[0], np.repeat(cats[0][..., None], 3, -1))
  np.testing.assert_array_equal(train.images[3], dogs[0])
  assert evals.labels.tolist() == [1] and evals.class_names == ["cat", "dog"]
  np.testing.assert_array_equal(evals.images[0], dogs[0])

  gray, held = load_image_splits(_cfg(source="folder", train=str(tmp_path / "train"),
                                      channels=1, image_size=4, eval_fraction=0.4))
  assert gray.images.shape[1:] == (4, 4, 1)
  assert len(gray) + len(held) == 5 and sorted(held.labels.tolist()) == [0, 1]


def test_folder_errors(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    load_image_splits(_cfg(train=str(tmp_path / "missing")))
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match="no class sub-folders"):
    load_image_splits(_cfg(train=str(tmp_path / "empty")))
  root = tmp_path / "data"
  _write(str(root / "a" / "1.png"), np.zeros((4, 4), np.uint8))
  (root / "b").mkdir()
  with pytest.raises(UserError, match=r"class folder .*b'? has no images"):
    load_image_splits(_cfg(train=str(root)))
  _write(str(root / "b" / "2.jpg"), np.zeros((5, 4), np.uint8))
  with pytest.raises(UserError, match=r"mixed sizes: .*1\.png is 4x4, .*2\.jpg is 5x4; "
                     r"set data\.image_size=N"):
    load_image_splits(_cfg(train=str(root)))
  train, _ = load_image_splits(_cfg(train=str(root), image_size=3, eval_fraction=0.0))
  assert train.images.shape == (2, 3, 3, 1)
  (root / "b" / "3.png").write_bytes(b"garbage")
  with pytest.raises(UserError, match=r"cannot read image .*3\.png"):
    load_image_splits(_cfg(train=str(root), image_size=3))
  with pytest.raises(UserError, match="data.source"):
    load_image_splits(_cfg(source="url"))
  with pytest.raises(UserError, match="eval_fraction"):
    load_image_splits(_cfg(eval_fraction=1.5))


def test_tfds_errors(tmp_path):
  with pytest.raises(UserError, match="data_dir is not set"):
    load_image_splits(_cfg(tfds_name="mnist"))
  with pytest.raises(UserError, match="does not exist"):
    load_image_splits(_cfg(tfds_name="mnist", data_dir=str(tmp_path / "nope")))
  with pytest.raises(UserError, match="did you mean .*mnist"):
    load_image_splits(_cfg(tfds_name="mnistt", data_dir=str(tmp_path)))
  with pytest.raises(UserError, match=r"not prepared.*tfds build mnist --data_dir"):
    load_image_splits(_cfg(tfds_name="mnist", data_dir=str(tmp_path)))


def test_tfds_mock_loads_images(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    train, evals = load_image_splits(_cfg(tfds_name="mnist", data_dir=str(tmp_path)))
    held_train, held = load_image_splits(
        _cfg(tfds_name="mnist", data_dir=str(tmp_path), tfds_eval_split="", image_size=8,
             eval_fraction=0.5))
  assert train.images.shape == (6, 28, 28, 1) and train.images.dtype == np.uint8
  assert evals.images.shape == (6, 28, 28, 1)
  assert train.labels.dtype == np.int32 and train.labels.max() <= 9
  assert train.class_names == [str(i) for i in range(10)]
  assert held_train.images.shape[1:] == (8, 8, 1)
  assert len(held_train) + len(held) == 6 and len(held) >= 1
