"""Fashion-MNIST builder: built from tiny fake idx files (no Debian package, no TensorFlow)."""

import collections
import os
import pickle
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxcomp.data import TrainSampler
from jaxcomp.data import eval_batches
from jaxcomp.data import fashion_mnist as fm

NUM_TRAIN, NUM_TEST = 64, 32


def write_source(directory, num_train=NUM_TRAIN, num_test=NUM_TEST, seed=0):
  """Writes the 4 idx .gz files; returns {split: (images (n, 28, 28) uint8, labels (n,))}."""
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  arrays = {}
  for split, n in (("train", num_train), ("test", num_test)):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    images_name, labels_name = fm.SOURCE_FILES[split]
    fm.write_idx(os.path.join(directory, images_name), images)
    fm.write_idx(os.path.join(directory, labels_name), labels)
    arrays[split] = (images, labels)
  return arrays


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  directory = tmp_path_factory.mktemp("source")
  return str(directory), write_source(directory)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, source):
  directory = str(tmp_path_factory.mktemp("tfds"))
  fm.prepare(directory, source[0])
  return directory


def test_features_are_the_standard_ones(data_dir):
  builder = fm.prepare(data_dir)
  assert builder.name == "fashion_mnist"
  assert os.fspath(builder.data_path) == os.path.join(data_dir, "fashion_mnist", "3.0.1")
  assert builder.info.file_format.value == "array_record"
  image, label = builder.info.features["image"], builder.info.features["label"]
  assert isinstance(image, tfds.features.Image)
  assert (image.shape, image.np_dtype) == ((28, 28, 1), np.uint8)
  assert isinstance(label, tfds.features.ClassLabel)
  assert label.names == list(fm.CLASS_NAMES) and label.num_classes == 10
  assert builder.info.splits["train"].num_examples == NUM_TRAIN
  assert builder.info.splits["test"].num_examples == NUM_TEST


def test_catalog_builder_is_untouched():
  catalog = tfds.builder_cls("fashion_mnist")
  assert catalog is not fm.FashionMnist and catalog.name == fm.FashionMnist.name


@pytest.mark.parametrize("split", ["train", "test"])
def test_examples_round_trip_exactly(data_dir, source, split):
  images, labels = source[1][split]
  ds = fm.load(data_dir, split)
  assert len(ds) == len(images)
  expected = collections.Counter((im.tobytes(), int(lb)) for im, lb in zip(images, labels))
  got = collections.Counter()
  for i in range(len(ds)):
    example = ds[i]
    assert example["image"].shape == (28, 28, 1) and example["image"].dtype == np.uint8
    got[(example["image"][..., 0].tobytes(), int(example["label"]))] += 1
  assert got == expected


def test_no_tensorflow_needed(data_dir):
  fm.load(data_dir, "test")[0]
  assert "tensorflow" not in sys.modules


def test_builder_and_source_pickle(data_dir, source):
  # Grain worker processes receive sources (and tfds, builders) by pickling.
  builder = pickle.loads(pickle.dumps(fm.prepare(data_dir, source[0])))
  assert builder.info.file_format.value == "array_record"
  ds = pickle.loads(pickle.dumps(fm.load(data_dir, "test")))
  np.testing.assert_array_equal(ds[3]["image"], fm.load(data_dir, "test")[3]["image"])


def test_second_prepare_is_a_no_op(data_dir):
  info = os.path.join(data_dir, "fashion_mnist", "3.0.1", "dataset_info.json")
  before = os.stat(info).st_mtime_ns
  fm.prepare(data_dir, source_dir="/nonexistent")  # Reuses; never looks at the sources.
  assert os.stat(info).st_mtime_ns == before
  assert sorted(os.listdir(data_dir)) == ["fashion_mnist"]


def test_load_unprepared_says_how_to_prepare(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    fm.load(str(tmp_path), "train")
  message = str(e.value)
  assert "\n" not in message and "not prepared" in message
  assert f"python -m jaxcomp.data.fashion_mnist --data_dir {tmp_path}" in message
  assert "apt-get install dataset-fashion-mnist" in message


def test_missing_source_files(tmp_path):
  write_source(tmp_path / "src")
  os.remove(tmp_path / "src" / "t10k-labels-idx1-ubyte.gz")
  with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte\.gz.*apt-get install"):
    fm.prepare(str(tmp_path / "tfds"), str(tmp_path / "src"))
  assert not (tmp_path / "tfds").exists()


def test_failed_build_leaves_nothing_that_looks_prepared(tmp_path):
  src, data_dir = tmp_path / "src", str(tmp_path / "tfds")
  write_source(src)
  fm.write_idx(src / "t10k-labels-idx1-ubyte.gz", np.zeros(NUM_TEST - 1, np.uint8))  # Mismatch.
  with pytest.raises(ValueError, match="31 labels for 32 images"):
    fm.prepare(data_dir, str(src))
  assert os.listdir(os.path.join(data_dir, "fashion_mnist")) == []  # No version, no incomplete.*
  with pytest.raises(FileNotFoundError, match="not prepared"):
    fm.load(data_dir, "train")
  write_source(src)
  assert len(fm.prepare(data_dir, str(src)).as_data_source("test")) == NUM_TEST


def test_read_idx_rejects_garbage(tmp_path):
  path = tmp_path / "x-idx2-ubyte"
  fm.write_idx(path, np.arange(12, dtype=np.uint8).reshape(3, 4))
  np.testing.assert_array_equal(fm.read_idx(path), np.arange(12).reshape(3, 4))
  path.write_bytes(path.read_bytes() + b"\x00")
  with pytest.raises(ValueError, match=r"header says shape \(3, 4\)"):
    fm.read_idx(path)
  path.write_bytes(b"\x08\x03\x00\x00")
  with pytest.raises(ValueError, match="not an idx file"):
    fm.read_idx(path)


def test_command_line(tmp_path, source, capsys):
  fm.main(["--data_dir", str(tmp_path), "--source_dir", source[0]])
  assert "test: 32, train: 64" in capsys.readouterr().out
  with pytest.raises(SystemExit, match="source files missing"):
    fm.main(["--data_dir", str(tmp_path / "other"), "--source_dir", str(tmp_path / "none")])


def test_samplers_on_the_dataset(data_dir):
  sampler = TrainSampler(fm.load(data_dir, "train"), batch_size=16, seed=0, transform=fm.preprocess)
  batch = sampler.batch_at(5)
  assert batch["image"].shape == (16, 28, 28, 1) and batch["image"].dtype == np.float32
  assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
  batches = list(eval_batches(fm.load(data_dir, "test"), batch_size=10, transform=fm.preprocess))
  assert [int(b["mask"].sum()) for b in batches] == [10, 10, 10, 2]
  assert batches[-1]["image"].shape == (10, 28, 28, 1)
