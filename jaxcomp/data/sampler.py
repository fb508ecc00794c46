"""Deterministic, resumable batch orders over random-access data sources, built on grain.

A source is anything with ``len()`` and ``[i]`` returning a dict of arrays or scalars (a tfds
``as_data_source`` split, an ``ArrayRecordDataSource``, a list of dicts).

Training (`TrainSampler`): a grain ``MapDataset`` over example indices,
``range(len(source)) -> seed(seed) -> shuffle -> batch(drop_remainder=True) -> repeat``, then
``map(read_batch)`` (one batched read of the B examples) and ``map(transform)``.
Epoch ``e`` visits the examples in the permutation ``index_shuffle(., seed_e)`` (a fresh
permutation each epoch, a pure function of the seed and ``e``) and cuts it into
``steps_per_epoch = len(source) // batch_size`` batches; the last ``len(source) % batch_size``
examples of each permutation are skipped that epoch (different ones each epoch). Step ``s`` is
batch ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch``, so ``batch_at(s)`` depends on
``(seed, s)`` only: to resume, store the step, nothing else.

Evaluation (`eval_batches`): every example once, in source order, not shuffled. The last partial
batch is padded to ``batch_size`` with zeros and every batch carries ``mask`` (bool (B,), False on
padding), so all batches have one shape (one jit compilation); ``pad=False`` keeps it short.

Batches are dicts of numpy arrays, leading dimension B; ``transform`` (applied per batch) turns them
into model inputs, e.g. `jaxcomp.data.fashion_mnist.preprocess`.

Example:
  >>> source = [{"x": np.float32(i), "y": i % 3} for i in range(10)]
  >>> sampler = TrainSampler(source, batch_size=4, seed=0)
  >>> sampler.steps_per_epoch, sampler.batch_at(5)["x"].shape
  (2, (4,))
  >>> again = TrainSampler(source, batch_size=4, seed=0)  # e.g. after a restart
  >>> np.array_equal(sampler.batch_at(5)["x"], again.batch_at(5)["x"])
  True
  >>> [b["mask"].tolist() for b in eval_batches(source, batch_size=4)][-1]
  [True, True, False, False]
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import grain
import jax
import numpy as np

Batch = dict[str, Any]

_READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=16)


class RandomAccessSource(Protocol):
  """What a sampler reads: ``len(source)`` examples, ``source[i]`` for ``0 <= i < len``."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> Any: ...


@dataclasses.dataclass(frozen=True, eq=False)
class TrainSampler:
  """Shuffled, epoch-wise reshuffled, infinite batch order; ``batch_at(step)`` is pure.

  Example:
    >>> source = [{"x": np.int32(i)} for i in range(6)]
    >>> sampler = TrainSampler(source, batch_size=3, seed=1)
    >>> epoch0 = np.concatenate([sampler.batch_at(s)["x"] for s in range(2)])
    >>> sorted(epoch0.tolist())
    [0, 1, 2, 3, 4, 5]
    >>> resumed = [b["x"].tolist() for b in sampler.iterate(start_step=3, num_steps=2)]
    >>> resumed == [sampler.batch_at(3)["x"].tolist(), sampler.batch_at(4)["x"].tolist()]
    True
  """

  source: RandomAccessSource  # len() + [i] -> dict of arrays / scalars.
  _: dataclasses.KW_ONLY
  batch_size: int  # examples per batch, B.
  seed: int  # fixes every epoch's permutation; in [0, 2**32).
  transform: Callable[[Batch], Batch] | None = None  # applied to each stacked batch.
  # (process index, process count): this host reads only its rows of every global batch,
  # rows [i * B / n, (i + 1) * B / n); the global batch is the same for every n.
  process_slice: tuple[int, int] = (0, 1)

  def __post_init__(self) -> None:
    if not isinstance(self.batch_size, int) or self.batch_size <= 0:
      raise ValueError(f"TrainSampler.batch_size must be a positive int, got {self.batch_size!r}")
    if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
      raise ValueError(f"TrainSampler.seed must be an int in [0, 2**32), got {self.seed!r}")
    i, n = self.process_slice
    if not (isinstance(n, int) and n > 0 and 0 <= i < n and self.batch_size % n == 0):
      raise ValueError(f"TrainSampler.process_slice={self.process_slice}: need 0 <= index < "
                       f"count and count dividing batch_size={self.batch_size}")
    if len(self.source) < self.batch_size:
      raise ValueError(
          f"TrainSampler: {len(self.source)} examples cannot fill one batch of {self.batch_size}"
      )

  @property
  def steps_per_epoch(self) -> int:
    """Full batches per epoch, ``len(source) // batch_size``."""
    return len(self.source) // self.batch_size

  def epoch(self, step: int) -> int:
    """The epoch that ``step`` belongs to."""
    return step // self.steps_per_epoch

  @functools.cached_property
  def dataset(self) -> grain.MapDataset:
    """The grain ``MapDataset`` of batches (infinite length): ``dataset[step]`` is a batch."""
    ds = grain.MapDataset.range(len(self.source)).seed(self.seed).shuffle()
    ds = ds.batch(self.batch_size, drop_remainder=True).repeat()
    i, n = self.process_slice
    if n > 1:
      rows = self.batch_size // n
      ds = ds.map(lambda idx: idx[i * rows:(i + 1) * rows])
    ds = ds.map(functools.partial(read_batch, self.source))
    return ds.map(self.transform) if self.transform is not None else ds

  def batch_at(self, step: int) -> Batch:
    """The batch of training step ``step`` (0-based): a dict of arrays, leading dimension B
    (B / count: this process's rows, with ``process_slice``)."""
    if step < 0:
      raise IndexError(f"step must be >= 0, got {step}")
    return self.dataset[step]

  def iterate(
      self,
      start_step: int = 0,
      num_steps: int | None = None,
      *,
      read_options: grain.ReadOptions | None = None,
  ) -> Iterator[Batch]:
    """Yields ``batch_at(start_step)``, ``batch_at(start_step + 1)``, ... with grain's threaded
    prefetch (``read_options``, default 4 threads, 16 batches ahead); ``num_steps=None`` never
    stops."""
    stop = None if num_steps is None else start_step + num_steps
    ds = self.dataset[start_step:stop]
    return iter(ds.to_iter_dataset(read_options or _READ_OPTIONS))


def eval_batches(
    source: RandomAccessSource,
    *,
    batch_size: int,
    transform: Callable[[Batch], Batch] | None = None,
    pad: bool = True,
) -> grain.MapDataset:
  """Every example of ``source`` once, in order, in batches of ``batch_size``.

  Args:
    source: the split to evaluate (``len()`` + ``[i]``).
    batch_size: examples per batch, B.
    transform: applied to each batch (after padding).
    pad: pad the last partial batch with zeros to B examples; every batch then has ``mask``, bool
      (B,), True on real examples. With ``pad=False`` the last batch is shorter and has no mask.

  Returns:
    A grain ``MapDataset`` of ``ceil(len(source) / batch_size)`` batches; iterate it or index it.

  Example:
    >>> batches = eval_batches([{"y": i} for i in range(5)], batch_size=2)
    >>> [b["y"].tolist() for b in batches], batches[2]["mask"].tolist()
    ([[0, 1], [2, 3], [4, 0]], [True, False])
  """
  if not isinstance(batch_size, int) or batch_size <= 0:
    raise ValueError(f"eval_batches: batch_size must be a positive int, got {batch_size!r}")
  ds = grain.MapDataset.range(len(source)).batch(batch_size, drop_remainder=False)
  ds = ds.map(functools.partial(read_batch, source))
  if pad:
    ds = ds.map(functools.partial(_pad_with_mask, batch_size=batch_size))
  return ds.map(transform) if transform is not None else ds


class InMemorySource:
  """A random-access source held in memory as stacked numpy arrays (decoded once).

  For datasets that fit in RAM (Fashion-MNIST: 47 MB decoded), this trades a one-off full read
  for batches that cost a fancy-index instead of B decodes.

  Example:
    >>> src = InMemorySource([{"x": np.full(2, i)} for i in range(5)])
    >>> len(src), src[3]["x"].tolist(), read_batch(src, [4, 0])["x"].tolist()
    (5, [3, 3], [[4, 4], [0, 0]])
  """

  def __init__(self, source: RandomAccessSource, *, chunk: int = 1024):
    n = len(source)
    parts = [read_batch(source, range(i, min(i + chunk, n))) for i in range(0, n, chunk)]
    self.arrays: Batch = jax.tree.map(lambda *xs: np.concatenate(xs), *parts)
    self._n = n

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, index: int) -> Batch:
    return jax.tree.map(lambda a: a[index], self.arrays)

  def take(self, indices: Sequence[int] | np.ndarray) -> Batch:
    """The examples at ``indices``, stacked (what `read_batch` uses)."""
    return jax.tree.map(lambda a: a[np.asarray(indices)], self.arrays)


def read_batch(source: RandomAccessSource, indices: Sequence[int] | np.ndarray) -> Batch:
  """Reads ``source[i]`` for ``i`` in ``indices`` and stacks them leaf by leaf: leading dim B.

  Uses the source's batched read ``__getitems__`` when it has one (tfds and array_record sources:
  one parallel read instead of B random reads, about 2x faster on Fashion-MNIST).

  Example:
    >>> read_batch([{"y": i, "x": np.full(2, i)} for i in range(5)], [4, 0])["x"].tolist()
    [[4, 4], [0, 0]]
  """
  if isinstance(source, InMemorySource):
    return source.take(indices)
  indices = [int(i) for i in indices]
  getitems = getattr(source, "__getitems__", None)
  examples = getitems(indices) if getitems is not None else [source[i] for i in indices]
  return jax.tree.map(lambda *leaves: np.stack(leaves), *examples)


def _pad_with_mask(batch: Mapping[str, Any], *, batch_size: int) -> Batch:
  """Pads every leaf of ``batch`` (a possibly nested dict) with zeros to ``batch_size`` rows;
  adds ``mask``."""
  if "mask" in batch:
    raise ValueError("eval_batches(pad=True) adds a 'mask' entry; the examples already have one")
  n = len(jax.tree.leaves(batch)[0])

  def pad(value: Any) -> np.ndarray:
    value = np.asarray(value)
    padding = np.zeros((batch_size - n, *value.shape[1:]), value.dtype)
    return np.concatenate([value, padding])

  out = dict(jax.tree.map(pad, dict(batch)) if n < batch_size else batch)
  out["mask"] = np.arange(batch_size) < n
  return out
