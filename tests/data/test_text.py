"""Text corpora as tfds datasets, packing, the token cache, per-process batch slices."""

import numpy as np
import pytest

from jaxcomp.data import sampler, text
from jaxcomp.models.io.tokenizer import ByteTokenizer


def test_files_corpus_packs_rows_and_caches_them(tmp_path, text_files):
  cfg = text.files_config("notes", {"train": [str(p) for p in text_files[:2]]})
  rows = text.packed_tokens(tmp_path / "tfds", cfg, "train", ByteTokenizer(), seq_len=64)
  stream = b"".join(p.read_bytes() + b"\0" for p in text_files[:2])  # documents + eot 0
  n = (len(stream) - 1) // 64
  assert len(rows) == n
  for i in (0, n // 2, n - 1):  # row i is tokens [64 i, 64 (i + 1)]
    assert bytes(rows[i]["tokens"].astype(np.uint8)) == stream[64 * i:64 * (i + 1) + 1]
  cached = list((tmp_path / "tfds").rglob("packed-train-*-64.npy"))
  assert len(cached) == 1 and not list((tmp_path / "tfds").rglob("*.tmp*"))
  again = text.packed_tokens(tmp_path / "tfds", cfg, "train", ByteTokenizer(), seq_len=64)
  np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(rows.tokens))


def test_process_slices_concatenate_to_the_global_batch(tmp_path, text_files):
  cfg = text.files_config("notes", {"train": [str(p) for p in text_files]})
  rows = text.packed_tokens(tmp_path / "tfds", cfg, "train", ByteTokenizer(), seq_len=32)
  whole = sampler.TrainSampler(rows, batch_size=8, seed=3)
  parts = [sampler.TrainSampler(rows, batch_size=8, seed=3, process_slice=(i, 4))
           for i in range(4)]
  for step in (0, 7, whole.steps_per_epoch + 1):
    got = np.concatenate([p.batch_at(step)["tokens"] for p in parts])
    np.testing.assert_array_equal(got, whole.batch_at(step)["tokens"])
  with pytest.raises(ValueError, match=r"process_slice=\(0, 3\): need 0 <= index < count and "
                     "count dividing batch_size=8"):
    sampler.TrainSampler(rows, batch_size=8, seed=3, process_slice=(0, 3))


def test_wiki_articles_split_at_top_level_titles():
  docs = text._wiki_articles(" = A = \n x \n = = Sub = = \n y \n = B = \n z \n")  # pylint: disable=protected-access
  assert len(docs) == 2 and docs[1].startswith(" = B = ")


def test_bad_corpus_input_is_one_line(tmp_path):
  with pytest.raises(ValueError, match="text corpus must be one of austen, wikitext2"):
    text.builder(tmp_path, "c4")
  with pytest.raises(ValueError, match=r"split 'train': no file /nonexistent.txt"):
    text.files_config("x", {"train": ["/nonexistent.txt"]})
  with pytest.raises(ValueError, match="do not fill one row of 101"):
    text.pack([[1, 2]], seq_len=100, eot=0)
