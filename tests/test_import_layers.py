"""The layer rules of docs/architecture.md, checked on the source text (``ast``, nothing imported).

Every ``import`` / ``from ... import`` of jaxcomp/, pallas_kernels/, bench/ and configs/ is
collected, including the ones inside functions (imports in docstring examples are not code and
are not seen). Modules are grouped into *units*: ``jaxcomp.<pkg>`` for a subpackage,
``jaxcomp.recipe`` / ``jaxcomp.demo`` / ``jaxcomp.__main__`` for the top-level modules,
``jaxcomp`` for jaxcomp/__init__.py, ``pallas_kernels``, and ``bench`` / ``configs`` for the
scripts. `ALLOWED` is the unit graph of docs/architecture.md; it must equal the real one, so a
new edge means updating the table and the page, and a removed one means dropping it there.

``python tests/test_import_layers.py`` prints the real unit graph.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIBRARY_DIRS = ("jaxcomp", "pallas_kernels")
SCRIPT_DIRS = ("bench", "configs")
INTERNAL = ("jaxcomp", "pallas_kernels")

NUMERICS = {"jaxcomp.quant", "jaxcomp.sparse", "jaxcomp.lowrank", "jaxcomp.search"}
SOLVER_PACKAGES = {"jaxcomp.quantizers", "jaxcomp.pruners", "jaxcomp.factorizers"}

# unit -> the units it may import (itself excluded). Keep equal to docs/architecture.md.
ALLOWED: dict[str, set[str]] = {
    # numerics: arrays only
    "jaxcomp.quant": {"pallas_kernels"},
    "jaxcomp.sparse": {"jaxcomp.quant", "pallas_kernels"},
    "jaxcomp.lowrank": {"jaxcomp.quant"},
    "jaxcomp.search": set(),
    "jaxcomp.recipe": {"jaxcomp.quant", "jaxcomp.sparse", "jaxcomp.lowrank"},
    # modules and model surgery
    "jaxcomp.layers": {"jaxcomp.quant"},
    "jaxcomp.rewrite": {"jaxcomp.layers", "jaxcomp.quant", "jaxcomp.recipe"},
    "jaxcomp.serve": {"jaxcomp.rewrite", "jaxcomp.layers", "jaxcomp.quant", "jaxcomp.recipe"},
    # one-shot: the pipeline and the registry; the solver packages import the Solver record
    # (oneshot/solver.py) and LayerStats (oneshot/calibrate.py), the registry imports the
    # solvers, so oneshot <-> solver packages is a package-level cycle by design (no module
    # cycle: solver.py and calibrate.py import no solver).
    "jaxcomp.oneshot": {"jaxcomp.quantizers", "jaxcomp.pruners", "jaxcomp.factorizers",
                        "jaxcomp.rewrite", "jaxcomp.layers", "jaxcomp.quant", "jaxcomp.recipe",
                        "jaxcomp.data",  # data: calibrate.py's default calibration text
                        "jaxcomp.search",  # search: scoring.py's budgeted / OWL recipes
                        "jaxcomp.sparse",  # sparse: the Sparsity spec of OWL's rules
                        "jaxcomp.lowrank"},  # lowrank: scoring.py's LowRank candidates
    "jaxcomp.quantizers": {"jaxcomp.oneshot", "jaxcomp.quant"},
    # quantizers: sparsegpt_core.py runs GPTQ's column loop on gptq_core's grid
    "jaxcomp.pruners": {"jaxcomp.oneshot", "jaxcomp.quantizers", "jaxcomp.sparse",
                        "jaxcomp.quant"},
    "jaxcomp.factorizers": {"jaxcomp.oneshot", "jaxcomp.lowrank"},
    # models (llama_surgery.py uses sparse.masks; io/_build.py quant.finite's check_finite)
    "jaxcomp.models": {"jaxcomp.sparse", "jaxcomp.quant"},
    # applications
    "jaxcomp.eval": {"jaxcomp.rewrite", "jaxcomp.layers", "jaxcomp.recipe", "jaxcomp.quant"},
    # data: text.py reads eval.perplexity.WIKITEXT2_DIR, austen.py models.io's cache dir
    "jaxcomp.data": {"jaxcomp.eval", "jaxcomp.models"},
    "jaxcomp.distill": {"jaxcomp.models", "jaxcomp.oneshot", "jaxcomp.data", "jaxcomp.eval",
                        "jaxcomp.recipe", "jaxcomp.sparse", "jaxcomp.lowrank"},
    # aot: compile_step, the pod dry run, compiles the step for a target
    "jaxcomp.train": {"jaxcomp.distill", "jaxcomp.models", "jaxcomp.data", "jaxcomp.eval",
                      "jaxcomp.rewrite", "jaxcomp.recipe", "jaxcomp.sparse", "jaxcomp.aot"},
    "jaxcomp.experiments": {"jaxcomp.oneshot", "jaxcomp.serve", "jaxcomp.models",
                            "jaxcomp.eval", "jaxcomp.recipe", "jaxcomp.rewrite",
                            "jaxcomp.layers", "jaxcomp.lowrank", "jaxcomp.train",
                            "jaxcomp.distill", "jaxcomp.quant", "jaxcomp.data"},
    "jaxcomp.cli": {"jaxcomp.experiments", "jaxcomp.train", "jaxcomp.recipe", "jaxcomp.quant",
                    "jaxcomp.eval"},
    "jaxcomp.__main__": {"jaxcomp.cli"},
    "jaxcomp.demo": {"jaxcomp", "jaxcomp.models", "jaxcomp.eval"},
    # ahead-of-time compiles for TPU / GPU targets: the kernels' compile-target context
    "jaxcomp.aot": {"pallas_kernels"},
    # the public API (jaxcomp/__init__.py)
    "jaxcomp": {"jaxcomp.quant", "jaxcomp.sparse", "jaxcomp.lowrank", "jaxcomp.recipe",
                "jaxcomp.layers", "jaxcomp.rewrite", "jaxcomp.serve", "jaxcomp.oneshot"},
    # kernels: jax only
    "pallas_kernels": set(),
}

# (c): what the rewrite engine must never reach.
REWRITE_FORBIDDEN = {"jaxcomp.models", "jaxcomp.oneshot", "jaxcomp.serve", "jaxcomp.train",
                     "jaxcomp.experiments", "jaxcomp.eval", "jaxcomp.data", "jaxcomp.distill",
                     "jaxcomp.cli", "jaxcomp.demo", "jaxcomp"} | SOLVER_PACKAGES
# (d): who may import jaxcomp.experiments.
EXPERIMENTS_IMPORTERS = {"jaxcomp.experiments", "jaxcomp.cli", "bench", "configs"}
# (a): third-party packages numerics may not import, and the one file-level exception.
NUMERICS_FORBIDDEN_EXTERNAL = {"flax", "optax"}
NUMERICS_EXTERNAL_EXCEPTIONS = {"jaxcomp/sparse/training.py": {"optax"}}
# (a): the modules recipe.py may import.
RECIPE_MAY_IMPORT = {"jaxcomp.quant.spec", "jaxcomp.sparse.spec", "jaxcomp.lowrank.spec"}
# (e): (file, "module.name") uses of another unit's private name, each a documented exception.
PRIVATE_EXCEPTIONS: set[tuple[str, str]] = set()  # (file, name); none today


@dataclasses.dataclass(frozen=True)
class Import:
  file: str  # relative to the repository root
  line: int
  module: str  # the module imported (for ``from m import x``: ``m.x`` when that is a module)
  name: str | None = None  # the imported name when it is not a module


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


@functools.cache
def _module_names() -> frozenset[str]:
  return frozenset(_module_name(p) for d in LIBRARY_DIRS for p in (ROOT / d).rglob("*.py"))


def _is_module(name: str) -> bool:
  return name in _module_names()


def unit(module: str) -> str:
  """``jaxcomp.quant.spec -> jaxcomp.quant``, ``jaxcomp.recipe -> jaxcomp.recipe``,
  ``pallas_kernels.tiling -> pallas_kernels``, ``flax.nnx -> flax``, ``bench.x -> bench``."""
  parts = module.split(".")
  return ".".join(parts[:2]) if parts[0] == "jaxcomp" else parts[0]


def _files(dirs) -> list[pathlib.Path]:
  return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py"))


def _resolve(path: pathlib.Path, node: ast.ImportFrom) -> str:
  if not node.level:
    return node.module or ""
  here = _module_name(path).split(".")
  base = here if path.name == "__init__.py" else here[:-1]
  base = base[:len(base) - (node.level - 1)]
  return ".".join(base + ([node.module] if node.module else []))


def _private(name: str) -> bool:
  return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@functools.cache
def _parsed(path: pathlib.Path) -> ast.AST:
  return ast.parse(path.read_text(), filename=str(path))


@functools.cache
def imports_of(path: pathlib.Path) -> tuple[Import, ...]:
  return _imports(path, _parsed(path))


def _imports(path: pathlib.Path, tree: ast.AST) -> tuple[Import, ...]:
  rel = str(path.relative_to(ROOT))
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out += [Import(rel, node.lineno, a.name) for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      mod = _resolve(path, node)
      for a in node.names:
        sub = f"{mod}.{a.name}"
        if _is_module(sub):
          out.append(Import(rel, node.lineno, sub))
        else:
          out.append(Import(rel, node.lineno, mod, None if a.name == "*" else a.name))
  return tuple(out)


def _source_unit(path: pathlib.Path) -> str:
  top = path.relative_to(ROOT).parts[0]
  return top if top in SCRIPT_DIRS else unit(_module_name(path))


@functools.cache
def graph(dirs=LIBRARY_DIRS + SCRIPT_DIRS) -> dict[str, dict[str, list[str]]]:
  """``{unit: {imported unit: [file:line, ...]}}`` for internal imports (self-edges dropped)."""
  g: dict[str, dict[str, list[str]]] = {}
  for path in _files(dirs):
    src = _source_unit(path)
    g.setdefault(src, {})
    for imp in imports_of(path):
      if imp.module.split(".")[0] not in INTERNAL:
        continue
      dst = unit(imp.module)
      if dst != src:
        g[src].setdefault(dst, []).append(f"{imp.file}:{imp.line}")
  return g


def format_graph() -> str:
  g = graph()
  return "\n".join(f"{src} -> {', '.join(sorted(g[src])) or '(nothing)'}" for src in sorted(g))


def docs_table() -> dict[str, set[str]]:
  """The unit table of docs/architecture.md (its first code block after "## Layers"): a row is
  ``  unit  imports, ...  role`` (columns two or more spaces apart), a line indented further
  continues the imports; unindented lines are headings."""
  text = (ROOT / "docs/architecture.md").read_text()
  block = text.split("## Layers", 1)[1].split("```\n", 2)[1]
  table: dict[str, set[str]] = {}
  key = lambda name: name if name in ("jaxcomp", "pallas_kernels") else unit(f"jaxcomp.{name}")
  current = None
  for line in block.splitlines()[1:]:
    if not line.startswith("  "):
      continue
    cols = re.split(r"\s{2,}", line.strip())
    if line.startswith("    "):
      imports = cols[0]
    else:
      current, imports = key(cols[0]), cols[1]
      table[current] = set()
    for name in imports.split(","):
      name = re.sub(r"\(.*?\)", "", name).strip()
      if name and not name.startswith("nothing"):
        table[current].add(key(name))
  return table


def _fail(rule: str, offenders, verb: str = "imports") -> str:
  return rule + ":\n" + "\n".join(f"  {f} {verb} {m}" for f, m in sorted(set(offenders)))


# ------------------------------------------------------------------------------------ tests


def test_every_library_unit_is_in_the_table():
  units = {src for src in graph(LIBRARY_DIRS)}
  assert units == set(ALLOWED), (
      f"units missing from ALLOWED: {sorted(units - set(ALLOWED))}; "
      f"stale entries: {sorted(set(ALLOWED) - units)}")


def test_imports_follow_the_table():
  offenders = [(where, dst) for src, edges in graph(LIBRARY_DIRS).items()
               for dst, wheres in edges.items() if dst not in ALLOWED.get(src, set())
               for where in wheres]
  assert not offenders, _fail(
      "imports outside ALLOWED (docs/architecture.md); real graph:\n" + format_graph(),
      offenders)


def test_table_has_no_unused_edges():
  g = graph(LIBRARY_DIRS)
  unused = sorted(f"{src} -> {dst}" for src, dsts in ALLOWED.items() for dst in dsts
                  if dst not in g.get(src, {}))
  assert not unused, ("ALLOWED (and docs/architecture.md) list edges the code no longer has: "
                      f"{unused}")


def test_docs_table_equals_the_table():
  docs = docs_table()
  diff = sorted(f"{u}: docs {sorted(docs.get(u, ()))} != ALLOWED {sorted(ALLOWED.get(u, ()))}"
                for u in set(docs) | set(ALLOWED) if docs.get(u) != ALLOWED.get(u))
  assert not diff, "docs/architecture.md's unit table differs from ALLOWED:\n" + "\n".join(diff)


def test_numerics_import_only_numerics_and_kernels():  # (a)
  offenders = [(where, dst) for src in NUMERICS for dst, wheres in graph().get(src, {}).items()
               if dst not in NUMERICS | {"pallas_kernels"} for where in wheres]
  assert not offenders, _fail("numerics import a jaxcomp layer above them", offenders)


def test_numerics_import_no_flax():  # (a)
  offenders = []
  for d in sorted(NUMERICS):
    for path in _files([d.replace(".", "/")]):
      rel = str(path.relative_to(ROOT))
      allowed = NUMERICS_EXTERNAL_EXCEPTIONS.get(rel, set())
      offenders += [(f"{rel}:{i.line}", i.module) for i in imports_of(path)
                    if unit(i.module) in NUMERICS_FORBIDDEN_EXTERNAL - allowed]
  assert not offenders, _fail("numerics import flax / optax", offenders)


def test_sparse_training_imports_optax_not_flax():  # (a)
  mods = {unit(i.module) for i in imports_of(ROOT / "jaxcomp/sparse/training.py")}
  assert "optax" in mods and "flax" not in mods, sorted(mods)


def test_recipe_imports_only_numerics_specs():  # (a)
  path = ROOT / "jaxcomp/recipe.py"
  offenders = [(f"{i.file}:{i.line}", i.module) for i in imports_of(path)
               if i.module.split(".")[0] in INTERNAL and i.module not in RECIPE_MAY_IMPORT]
  assert not offenders, _fail("jaxcomp/recipe.py imports beyond the numerics specs", offenders)


def test_pallas_kernels_import_no_jaxcomp():  # (b)
  offenders = [(where, dst) for dst, wheres in graph().get("pallas_kernels", {}).items()
               for where in wheres]
  assert not offenders, _fail("pallas_kernels imports jaxcomp", offenders)


def test_rewrite_stays_below_the_transforms():  # (c)
  offenders = [(where, dst) for dst, wheres in graph().get("jaxcomp.rewrite", {}).items()
               if dst in REWRITE_FORBIDDEN for where in wheres]
  assert not offenders, _fail("jaxcomp.rewrite imports a layer above it", offenders)


def test_only_cli_and_scripts_import_experiments():  # (d)
  offenders = [(where, "jaxcomp.experiments") for src, edges in graph().items()
               if src not in EXPERIMENTS_IMPORTERS
               for where in edges.get("jaxcomp.experiments", [])]
  assert not offenders, _fail("jaxcomp.experiments imported outside cli / bench / configs",
                              offenders)


def _private_uses(path: pathlib.Path, tree: ast.AST | None = None) -> list[tuple[str, str]]:
  """``(file:line, module.name)`` for each private name of another unit: ``from m import _x``,
  ``import m._x``, and ``alias._x`` / ``alias.sub._x`` on a name bound to a jaxcomp /
  pallas_kernels module (bindings are per file, shadowing is not tracked)."""
  tree = _parsed(path) if tree is None else tree
  rel = str(path.relative_to(ROOT))
  here = _source_unit(path)
  uses, bound = [], {}
  for imp in _imports(path, tree):
    if imp.module.split(".")[0] not in INTERNAL or unit(imp.module) == here:
      continue
    if imp.name is not None and _private(imp.name):
      uses.append((f"{rel}:{imp.line}", f"{imp.module}.{imp.name}"))
    parts = imp.module.split(".")
    for k in range(2, len(parts) + 1):
      if _private(parts[k - 1]):
        uses.append((f"{rel}:{imp.line}", ".".join(parts[:k])))
        break
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        bound[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
    elif isinstance(node, ast.ImportFrom):
      mod = _resolve(path, node)
      for a in node.names:
        if _is_module(f"{mod}.{a.name}"):
          bound[a.asname or a.name] = f"{mod}.{a.name}"
  for node in ast.walk(tree):
    if not isinstance(node, ast.Attribute):
      continue
    chain, n = [], node
    while isinstance(n, ast.Attribute):
      chain.append(n.attr)
      n = n.value
    if not isinstance(n, ast.Name) or n.id not in bound:
      continue
    mod = bound[n.id]
    if mod.split(".")[0] not in INTERNAL:
      continue
    for attr in reversed(chain):
      if _private(attr):
        if unit(mod) != here:
          uses.append((f"{rel}:{node.lineno}", f"{mod}.{attr}"))
        break
      if not _is_module(f"{mod}.{attr}"):
        break
      mod = f"{mod}.{attr}"
  return uses


def test_no_private_names_across_packages():  # (e)
  uses = {u for path in _files(LIBRARY_DIRS + SCRIPT_DIRS) for u in _private_uses(path)}
  offenders = [(where, name) for where, name in uses
               if (where.rsplit(":", 1)[0], name) not in PRIVATE_EXCEPTIONS]
  assert not offenders, _fail("private names used from another package", offenders, "uses")
  stale = PRIVATE_EXCEPTIONS - {(w.rsplit(":", 1)[0], n) for w, n in uses}
  assert not stale, f"PRIVATE_EXCEPTIONS lists uses the code no longer has: {sorted(stale)}"


def test_private_name_detection():
  """The checker sees the three forms it claims to (a guard against a silently empty check)."""
  src = ("import jaxcomp.quant.core as c\nfrom jaxcomp.quant import dot\n"
         "from jaxcomp.quant.core import _safe\n"
         "def f():\n  return c._x, dot._y, dot.fake_quant_weight\n")
  uses = sorted(name for _, name in _private_uses(ROOT / "jaxcomp/rewrite/probe.py",
                                                   ast.parse(src)))
  assert uses == ["jaxcomp.quant.core._safe", "jaxcomp.quant.core._x", "jaxcomp.quant.dot._y"]


if __name__ == "__main__":
  print(format_graph())
