"""The pipeline's ``search`` stage: a per-layer recipe chosen under a budget, for a later stage.

A section ``config.stage.<name>`` with ``kind = "search"`` scores the current model's layers
(``layers``, a path regex) and writes ``recipe.json``, which a later ``ptq`` / ``factorize`` /
``prune`` stage applies when its section says ``recipe_from = "<name>"`` (instead of
``recipe``). Its ``space`` says what is chosen per layer:

* ``"quant"``: one of ``candidates`` (name -> `jaxcomp.Quant` fields, weight-only) per layer,
  scored by `jaxcomp.sensitivity` and allocated by `Sensitivity.recipe` with the packed
  ``budget`` in bits per weight (values + scales + zero points); for a ``ptq`` stage;
* ``"lowrank"``: one of ``candidates`` (name -> `jaxcomp.LowRank` fields, or None: the layer
  left dense) per layer, ``budget`` in bits per weight of the stored factors (a float32
  kernel is 32: ``0.8 * 32`` keeps 80% of the weights); for a ``factorize`` stage;
* ``"owl"``: OWL's non-uniform sparsity (`jaxcomp.owl_recipe`: ``sparsity`` overall,
  ``method``, ``m``, ``lam``, ``group``: the path prefix whose layers share one ratio, e.g.
  a block); for a ``prune`` stage.

``estimator`` (``"hessian"``, default, ``"fisher"``, ``"kl"`` or ``"calibrated"``:
`Sensitivity.estimator`) is the score allocated on; ``fisher_n_seq > 0`` measures the Fisher
score's output gradients on the first ``fisher_n_seq`` calibration sequences; ``kl_n_seq > 0``
also measures the direct score (KL per token with one layer compressed) on the first
``kl_n_seq`` calibration sequences, for the candidates ``kl_candidates`` (default all), and
reports each cheap estimator's Spearman correlation with it. ``scores`` names the ``sensitivity.json``
of an earlier search of the same model and candidates, to allocate again at another budget
without scoring again. The stage dir also gets ``sensitivity.json`` (every layer's scores
and packed bits per candidate) and ``allocation.png`` (what each layer got, and the predicted
loss against the budget).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import time
from typing import Any

import ml_collections
import numpy as np

from jaxcomp.lowrank.spec import LowRank
from jaxcomp.oneshot import owl_recipe, registry, sensitivity
from jaxcomp.oneshot.scoring import Sensitivity
from jaxcomp.quant.spec import Quant, SpecError
from jaxcomp.recipe import Recipe

# space -> the stage kind that applies the searched recipe
SPACES = {"quant": "ptq", "lowrank": "factorize", "owl": "prune"}
_FIELDS = {
    "quant": ("candidates", "budget", "estimator", "kl_n_seq", "kl_candidates", "fisher_n_seq",
              "scores"),
    "lowrank": ("candidates", "budget", "estimator", "kl_n_seq", "kl_candidates", "fisher_n_seq",
                "scores"),
    "owl": ("sparsity", "method", "m", "lam", "group"),
}


def check(index: int, name: str, cfg: ml_collections.ConfigDict) -> None:
  """One-line `ValueError` for anything wrong in search section ``name`` (stage ``index``)."""
  where = f"stage {index} {name!r} (search)"
  space = cfg.get("space", "quant")
  if space not in SPACES:
    raise ValueError(f"{where}: space must be one of {', '.join(SPACES)}, got {space!r}")
  unknown = sorted(set(cfg) - {"kind", "layers", "space", *_FIELDS[space]})
  if unknown:
    raise ValueError(f"{where}: unknown field {unknown[0]!r} for space {space!r} (fields: "
                     f"layers, space, {', '.join(_FIELDS[space])})")
  if not cfg.get("layers"):
    raise ValueError(f"{where}: set layers, the regex of the layer paths to search over")
  if space == "owl":
    s = cfg.get("sparsity")
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 < s < 1.0:
      raise ValueError(f"{where}: sparsity must be in (0, 1), got {s!r}")
    method = cfg.get("method", "wanda")
    if method not in registry.names("sparsity"):
      raise ValueError(f"{where}: unknown pruning method {method!r} (methods: "
                       f"{', '.join(registry.names('sparsity'))})")
    return
  specs = candidates(index, name, cfg)
  b = cfg.get("budget")
  if isinstance(b, bool) or not isinstance(b, (int, float)) or not b > 0:
    raise ValueError(f"{where}: budget must be bits per weight > 0, got {b!r}")
  est = cfg.get("estimator", "hessian")
  if est not in ("hessian", "fisher", "kl", "calibrated"):
    raise ValueError(f"{where}: estimator must be 'hessian', 'fisher', 'kl' or 'calibrated', "
                     f"got {est!r}")
  for field in ("kl_n_seq", "fisher_n_seq"):
    n = cfg.get(field, 0)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
      raise ValueError(f"{where}: {field} must be an int >= 0, got {n!r}")
  need = "fisher_n_seq" if est == "fisher" else "kl_n_seq"
  if est != "hessian" and not cfg.get(need, 0) and not cfg.get("scores"):
    raise ValueError(f"{where}: estimator {est!r} needs {need} > 0 (calibration sequences "
                     "it is measured on)")
  missing = sorted(set(cfg.get("kl_candidates") or ()) - set(specs))
  if missing:
    raise ValueError(f"{where}: kl_candidates {missing} are not candidates ({sorted(specs)})")
  scores = cfg.get("scores", "")
  if scores and not pathlib.Path(scores).is_file():
    raise ValueError(f"{where}: scores={scores!r}: no such file")


def candidates(index: int, name: str, cfg: ml_collections.ConfigDict
               ) -> dict[str, Quant | LowRank | None]:
  """The section's candidates as specs (`Quant` for space quant, `LowRank` or None for
  lowrank), with a one-line error naming a bad one."""
  where = f"stage {index} {name!r} (search)"
  raw = cfg.get("candidates")
  if not raw:
    raise ValueError(f"{where}: candidates is empty: give name -> spec fields")
  raw = raw.to_dict() if isinstance(raw, ml_collections.ConfigDict) else dict(raw)
  space = cfg.get("space", "quant")
  out: dict[str, Quant | LowRank | None] = {}
  for n, fields in raw.items():
    if fields is None:
      if space == "quant":
        raise ValueError(f"{where}: candidate {n!r} is None; space 'quant' needs Quant fields")
      out[n] = None
      continue
    try:
      out[n] = (Quant if space == "quant" else LowRank).from_dict(fields)
    except (SpecError, TypeError, ValueError) as e:
      raise ValueError(f"{where}: candidate {n!r}: {str(e).splitlines()[0]}") from None
    if space == "quant" and out[n].a_bits is not None:
      raise ValueError(f"{where}: candidate {n!r} quantizes activations; the search chooses "
                       "weight-only candidates")
  return out


def fingerprint_inputs(cfg: ml_collections.ConfigDict) -> dict[str, str]:
  """What the stage reads besides its section: the digest of a ``scores`` file."""
  scores = cfg.get("scores", "")
  if not scores:
    return {}
  return {"scores": hashlib.sha256(pathlib.Path(scores).read_bytes()).hexdigest()}


def run(model: Any, index: int, name: str, cfg: ml_collections.ConfigDict, calib: Any,
        directory: pathlib.Path, **kwargs: Any) -> dict[str, Any]:
  """Runs the search on ``model`` (left untouched); writes ``recipe.json``,
  ``sensitivity.json`` and ``allocation.png`` into ``directory``; returns the report.
  ``kwargs``: the calibration options of `jaxcomp.ptq` (batch_size, calib_dtype)."""
  kwargs = {k: v for k, v in kwargs.items() if k in ("batch_size", "calib_dtype")}
  space = cfg.get("space", "quant")
  t0 = time.perf_counter()
  if space == "owl":
    recipe, per_layer = owl_recipe(model, cfg.layers, calib, float(cfg.sparsity),
                                   m=float(cfg.get("m", 5.0)), lam=float(cfg.get("lam", 0.08)),
                                   method=cfg.get("method", "wanda"), group=cfg.get("group") or None,
                                   progress=False, **kwargs)
    seconds = time.perf_counter() - t0
    _write(directory / "recipe.json", recipe.to_config().to_dict())
    _plot(directory / "allocation.png", list(per_layer), list(per_layer.values()),
          ylabel="sparsity", title=f"OWL sparsity per layer ({float(cfg.sparsity):g} overall)")
    values = np.asarray(list(per_layer.values()))
    return {"space": space, "sparsity": float(cfg.sparsity), "layers": len(per_layer),
            "min_sparsity": float(values.min()), "max_sparsity": float(values.max()),
            "per_layer": per_layer, "seconds_scoring": round(seconds, 2)}

  specs = candidates(index, name, cfg)
  if cfg.get("scores"):
    sens = Sensitivity.from_dict(json.loads(pathlib.Path(cfg.scores).read_text()))
    if sens.names != tuple(specs) or sens.specs != tuple(specs.values()):
      raise ValueError(f"stage {index} {name!r} (search): {cfg.scores} scored other candidates "
                       f"({list(sens.names)}) than this section's ({list(specs)})")
  else:
    first = {}
    for field in ("kl_n_seq", "fisher_n_seq"):
      n = int(cfg.get(field, 0))
      first[field] = np.asarray(calib)[:n] if n else None
      if n and len(first[field]) < n:
        raise ValueError(f"stage {index} {name!r} (search): {field}={n} but the calibration "
                         f"has {len(first[field])} sequences")
    n_kl = int(cfg.get("kl_n_seq", 0))
    sens = sensitivity(model, cfg.layers, specs, calib, progress=False,
                       kl_tokens=first["kl_n_seq"], fisher_tokens=first["fisher_n_seq"],
                       kl_candidates=list(cfg.get("kl_candidates") or specs) if n_kl else None,
                       **kwargs)
  seconds = time.perf_counter() - t0
  t1 = time.perf_counter()
  estimator = cfg.get("estimator", "hessian")
  recipe, alloc = sens.recipe(float(cfg.budget), estimator=estimator)
  frontier = sens.frontier(estimator=estimator)
  seconds_alloc = time.perf_counter() - t1
  _write(directory / "recipe.json", recipe.to_config().to_dict())
  _write(directory / "sensitivity.json", sens.to_dict())
  groups = sens.groups()
  params = np.asarray([sens.params[rows].sum() for _, rows in groups], np.float64)
  bits = np.asarray([sens.bits[rows, c].sum() for (_, rows), c in zip(groups, alloc.choice)])
  chosen = [sens.names[c] for c in alloc.choice]
  _plot(directory / "allocation.png", [p for p, _ in groups], list(bits / params),
        ylabel="bits per weight", title=f"{space} allocation at {float(cfg.budget):g} bits/weight",
        labels=chosen, frontier=frontier, budget=float(cfg.budget))
  report = {"space": space, "budget": float(cfg.budget), "estimator": estimator,
            "bits_per_param": sens.bits_per_param(alloc.choice),
            "predicted_loss": alloc.loss, "layers": len(sens.paths), "choices": len(groups),
            "counts": {n: chosen.count(n) for n in sens.names},
            "per_layer": dict(zip([p for p, _ in groups], chosen)),
            "seconds_scoring": round(seconds, 2), "seconds_allocation": round(seconds_alloc, 3),
            "scores_from": cfg.get("scores", "") or None}
  if sens.kl is not None:
    report["spearman"] = {e: sens.spearman(e) for e in ("hessian", "fisher")
                          if e == "hessian" or sens.fisher is not None}
  step = max(1, len(frontier[0]) // 64)
  report["frontier"] = {"bits_per_param": frontier[0][::step].tolist(),
                        "predicted_loss": frontier[1][::step].tolist()}
  return report


def load_recipe(directory: pathlib.Path) -> Recipe:
  """The recipe a finished search stage wrote into ``directory``."""
  path = directory / "recipe.json"
  if not path.is_file():
    raise ValueError(f"{path} is missing: the search stage has not finished")
  return Recipe.from_config(json.loads(path.read_text()))


def _write(path: pathlib.Path, obj: Any) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=1))
  tmp.replace(path)


def _plot(path: pathlib.Path, names: list[str], values: list[float], *, ylabel: str,
          title: str, labels: list[str] | None = None,
          frontier: tuple[np.ndarray, np.ndarray] | None = None,
          budget: float | None = None) -> None:
  """A bar per layer (and, with ``frontier``, the predicted loss against the budget)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  panels = 2 if frontier is not None else 1
  fig, axes = plt.subplots(1, panels, figsize=(max(8.0, 0.06 * len(names)) + 4 * (panels - 1),
                                               4), squeeze=False,
                           gridspec_kw={"width_ratios": [3, 1][:panels]})
  ax = axes[0, 0]
  colors = None
  if labels is not None:
    order = sorted(set(labels))
    palette = plt.get_cmap("tab10" if len(order) <= 10 else "tab20")
    colors = [palette(order.index(l) % palette.N) for l in labels]
    for i, l in enumerate(order):
      ax.bar([0], [0], color=palette(i % palette.N), label=l)
    ax.legend(fontsize=7, ncol=min(4, len(order)))
  ax.bar(range(len(values)), values, color=colors, width=1.0)
  ax.set_xlabel("layer (solve order)")
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=9)
  ax.set_xlim(-0.5, len(values) - 0.5)
  if frontier is not None:
    fx = axes[0, 1]
    fx.plot(frontier[0], frontier[1], lw=1)
    fx.set_yscale("log")
    fx.set_xlabel("bits per weight")
    fx.set_ylabel("predicted loss (summed score)")
    if budget is not None:
      fx.axvline(budget, color="gray", ls="--", lw=0.8)
    fx.set_title("frontier", fontsize=9)
  fig.tight_layout()
  tmp = path.with_name("tmp_" + path.name)
  fig.savefig(tmp, dpi=90)
  plt.close(fig)
  tmp.replace(path)
