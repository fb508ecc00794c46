"""Corrupting orbax checkpoints on disk for the integrity tests: the files of a directory, its
ocdbt data files, and a bit flip or a rewrite that is undone when the ``with`` block ends."""

import contextlib
import glob
import os


def files(directory) -> list[str]:
  """Every file under ``directory``, sorted."""
  return sorted(f for f in glob.glob(f"{directory}/**/*", recursive=True) if os.path.isfile(f))


def data_files(item_dir) -> list[str]:
  """The ocdbt data files (files in ``d/`` directories) of an orbax item, largest first."""
  found = [f for f in files(item_dir) if os.path.basename(os.path.dirname(f)) == "d"]
  return sorted(found, key=os.path.getsize, reverse=True)


def top_level(found, item_dir) -> list[str]:
  """Those of ``found`` that belong to the item's top-level ocdbt (its merged b-tree)."""
  return [f for f in found if os.path.dirname(os.path.dirname(f)) == str(item_dir)]


def write(path, data: bytes) -> None:
  with open(path, "wb") as f:
    f.write(data)


def flip(path, pos: int) -> bytes:
  """Flips one bit at byte ``pos`` of ``path`` (for good); returns the original bytes."""
  with open(path, "rb") as f:
    data = f.read()
  bad = bytearray(data)
  bad[pos] ^= 1 << (pos % 8)
  write(path, bytes(bad))
  return data


@contextlib.contextmanager
def flipped(path, pos: int):
  """One bit at byte ``pos`` of ``path`` flipped inside the block, restored after it."""
  original = flip(path, pos)
  try:
    yield
  finally:
    write(path, original)


@contextlib.contextmanager
def rewritten(path, data: bytes):
  """``path`` holding ``data`` inside the block, its original bytes after it."""
  with open(path, "rb") as f:
    original = f.read()
  write(path, data)
  try:
    yield
  finally:
    write(path, original)
