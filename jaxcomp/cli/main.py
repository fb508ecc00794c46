"""``python -m jaxcomp --config configs/<experiment>.py[:variant] --workdir DIR``.

Trains (or resumes) the experiment in DIR (``task = "pipeline"``: runs or resumes its stages,
`jaxcomp.experiments.pipeline`, the one-shot compression configs included) and prints a short
report, also written to
``DIR/report.json`` and ``DIR/report.md``. ``python -m jaxcomp compare RUN_DIR...`` compares
evaluated runs (`compare_main`). Bad input (config, variant, workdir, checkpoint,
dataset) ends with one line on stderr and exit status 1; nothing already in DIR is overwritten.
"""

from __future__ import annotations

import json
import logging as logging_std
import os
import pathlib
import re
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

LOG_NAME = "jaxcomp.log"
_PACKAGE_DIR = str(pathlib.Path(__file__).resolve().parents[1]) + os.sep

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, optionally ':variant'.", lock_config=True)
# Exit status after SIGTERM (checkpoint saved): EX_TEMPFAIL, "try again"; launch scripts rerun.
PREEMPTED_EXIT = 75

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, report).")
flags.mark_flags_as_required(["config", "workdir"])
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Multi-process run: call jax.distributed.initialize() (on a TPU pod "
    "slice everything is detected; elsewhere give the three flags below).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (implies --distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_COMPILE_ONLY = flags.DEFINE_bool(
    "compile_only", False, "Dry run: compile the config's training step for --topology with "
    "the real TPU / GPU compiler (no device, data or weights needed), print HBM per device and "
    "write DIR/compile_report.json.")
_VERBOSE = flags.DEFINE_bool(
    "verbose", False, "Also print the libraries' log lines (orbax, tfds, ...) on the console; "
    "they always go to DIR/jaxcomp.log.")
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "With --compile_only: a TPU slice or GPU as jaxcomp.aot.target names it "
    "(v5p:4x4x4, v6e:16x16, v5e:2x2, h100, ...).")


def _init_distributed() -> None:
  """``jax.distributed.initialize`` from the flags (CPU: gloo collectives between processes)."""
  import jax  # pylint: disable=import-outside-toplevel
  if not (_DISTRIBUTED.value or _COORDINATOR.value):
    return
  if _COORDINATOR.value and (_NUM_PROCESSES.value is None or _PROCESS_ID.value is None):
    raise ValueError("--coordinator_address needs --num_processes and --process_id")
  if os.environ.get("JAX_PLATFORMS", "") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                             num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


class _WorkdirLog(logging_std.Handler):
  """Every log record, at INFO and above, into ``<workdir>/jaxcomp.log``: held in memory until
  the run has validated its inputs and claimed the workdir (`jaxcomp.train.workdir.claim`; a
  run that fails before leaves the workdir as it was), then appended."""

  def __init__(self, workdir: str):
    super().__init__(logging_std.INFO)
    self.workdir = workdir
    self.path = os.path.join(workdir, LOG_NAME)
    self._held: list[str] = []
    self._file = None
    self.setFormatter(logging.PythonFormatter())

  def emit(self, record: logging_std.LogRecord) -> None:
    try:
      line = self.format(record) + "\n"
      if self._file is None:
        from jaxcomp.train import workdir as wd  # pylint: disable=import-outside-toplevel
        if not wd.claimed(self.workdir):
          self._held.append(line)
          return
        self._file = open(self.path, "a")
        self._file.writelines(self._held)
        self._held = []
      self._file.write(line)
      self._file.flush()
    except Exception:  # pylint: disable=broad-except
      self.handleError(record)

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    super().close()


def _ours(record: logging_std.LogRecord) -> bool:
  return record.pathname.startswith(_PACKAGE_DIR)


def _quiet_console(workdir: str, verbose: bool) -> None:
  """The console shows jaxcomp's own one-line log lines (without absl's prefix), warnings and
  errors;
  the libraries' INFO lines (orbax prints ~100 per run) go to ``<workdir>/jaxcomp.log`` only,
  unless ``--verbose``. Python warnings and exceptions ignored in background threads at exit
  (orbax's "Event loop is closed") go to the log file too."""
  console = logging.get_absl_handler()
  library_format = logging.PythonFormatter()

  class Console(logging_std.Formatter):
    def format(self, record: logging_std.LogRecord) -> str:
      if not _ours(record):
        return library_format.format(record)
      prefix = "jaxcomp: warning: " if record.levelno == logging_std.WARNING else "jaxcomp: "
      return prefix + record.getMessage()

  # jaxcomp's one-line status messages and warnings; its multi-line tables (the match report
  # of a recipe) only in the log file, as everything from the libraries below ERROR.
  console.addFilter(lambda r: verbose or r.levelno >= logging_std.ERROR or (
      _ours(r) and (r.levelno >= logging_std.WARNING or "\n" not in r.getMessage())))
  console.setFormatter(Console())
  root = logging_std.getLogger()
  root.addHandler(_WorkdirLog(workdir))
  logging.set_verbosity(logging.INFO)
  logging_std.captureWarnings(True)

  def unraisable(hook_args):  # background coroutines torn down at exit: log, do not print
    logging_std.getLogger("jaxcomp.exit").debug("ignored at exit: %s %s",
                                                hook_args.exc_type.__name__, hook_args.exc_value)

  if not verbose:
    sys.unraisablehook = unraisable


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config, workdir = _CONFIG.value, _WORKDIR.value
  _quiet_console(workdir, _VERBOSE.value)
  # Imported here so that `--help` and flag errors do not wait for JAX.
  from jaxcomp.quant.spec import SpecError  # pylint: disable=import-outside-toplevel
  from jaxcomp.recipe import RecipeError  # pylint: disable=import-outside-toplevel
  from jaxcomp.train import workdir as wd  # pylint: disable=import-outside-toplevel
  from jaxcomp.train.checkpoint import CheckpointError  # pylint: disable=import-outside-toplevel
  from jaxcomp.train.loop import Preempted, TrainingDiverged, train  # pylint: disable=import-outside-toplevel

  from jaxcomp.experiments.pipeline import run_pipeline  # pylint: disable=import-outside-toplevel

  job = run_pipeline if config.get("task") == "pipeline" else train  # else: training tasks
  if _COMPILE_ONLY.value or _TOPOLOGY.value:
    if not (_COMPILE_ONLY.value and _TOPOLOGY.value):
      sys.exit("jaxcomp: error: --compile_only and --topology go together")
    if config.get("task") == "pipeline":
      sys.exit("jaxcomp: error: --compile_only compiles a training step; this config is a stage "
               "pipeline")
    from jaxcomp.train.loop import compile_step  # pylint: disable=import-outside-toplevel

    def job(c, w):
      try:
        return compile_step(c, w, _TOPOLOGY.value)
      except RuntimeError as e:  # the compiler's own errors (e.g. RESOURCE_EXHAUSTED): one line
        raise ValueError(f"compiling for {_TOPOLOGY.value}: {str(e).splitlines()[0]}") from e
  errors = (CheckpointError, TrainingDiverged, FileNotFoundError, SpecError, RecipeError,
            ValueError, wd.WorkdirError, OSError)
  try:
    if not _COMPILE_ONLY.value and _finished(workdir, config, wd):
      return
    _init_distributed()
    report = job(config, workdir)
  except Preempted as e:  # a clean stop: the checkpoint is written, rerun resumes
    print(f"jaxcomp: {e}", file=sys.stderr)
    sys.exit(PREEMPTED_EXIT)
  except errors as e:
    if os.environ.get("JAXCOMP_TRACEBACK"):
      raise
    sys.exit(f"jaxcomp: error: {e}")
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_index() != 0:  # one writer
    return
  from jaxcomp.eval.harness import report_markdown  # pylint: disable=import-outside-toplevel
  md = report_markdown(report, _run_name())
  if _COMPILE_ONLY.value:  # nothing ran: the run's report.json stays for a real run
    print(md)
    if not report["fits"]:
      sys.exit(f"jaxcomp: error: the step does not fit {report['topology']}: "
               f"{report['peak_gib']} GiB per device of {report['hbm_gib']} GiB HBM")
    return
  try:
    wd.write_text_atomic(os.path.join(workdir, "report.md"), md)
    wd.write_text_atomic(os.path.join(workdir, "report.json"), json.dumps(report, indent=2))
  except wd.WorkdirError as e:
    sys.exit(f"jaxcomp: error: {e}")
  logging.info("report written to %s", workdir)
  print(md)


def _run_name() -> str:
  return str(getattr(flags.FLAGS["config"], "config_filename", "run"))


def _finished(workdir: str, config, wd) -> bool:
  """A rerun of a finished run (``report.json`` beside the same ``config.json``) is a no-op
  that says so and prints the report again."""
  path = os.path.join(workdir, "report.json")
  if not os.path.isfile(path) or not wd.check_config(workdir, config):
    return False
  logging.info("%s holds a finished run of this config: nothing to do (its report below; "
               "delete %s to evaluate again)", workdir, path)
  md = os.path.join(workdir, "report.md")
  if os.path.isfile(md):
    print(open(md).read())
  else:
    print(open(path).read())
  return True


def _one_line(e: BaseException) -> str:
  """The gist of an error whose message may hold a whole traceback (config-file errors do)."""
  lines = [l.strip() for l in str(e).replace("\\n", "\n").splitlines() if l.strip()]
  for line in reversed(lines):  # the innermost "SomeError: message" line of a traceback
    if ": " in line and line.split(":")[0].endswith(("Error", "Exception")):
      return line.split(": ", 1)[1]
  return " ".join(l.replace("\\", "").strip("'\"") for l in lines)


def _config_file(argv: list[str]) -> str | None:
  """The path in ``--config=PATH[:variant]`` (or ``--config PATH``), None without one."""
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1].split(":", 1)[0]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1].split(":", 1)[0]
  return None


def _check_config_file(path: str) -> None:
  """One line for a config file that is missing, unreadable or not Python (before absl and
  ml_collections turn it into a long traceback)."""
  if not os.path.exists(path):
    sys.exit(f"jaxcomp: error: config file {path} does not exist")
  try:
    compile(pathlib.Path(path).read_bytes(), path, "exec")
  except SyntaxError as e:
    sys.exit(f"jaxcomp: error: config file {path}, line {e.lineno}: {e.msg}")
  except (OSError, ValueError) as e:
    sys.exit(f"jaxcomp: error: cannot read config file {path}: {e}")


def _in_config_file(e: BaseException, path: str) -> str | None:
  """``path, line N: Type: message`` when ``e`` was raised while running the config file."""
  frames = [f for f in traceback.extract_tb(e.__traceback__)
            if os.path.abspath(f.filename) == os.path.abspath(path)]
  if not frames:
    return None
  return f"config file {path}, line {frames[-1].lineno}: {type(e).__name__}: {e}"


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing whose errors (bad config file, bad variant, unknown --config.x key) are
  one line."""
  path = _config_file(argv)
  if path is not None:
    _check_config_file(path)
  try:
    rest = flags.FLAGS(argv)
    if flags.FLAGS["config"].present:
      _CONFIG.value.to_dict()  # config files load lazily; fail here, not halfway through
    return rest
  except OSError as e:
    path = flags.FLAGS["config"].serialize().split("=", 1)[-1]
    sys.exit(f"jaxcomp: error: cannot load config file {path}: {_one_line(e.__cause__ or e)}")
  except flags.Error as e:
    sys.exit(f"jaxcomp: error: {_one_line(e)}")
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    where = _in_config_file(e, path) if path else None
    if where:
      sys.exit(f"jaxcomp: error: {where}")
    msg = _one_line(e)
    overrides = [a.split("=")[0] for a in argv if a.startswith("--config.")]
    named = [o for o in overrides if re.search(rf"\b{re.escape(o.rsplit('.', 1)[-1])}\b", msg)]
    sys.exit(f"jaxcomp: error: bad config override ({', '.join(named or overrides)}): {msg}")
  except Exception as e:  # pylint: disable=broad-except
    where = _in_config_file(e, path) if path else None
    if where is None:
      raise
    sys.exit(f"jaxcomp: error: {where}")


def compare_main(argv: list[str]) -> None:
  """``python -m jaxcomp compare RUN_DIR... [--out DIR] [--baseline NAME] [--alpha A]
  [--weights W1,W2,W3]``: one table and the Pareto plots over evaluated runs."""
  import argparse  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(prog="python -m jaxcomp compare", description=(
      "Compare evaluated runs: comparison.md / .json and quality-vs-size / -latency plots "
      "with the Pareto frontier."))
  parser.add_argument("runs", nargs="+", help="run directories (each with a harness report)")
  parser.add_argument("--out", default="comparison", help="output directory")
  parser.add_argument("--baseline", default=None,
                      help="run directory name to compare against (default: the largest)")
  parser.add_argument("--alpha", type=float, default=1.0, help="LAT's latency exponent")
  parser.add_argument("--weights", default=None, help="Pareto weights w1,w2,w3 (quality, "
                      "size saving, latency saving); default 0.5,0.25,0.25")
  args = parser.parse_args(argv)
  from jaxcomp.eval import compare, metrics  # pylint: disable=import-outside-toplevel
  try:
    weights = (metrics.PARETO_WEIGHTS if args.weights is None
               else tuple(float(w) for w in args.weights.split(",")))
    names = [os.path.basename(os.path.normpath(r)) for r in args.runs]
    if len(set(names)) != len(names):
      raise ValueError(f"run directory names must differ: {', '.join(names)}")
    reports = {n: compare.find_report(r) for n, r in zip(names, args.runs)}
    rows = compare.compare(reports, baseline=args.baseline, alpha=args.alpha, weights=weights,
                           out_dir=args.out)
  except ValueError as e:
    sys.exit(f"jaxcomp: error: {e}")
  print(open(os.path.join(args.out, "comparison.md")).read())
  print(f"frontier: {', '.join(r['run'] for r in rows if r['frontier'])}; plots in {args.out}")


def eval_main(argv: list[str]) -> None:
  """``python -m jaxcomp eval --workdir DIR``: the evaluation harness on a finished pipeline
  run's final model (``DIR/eval/report.json``)."""
  import argparse  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(prog="python -m jaxcomp eval", description=(
      "Evaluate the final model of a finished pipeline run (config.eval of its config.json)."))
  parser.add_argument("--workdir", required=True, help="the run directory")
  args = parser.parse_args(argv)
  from jaxcomp.experiments.pipeline import evaluate_workdir  # pylint: disable=import-outside-toplevel
  from jaxcomp.eval.harness import report_markdown  # pylint: disable=import-outside-toplevel
  try:
    report = evaluate_workdir(args.workdir)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"jaxcomp: error: {e}")
  print(report_markdown(report, f"{args.workdir}: final model"))


def run() -> None:
  if len(sys.argv) > 1 and sys.argv[1] in ("compare", "eval"):
    {"compare": compare_main, "eval": eval_main}[sys.argv[1]](sys.argv[2:])
    return
  app.run(main, flags_parser=_parse_flags)
