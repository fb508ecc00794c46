"""Local text corpora as tfds datasets (array_record, no TensorFlow), tokenized and packed.

`TextCorpus` is a tfds builder whose examples are documents (``{"text": str}``) of a local
corpus, written once as array_record and read back with ``as_data_source()``:

* ``austen``: Jane Austen's six novels (Debian ``r-cran-janeaustenr``, `jaxcomp.data.austen`),
  one document per chapter; ``train`` = the first five novels, ``validation`` = *Persuasion*;
* ``wikitext2``: WikiText-2 (the tokenized variant in ``../shared/data/wikitext-2``), one
  document per article (`` = Title = `` lines); ``validation`` (to tune) and ``test`` (to
  report) -- there is no training split here: train on Austen or your files;
* any text files: `files_config(name, {"train": [paths], ...})`, one document per file.

`packed_tokens` tokenizes a split with the model's tokenizer (documents joined by an
end-of-text token), cuts the stream into rows of ``seq_len + 1`` tokens (row ``i`` is tokens
``[i L, (i + 1) L]``: inputs ``row[:-1]``, labels ``row[1:]``) and caches the ``int32`` matrix
as ``.npy`` beside the dataset (keyed by the tokenizer's hash and ``seq_len``), so later runs
memory-map it and each process reads only the rows of its batches.

Example::

  source = packed_tokens(data_dir, "austen", "train", tokenizer, seq_len=256)
  sampler = TrainSampler(source, batch_size=8, seed=0, process_slice=(jax.process_index(),
                                                                       jax.process_count()))
  batch = sampler.batch_at(step)            # {"tokens": int32[8 / n_processes, 257]}
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from jaxcomp.eval.perplexity import WIKITEXT2_DIR

CORPORA = ("austen", "wikitext2")
_WIKI_SPLITS = {"validation": "valid.txt", "test": "test.txt"}
_AUSTEN_VALIDATION = "Persuasion"


@dataclasses.dataclass
class TextCorpusConfig(tfds.core.BuilderConfig):
  """A corpus: ``files`` maps split -> text files (one document each); empty for the built-in
  corpora."""

  files: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)


def files_config(name: str, files: Mapping[str, Sequence[str]]) -> TextCorpusConfig:
  """A corpus of local text files, one document per file, e.g.
  ``files_config("notes", {"train": ["a.txt", "b.txt"], "validation": ["c.txt"]})``.

  Raises:
    ValueError: a bad name, no splits, or a file that does not exist (named).
  """
  if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name in CORPORA:
    raise ValueError(f"text corpus name must be lower-case [a-z0-9_] and not one of {CORPORA}; "
                     f"got {name!r}")
  if not files:
    raise ValueError(f"text corpus {name!r}: give at least one split of files")
  for split, paths in files.items():
    for p in paths:
      if not os.path.isfile(p):
        raise ValueError(f"text corpus {name!r}, split {split!r}: no file {p}")
  digest = hashlib.sha256(repr(sorted((k, tuple(v)) for k, v in files.items())).encode())
  return TextCorpusConfig(name=f"{name}_{digest.hexdigest()[:8]}", files=dict(files),
                          version="1.0.0", description=f"local text files: {name}")


def _wiki_articles(text: str) -> list[str]:
  """WikiText articles: a document starts at each top-level `` = Title = `` line."""
  docs, current = [], []
  for line in text.splitlines(keepends=True):
    if re.fullmatch(r" = [^=](?:.*[^=])? = \n?", line) and current:
      docs.append("".join(current))
      current = []
    current.append(line)
  if current:
    docs.append("".join(current))
  return [d for d in docs if d.strip()]


def _chapters(book: str) -> list[str]:
  parts = re.split(r"\n(?=(?:CHAPTER|Chapter) [IVXLC\d]+)", book)
  return [p for p in parts if p.strip()]


class TextCorpus(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Documents of a local text corpus (see the module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [
      TextCorpusConfig(name="austen", description="Jane Austen's six novels, by chapter"),
      TextCorpusConfig(name="wikitext2", description="WikiText-2 raw, by article"),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
        supervised_keys=None)

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    if cfg.files:
      return {split: self._generate_examples(("files", tuple(paths))) for split, paths in cfg.files.items()}
    if cfg.name == "wikitext2":
      root = WIKITEXT2_DIR
      for f in _WIKI_SPLITS.values():
        if not (root / f).is_file():
          raise FileNotFoundError(f"WikiText-2: no {root / f}")
      return {split: self._generate_examples(("wiki", str(root / f)))
              for split, f in _WIKI_SPLITS.items()}
    return {"train": self._generate_examples(("austen", "train")),
            "validation": self._generate_examples(("austen", "validation"))}

  def _generate_examples(self, what):
    kind, arg = what
    if kind == "files":
      docs = [pathlib.Path(p).read_text(encoding="utf-8") for p in arg]
    elif kind == "wiki":
      docs = _wiki_articles(pathlib.Path(arg).read_text(encoding="utf-8"))
    else:
      from jaxcomp.data.austen import austen_books  # pylint: disable=import-outside-toplevel
      books = austen_books()
      names = [n for n in books if (n == _AUSTEN_VALIDATION) == (arg == "validation")]
      docs = [c for n in names for c in _chapters(books[n])]
    for i, doc in enumerate(docs):
      yield i, {"text": doc}


def builder(data_dir: str | os.PathLike, corpus: str | TextCorpusConfig) -> TextCorpus:
  """The tfds builder of ``corpus`` ("austen", "wikitext2" or a `files_config`) in
  ``data_dir``."""
  if isinstance(corpus, str) and corpus not in CORPORA:
    raise ValueError(f"text corpus must be one of {', '.join(CORPORA)} or a files_config(...); "
                     f"got {corpus!r}")
  return TextCorpus(data_dir=str(data_dir), config=corpus,
                    file_format=tfds.core.FileFormat.ARRAY_RECORD)


def documents(data_dir: str | os.PathLike, corpus: str | TextCorpusConfig,
              split: str) -> Sequence[dict[str, Any]]:
  """The documents of a split (prepared on first use): a random-access source of
  ``{"text": bytes}``."""
  b = builder(data_dir, corpus)
  b.download_and_prepare()
  if split not in b.info.splits:
    raise ValueError(f"text corpus {b.builder_config.name!r} has no split {split!r} "
                     f"(splits: {', '.join(sorted(b.info.splits))})")
  return b.as_data_source(split=split)


def tokenizer_digest(tokenizer: Any) -> str:
  """A short hash of a `tokenizers.Tokenizer`'s full definition (vocabulary, merges, rules)."""
  return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:12]


class PackedTokens:
  """Rows of ``seq_len + 1`` tokens (a memory-mapped ``int32[n, seq_len + 1]``): a random-access
  source of ``{"tokens": row}``."""

  def __init__(self, tokens: np.ndarray):
    self.tokens = tokens

  def __len__(self) -> int:
    return int(self.tokens.shape[0])

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {"tokens": np.asarray(self.tokens[index])}

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
    rows = np.asarray(self.tokens[np.asarray(indices)])
    return [{"tokens": r} for r in rows]


def pack(docs: Sequence[Sequence[int]], seq_len: int, eot: int) -> np.ndarray:
  """Joins token lists with ``eot`` after each and cuts rows of ``seq_len + 1`` tokens,
  consecutive rows sharing their boundary token (the tail that does not fill a row is dropped).

  Example:
    >>> pack([[1, 2, 3], [4, 5]], seq_len=3, eot=0).tolist()
    [[1, 2, 3, 0], [0, 4, 5, 0]]
  """
  stream = np.concatenate([np.append(np.asarray(d, np.int32), np.int32(eot)) for d in docs])
  n = (len(stream) - 1) // seq_len
  if n < 1:
    raise ValueError(f"packing: {len(stream)} tokens do not fill one row of {seq_len + 1}")
  idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
  return stream[idx]


def packed_tokens(data_dir: str | os.PathLike, corpus: str | TextCorpusConfig, split: str,
                  tokenizer: Any, *, seq_len: int, eot: int | None = None) -> PackedTokens:
  """A split tokenized by ``tokenizer`` and packed into rows of ``seq_len + 1`` (cached).

  Args:
    data_dir: the tfds data directory (the dataset and the ``.npy`` cache live there).
    corpus: "austen", "wikitext2" or a `files_config`.
    split: "train", "validation", ("test").
    tokenizer: a `tokenizers.Tokenizer`.
    seq_len: tokens per training example (rows hold ``seq_len + 1``).
    eot: the end-of-text id between documents (default: the tokenizer's ``<|endoftext|>``,
      else id 0).
  """
  if not isinstance(seq_len, int) or seq_len < 1:
    raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
  b = builder(data_dir, corpus)
  cache = pathlib.Path(b.data_dir) / f"packed-{split}-{tokenizer_digest(tokenizer)}-{seq_len}.npy"
  if not cache.is_file():
    docs = documents(data_dir, corpus, split)
    if eot is None:
      eot = tokenizer.token_to_id("<|endoftext|>") or 0
    ids = [tokenizer.encode(bytes(d["text"]).decode("utf-8") if isinstance(
        d["text"], (bytes, np.bytes_)) else str(d["text"])).ids for d in docs]
    rows = pack(ids, seq_len, eot)
    tmp = cache.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, rows)
    os.replace(tmp, cache)  # complete or absent, never half-written
  return PackedTokens(np.load(cache, mmap_mode="r"))
