"""Comparison of evaluated runs: one table, the Pareto frontier, and plots.

``python -m jaxcomp compare runs/* [--out DIR] [--baseline NAME]`` reads each run's harness
report (`find_report`), scores every run against the baseline (`harness.derived_scores`),
marks the runs on the non-dominated frontier of (quality, bytes, latency) and writes
``comparison.md``, ``comparison.json`` and two PNG plots: quality vs size and quality vs
latency, with the frontier of each plane drawn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import json
import os
import pathlib
from typing import Any

from jaxcomp.eval import harness, metrics


def find_report(run: str | os.PathLike) -> dict[str, Any]:
  """The harness report of a run directory: its ``report.json`` when that holds one, else the
  last ``stages/<i>_eval/report.json``.

  Example::

    find_report("runs/smollm2/p_kd_q")["quality"]["ppl"]
  """
  run = pathlib.Path(run)
  candidates = [run / "report.json"] + sorted(
      run.glob("stages/*_eval/report.json"),
      key=lambda p: int(p.parent.name.split("_", 1)[0]), reverse=True)
  for path in candidates:
    if path.is_file():
      try:
        report = json.loads(path.read_text())
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
      if isinstance(report, dict) and {"kind", "quality", "size", "speed"} <= report.keys():
        return report
  raise ValueError(f"{run}: no evaluation report (report.json from the harness, or "
                   f"stages/<i>_eval/report.json); run `python -m jaxcomp eval --workdir {run}`")


def compare(reports: Mapping[str, Mapping[str, Any]], *, baseline: str | None = None,
            alpha: float = 1.0, weights: Sequence[float] = metrics.PARETO_WEIGHTS,
            out_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
  """One row per run: quality, size, latency, derived scores, and whether it is on the frontier.

  ``baseline`` names the reference run (default: the largest by bytes, i.e. the uncompressed
  model). With ``out_dir``, writes ``comparison.md``, ``comparison.json``,
  ``quality_vs_size.png`` and ``quality_vs_latency.png`` there.

  Example::

    rows = compare({n: find_report(f"runs/{n}") for n in names}, out_dir="runs/compare")
    [r["run"] for r in rows if r["frontier"]]
  """
  if not reports:
    raise ValueError("compare needs at least one run")
  kinds = {r["kind"] for r in reports.values()}
  if len(kinds) > 1:
    raise ValueError(f"cannot compare runs of different kinds: {sorted(kinds)}")
  names = list(reports)
  if baseline is None:
    baseline = max(names, key=lambda n: reports[n]["size"]["bytes"])
  if baseline not in reports:
    raise ValueError(f"baseline {baseline!r} is not one of the runs: {', '.join(names)}")
  lm = kinds == {"lm"}
  rows = []
  for name in names:
    r = reports[name]
    d = harness.derived_scores(r, reports[baseline], alpha=alpha, weights=weights)
    row = {"run": name, "quality": harness.quality_of(r), "bytes": r["size"]["bytes"],
           "bits_per_param": r["size"]["bits_per_param"], "sparsity": r["size"]["sparsity"],
           "p50_ms": r["speed"]["p50_ms"], "throughput": r["speed"]["throughput"],
           "robustness": r.get("robustness", {}).get("score"), **{
               k: d[k] for k in ("quality_ratio", "lat", "pe", "pareto_score")}}
    if lm:
      row["band"] = d["band"]
    rows.append(row)
  objectives = [(row["quality"] * (-1 if lm else 1), row["bytes"], row["p50_ms"])
                for row in rows]
  front = set(metrics.pareto_frontier(objectives, maximize=(True, False, False)))
  for i, row in enumerate(rows):
    row["frontier"] = i in front
  if out_dir is not None:
    _write(rows, pathlib.Path(out_dir), baseline, lm)
  return rows


def _write(rows: list[dict[str, Any]], out: pathlib.Path, baseline: str, lm: bool) -> None:
  out.mkdir(parents=True, exist_ok=True)
  qname = "ppl" if lm else "accuracy"
  cols = ["run", qname, "MB", "bits/param", "sparsity", "p50 ms", "LAT", "PE", "Pareto",
          "RS", "frontier"]
  lines = [f"Baseline: `{baseline}`. Quality ratio = "
           + ("ppl_base / ppl" if lm else "accuracy / accuracy_base") + ".", "",
           "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for r in rows:
    rs = "" if r["robustness"] is None else f"{r['robustness']:.3f}"
    lines.append(f"| {r['run']} | {r['quality']:.4f} | {r['bytes'] / 1e6:.3f} | "
                 f"{r['bits_per_param']:.2f} | {r['sparsity']:.3f} | {r['p50_ms']:.2f} | "
                 f"{r['lat']:.3f} | {r['pe']:.3f} | {r['pareto_score']:.3f} | {rs} | "
                 f"{'yes' if r['frontier'] else ''} |")
  (out / "comparison.md").write_text("\n".join(lines) + "\n")
  (out / "comparison.json").write_text(json.dumps(rows, indent=2))
  _plot(rows, "bytes", "stored size (MB)", 1e-6, qname, lm, out / "quality_vs_size.png")
  _plot(rows, "p50_ms", "latency p50 per batch (ms)", 1.0, qname, lm,
        out / "quality_vs_latency.png")


def _plot(rows: list[dict[str, Any]], key: str, xlabel: str, xscale: float, qname: str,
          lm: bool, path: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  xs = [r[key] * xscale for r in rows]
  ys = [r["quality"] for r in rows]
  front = metrics.pareto_frontier([(y * (-1 if lm else 1), x) for x, y in zip(xs, ys)],
                                  maximize=(True, False))
  fig, ax = plt.subplots(figsize=(6, 4.2), dpi=110)
  ax.scatter(xs, ys, color="tab:blue", zorder=3)
  for x, y, r in zip(xs, ys, rows):
    ax.annotate(r["run"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
  pts = sorted((xs[i], ys[i]) for i in front)
  ax.plot([p[0] for p in pts], [p[1] for p in pts], "--", color="tab:red", zorder=2,
          label="Pareto frontier")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(qname + (" (lower is better)" if lm else ""))
  ax.grid(alpha=0.3)
  ax.legend(loc="best", fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
