"""Fashion-MNIST as a tfds dataset in array_record, built from local idx files without TensorFlow.

The source is a directory holding the four original idx files (``train-images-idx3-ubyte.gz``,
``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``);
by default the one the Debian package installs (``apt-get install dataset-fashion-mnist`` puts them
in ``/usr/share/datasets/fashion-mnist``). Nothing is downloaded.

The dataset written is the standard tfds ``fashion_mnist`` (version 3.0.1: the same name, features,
class names, split sizes and example keys, hence the same on-disk shuffle), stored as array_record
so that ``builder.as_data_source(split)`` reads it by index. Examples are
``{"image": uint8 (28, 28, 1), "label": int in [0, 10)}``.

No TensorFlow anywhere: tfds serializes ``tf.train.Example`` protos with its own copy of the proto
and writes array_record directly. The one TF-only step in the tfds image path is encoding a numpy
array to PNG (``tfds.features.Image`` runs it through a TF graph), so the generator yields
``PIL.Image`` objects, which ``Image`` encodes with pillow; reading decodes with pillow (or OpenCV
when installed). The feature is the standard ``Image(shape=(28, 28, 1))``, PNG-encoded.

The tfds catalog already registers a builder called ``fashion_mnist`` (the one that downloads with
TF). `FashionMnist` sets ``name = "fashion_mnist"`` and subclasses with ``skip_registration=True``
(see ``tfds.core.registered.RegisteredDataset.__init_subclass__``): no name clash, and the data
lands in ``DATA_DIR/fashion_mnist/3.0.1`` where the catalog builder would put it. It is therefore
reached through this module, not ``tfds.builder("fashion_mnist")``.

Build once, then read::

  python -m jaxcomp.data.fashion_mnist --data_dir /tmp/tfds

  >>> from jaxcomp.data import fashion_mnist
  >>> train = fashion_mnist.load("/tmp/tfds", "train")  # doctest: +SKIP
  >>> len(train), train[0]["image"].shape  # doctest: +SKIP
  (60000, (28, 28, 1))
"""

from __future__ import annotations

import argparse
import gzip
import os
import struct
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
import PIL.Image

DEFAULT_SOURCE_DIR = "/usr/share/datasets/fashion-mnist"
"""Where the Debian package ``dataset-fashion-mnist`` installs the idx files."""

SOURCE_FILES: Mapping[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
"""Split name -> (images file, labels file), as published and as packaged by Debian."""

CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_PREPARE_HINT = (
    "run `python -m jaxcomp.data.fashion_mnist --data_dir {data_dir}` (needs the Debian package "
    "dataset-fashion-mnist: apt-get install dataset-fashion-mnist)"
)

_CITATION = """\
@article{DBLP:journals/corr/abs-1708-07747,
  author    = {Han Xiao and Kashif Rasul and Roland Vollgraf},
  title     = {Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning Algorithms},
  journal   = {CoRR},
  volume    = {abs/1708.07747},
  year      = {2017},
  url       = {http://arxiv.org/abs/1708.07747},
  archivePrefix = {arXiv},
  eprint    = {1708.07747},
}
"""


# idx type codes (http://yann.lecun.com/exdb/mnist/): code -> big-endian numpy dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
  """Reads an idx file (gzip-compressed if its name ends in ``.gz``) into a numpy array.

  Args:
    path: an idx file, e.g. ``train-images-idx3-ubyte.gz``.

  Returns:
    The array in its stored shape (``(n, 28, 28)`` uint8 for images, ``(n,)`` for labels), native
    byte order.

  Raises:
    ValueError: the file is not a well-formed idx file.

  Example:
    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "x-idx3-ubyte.gz")
    >>> write_idx(path, np.arange(8, dtype=np.uint8).reshape(2, 2, 2))
    >>> read_idx(path)[1].tolist()
    [[4, 5], [6, 7]]
  """
  path = os.fspath(path)
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
    raise ValueError(f"{path} is not an idx file (bad magic number {data[:4]!r})")
  dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
  shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
  offset, size = 4 + 4 * ndim, int(np.prod(shape)) * dtype.itemsize
  if len(data) != offset + size:
    found = len(data) - offset
    raise ValueError(f"{path}: header says shape {shape} ({size} bytes), found {found} bytes")
  array = np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape)
  return array.astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
  """Writes ``array`` as an idx file (gzip-compressed if the name ends in ``.gz``); see `read_idx`.

  Used to make small stand-in sources (tests, examples) in the published format.
  """
  path = os.fspath(path)
  array = np.asarray(array)
  codes = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_DTYPES.items()}
  if array.dtype not in codes:
    raise ValueError(f"idx cannot store dtype {array.dtype}")
  header = bytes([0, 0, codes[array.dtype], array.ndim])
  header += struct.pack(f">{array.ndim}I", *array.shape)
  payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(payload)


def check_source_dir(source_dir: str | os.PathLike[str] | None = None) -> str:
  """Returns the source directory, raising `FileNotFoundError` if any idx file is missing."""
  source_dir = os.fspath(source_dir or DEFAULT_SOURCE_DIR)
  names = [name for pair in SOURCE_FILES.values() for name in pair]
  missing = [name for name in names if not os.path.isfile(os.path.join(source_dir, name))]
  if missing:
    raise FileNotFoundError(
        f"Fashion-MNIST source files missing in {source_dir}: {', '.join(missing)}; install the "
        "Debian package (apt-get install dataset-fashion-mnist) or pass a directory holding the "
        "4 idx .gz files as source_dir / --source_dir"
    )
  return source_dir


class FashionMnist(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """The tfds ``fashion_mnist`` dataset (3.0.1), generated from local idx files, array_record.

  Same features as the catalog builder: ``image: Image(shape=(28, 28, 1), dtype=uint8)`` (PNG),
  ``label: ClassLabel(names=CLASS_NAMES)``; splits ``train`` (60,000) and ``test`` (10,000).
  Not registered in the tfds catalog (whose ``fashion_mnist`` needs TF and the network).

  Example:
    >>> builder = FashionMnist(data_dir="/tmp/tfds")  # doctest: +SKIP
    >>> builder.download_and_prepare()  # doctest: +SKIP
    >>> builder.as_data_source("test")[0]["label"]  # doctest: +SKIP
    4
  """

  name = "fashion_mnist"
  VERSION = tfds.core.Version("3.0.1")
  RELEASE_NOTES = {"3.0.1": "Catalog version; here built from local idx files, no TensorFlow."}

  def __init__(
      self,
      *,
      source_dir: str | os.PathLike[str] | None = None,
      file_format: str = "array_record",
      **kwargs: Any,
  ):
    """Args: ``source_dir``, the idx files (default `DEFAULT_SOURCE_DIR`); ``file_format``;
    ``**kwargs``, the tfds builder arguments (``data_dir``, ``version``)."""
    super().__init__(file_format=file_format, **kwargs)
    self._source_dir = os.fspath(source_dir or DEFAULT_SOURCE_DIR)
    # tfds pickles builders by re-running __init__ with this state.
    self._original_state = dict(
        self._original_state, source_dir=self._source_dir, file_format=file_format
    )

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "Fashion-MNIST is a dataset of Zalando's article images consisting of a training set "
            "of 60,000 examples and a test set of 10,000 examples. Each example is a 28x28 "
            "grayscale image, associated with a label from 10 classes."
        ),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(28, 28, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
        }),
        supervised_keys=("image", "label"),
        homepage="https://github.com/zalandoresearch/fashion-mnist",
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    del dl_manager  # Nothing to download.
    source_dir = check_source_dir(self._source_dir)
    return {
        split: self._generate_examples(
            os.path.join(source_dir, images), os.path.join(source_dir, labels)
        )
        for split, (images, labels) in SOURCE_FILES.items()
    }

  def _generate_examples(self, images_path: str, labels_path: str) -> Iterator[tuple[int, dict]]:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
      raise ValueError(
          f"{images_path}: expected uint8 (n, 28, 28), got {images.dtype} {images.shape}"
      )
    if labels.shape != images.shape[:1]:
      raise ValueError(f"{labels_path}: {labels.shape[0]} labels for {images.shape[0]} images")
    # Keys are the indices in the source files, as in the catalog builder, so the on-disk shuffle
    # (a hash of the keys) is the catalog's too. PIL images are PNG-encoded by tfds without TF.
    for index, (image, label) in enumerate(zip(images, labels)):
      yield index, {"image": PIL.Image.fromarray(image), "label": int(label)}


def prepare(
    data_dir: str | os.PathLike[str], source_dir: str | os.PathLike[str] | None = None
) -> FashionMnist:
  """Builds Fashion-MNIST into ``data_dir`` unless it is there already; returns the builder.

  Idempotent: a prepared dataset is reused as is. Atomic: tfds writes into
  ``DATA_DIR/fashion_mnist/incomplete.*`` and renames it to ``3.0.1`` only once every split is
  written, deleting the temporary directory if the build fails.

  Args:
    data_dir: the tfds data directory; the dataset goes to ``data_dir/fashion_mnist/3.0.1``.
    source_dir: directory with the 4 idx .gz files; defaults to `DEFAULT_SOURCE_DIR`.

  Returns:
    The prepared `FashionMnist` builder; ``builder.as_data_source(split)`` reads a split.

  Raises:
    FileNotFoundError: the dataset is not prepared and an idx file is missing.

  Example:
    >>> builder = prepare("/tmp/tfds")  # doctest: +SKIP
    >>> builder.info.splits["train"].num_examples  # doctest: +SKIP
    60000
  """
  builder = FashionMnist(data_dir=os.fspath(data_dir), source_dir=source_dir)
  if not _is_prepared(builder):
    check_source_dir(source_dir)  # Fail before tfds creates any directory.
    with tempfile.TemporaryDirectory() as download_dir:  # tfds makes one; nothing goes in it.
      builder.download_and_prepare(download_dir=download_dir)
  return builder


def load(data_dir: str | os.PathLike[str], split: str) -> Sequence[dict[str, Any]]:
  """Random-access reader of a prepared split (tfds ``ArrayRecordDataSource``).

  Args:
    data_dir: the tfds data directory given to `prepare`.
    split: ``"train"``, ``"test"`` or a tfds split expression such as ``"train[:10%]"``.

  Returns:
    A sequence (``len``, ``[i]``) of ``{"image": uint8 (28, 28, 1), "label": int}``.

  Raises:
    FileNotFoundError: the dataset is not prepared in ``data_dir``; the message says how.

  Example:
    >>> test = load("/tmp/tfds", "test")  # doctest: +SKIP
    >>> len(test), test[0]["image"].dtype  # doctest: +SKIP
    (10000, dtype('uint8'))
  """
  data_dir = os.fspath(data_dir)
  builder = FashionMnist(data_dir=data_dir)
  if not _is_prepared(builder):
    raise FileNotFoundError(
        f"Fashion-MNIST is not prepared in {data_dir}: {_PREPARE_HINT.format(data_dir=data_dir)}"
    )
  return builder.as_data_source(split)


def preprocess(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Model inputs from a batch: ``image`` uint8 (B, 28, 28, 1) -> float32 in [0, 1], ``label``
  -> int32 (B,); other entries (e.g. an eval ``mask``) pass through.

  Example:
    >>> batch = {"image": np.full((2, 28, 28, 1), 255, np.uint8), "label": np.array([3, 9])}
    >>> out = preprocess(batch)
    >>> out["image"].dtype, float(out["image"].max()), out["label"].dtype
    (dtype('float32'), 1.0, dtype('int32'))
  """
  out = dict(batch)
  out["image"] = np.asarray(batch["image"], np.float32) / np.float32(255)
  out["label"] = np.asarray(batch["label"], np.int32)
  return out


def _is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
  # The version directory appears, with its dataset_info.json, only when tfds renames the
  # finished build into place. (`builder.is_prepared()` says the same but logs a warning.)
  return (builder.data_path / "dataset_info.json").exists()


def main(argv: Sequence[str] | None = None) -> None:
  """Command line: ``python -m jaxcomp.data.fashion_mnist --data_dir DIR [--source_dir D]``."""
  parser = argparse.ArgumentParser(description="Build Fashion-MNIST (tfds, array_record).")
  parser.add_argument("--data_dir", required=True, help="tfds data directory to write into")
  parser.add_argument("--source_dir", default=None,
                      help=f"directory of the 4 idx .gz files (default {DEFAULT_SOURCE_DIR})")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  try:
    builder = prepare(args.data_dir, args.source_dir)
  except FileNotFoundError as e:
    sys.exit(f"error: {e}")
  splits = ", ".join(f"{k}: {v.num_examples}" for k, v in sorted(builder.info.splits.items()))
  print(f"Fashion-MNIST ready in {builder.data_dir} ({splits}) "
        f"after {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
  main()
