"""Delayed scaling inside the training loop (configs/fmnist_qat.py:w8a8_delayed,tiny): the loop
fills the absmax histories before the first step and writes them every step."""

import pathlib
import sys

import jax
import numpy as np

from jaxcomp.rewrite import delayed
from jaxcomp.train.loop import train

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "configs"))
import fmnist_qat  # noqa: E402  pylint: disable=wrong-import-position


def test_delayed_scaling_trains_through_the_loop(data_dir, tmp_path):
  config = fmnist_qat.get_config("w8a8_delayed,tiny")
  config.data.data_dir = data_dir
  config.train.progress = False
  report, model = train(config, str(tmp_path / "run"), return_model=True)
  assert np.isfinite(report["test_loss"]) and report["test_accuracy"] > 0.5
  hist = np.asarray(model.fc1.dot_general.amax_history[...])
  assert hist.shape == (2, 16) and np.isfinite(hist).all() and (hist > 0).all()
  assert model.conv1.conv_general_dilated.spec.scaling == "dynamic"
  grads_like = {"fc1": {"dot_general": {"amax_history": hist}}, "kernel": hist}
  assert jax.tree.leaves(delayed.amax_mask(grads_like)) == [True, False]
