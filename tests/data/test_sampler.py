"""Batch orders: deterministic in (seed, step), resumable, every example once per epoch / eval."""

import collections

import numpy as np
import pytest

from jaxcomp.data import TrainSampler
from jaxcomp.data import eval_batches
from jaxcomp.data import read_batch


def make_source(n):
  return [{"id": np.int64(i), "x": np.full((2, 3), i, np.float32)} for i in range(n)]


class BatchedSource:
  """A source with a batched read, counting how it is read."""

  def __init__(self, n):
    self.examples, self.calls = make_source(n), collections.Counter()

  def __len__(self):
    return len(self.examples)

  def __getitem__(self, i):
    self.calls["getitem"] += 1
    return self.examples[i]

  def __getitems__(self, indices):
    self.calls["getitems"] += 1
    return [self.examples[i] for i in indices]


def ids(sampler, steps):
  return [sampler.batch_at(s)["id"].tolist() for s in steps]


def test_same_seed_same_order_other_seed_other_order():
  source = make_source(50)
  a, b = TrainSampler(source, batch_size=5, seed=3), TrainSampler(source, batch_size=5, seed=3)
  assert ids(a, range(25)) == ids(b, range(25))
  assert ids(a, range(25)) != ids(TrainSampler(source, batch_size=5, seed=4), range(25))


@pytest.mark.parametrize("n, batch_size", [(64, 8), (70, 8), (9, 3)])
def test_every_example_once_per_epoch_and_epochs_differ(n, batch_size):
  sampler = TrainSampler(make_source(n), batch_size=batch_size, seed=0)
  k = sampler.steps_per_epoch
  assert k == n // batch_size
  orders = []
  for epoch in range(3):
    seen = np.concatenate([sampler.batch_at(s)["id"] for s in range(epoch * k, (epoch + 1) * k)])
    assert len(seen) == k * batch_size == len(set(seen.tolist()))  # No repeats in an epoch...
    assert set(seen.tolist()) <= set(range(n))  # ...only n % batch_size examples skipped.
    assert {sampler.epoch(s) for s in range(epoch * k, (epoch + 1) * k)} == {epoch}
    orders.append(seen.tolist())
  assert orders[0] != orders[1] != orders[2]


def test_resume_equals_uninterrupted():
  source = make_source(37)
  run = TrainSampler(source, batch_size=4, seed=7)
  uninterrupted = [b["id"].tolist() for b in run.iterate(0, 30)]
  restarted = TrainSampler(source, batch_size=4, seed=7)  # A new process: same (seed, step).
  resumed = [b["id"].tolist() for b in restarted.iterate(start_step=17, num_steps=13)]
  assert resumed == uninterrupted[17:]
  assert ids(restarted, range(30)) == uninterrupted
  assert ids(restarted, [1_000_003]) == ids(TrainSampler(source, batch_size=4, seed=7), [1_000_003])


def test_batches_are_stacked_and_transformed():
  def transform(batch):
    return {**batch, "x": batch["x"] * 2}

  batch = TrainSampler(make_source(10), batch_size=4, seed=0, transform=transform).batch_at(3)
  assert batch["x"].shape == (4, 2, 3) and batch["x"].dtype == np.float32
  np.testing.assert_array_equal(batch["x"][:, 0, 0], 2 * batch["id"])


def test_batched_reads_are_used_when_available():
  source = BatchedSource(12)
  TrainSampler(source, batch_size=4, seed=0).batch_at(0)
  list(eval_batches(source, batch_size=5))
  assert source.calls == {"getitems": 4}
  assert read_batch(make_source(3), np.array([2, 0]))["id"].tolist() == [2, 0]


@pytest.mark.parametrize("n, batch_size", [(10, 4), (12, 4), (3, 8)])
def test_eval_pass_covers_every_example_once_in_order(n, batch_size):
  padded = list(eval_batches(make_source(n), batch_size=batch_size))
  assert len(padded) == -(-n // batch_size)
  assert all(b["id"].shape == (batch_size,) and b["x"].shape == (batch_size, 2, 3) for b in padded)
  mask = np.concatenate([b["mask"] for b in padded])
  np.testing.assert_array_equal(np.concatenate([b["id"] for b in padded])[mask], np.arange(n))
  assert mask.sum() == n and not np.concatenate([b["x"] for b in padded])[~mask].any()
  short = list(eval_batches(make_source(n), batch_size=batch_size, pad=False))
  assert "mask" not in short[0]
  np.testing.assert_array_equal(np.concatenate([b["id"] for b in short]), np.arange(n))


def test_invalid_arguments():
  with pytest.raises(ValueError, match="batch_size"):
    TrainSampler(make_source(4), batch_size=0, seed=0)
  with pytest.raises(ValueError, match="seed"):
    TrainSampler(make_source(4), batch_size=2, seed=-1)
  with pytest.raises(ValueError, match="cannot fill one batch"):
    TrainSampler(make_source(3), batch_size=4, seed=0)
  with pytest.raises(IndexError):
    TrainSampler(make_source(4), batch_size=2, seed=0).batch_at(-1)
  with pytest.raises(ValueError, match="mask"):
    list(eval_batches([{"mask": 1}], batch_size=2))


def test_golden_order():
  # Pins grain's permutation (index_shuffle + seed derivation): if an upgrade changes it, runs
  # resumed across the upgrade would see other batches than before; update knowingly.
  sampler = TrainSampler(make_source(20), batch_size=4, seed=0)
  assert ids(sampler, [0, 7]) == [[16, 2, 13, 14], [17, 7, 6, 10]]
