"""Gradual block sparsity inside the training loop (configs/fmnist_sparse.py, tiny)."""

import json
import pathlib
import sys

import numpy as np
import pytest

from jaxcomp.train.loop import train

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "configs"))
import fmnist_sparse  # noqa: E402  pylint: disable=wrong-import-position


def test_block_sparsity_reaches_its_target_in_training(data_dir, tmp_path):
  config = fmnist_sparse.get_config("block16_90,tiny")
  config.data.data_dir = data_dir
  config.train.progress = False
  report = train(config, str(tmp_path / "run"))
  # fc1 (784, 32) in 8x8 tiles: 353 of 392 tiles pruned (round(0.9 * 392)).
  assert report["sparsity"] == pytest.approx(353 * 64 / (784 * 32))
  assert np.isfinite(report["test_loss"])
  rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert rows[-1]["step"] == report["steps"]


def test_sparsity_rules_need_a_schedule(data_dir, tmp_path):
  config = fmnist_sparse.get_config("block16_90,tiny")
  config.data.data_dir = data_dir
  del config.train["sparsity"]
  with pytest.raises(ValueError, match="set train.sparsity"):
    train(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()  # nothing written
