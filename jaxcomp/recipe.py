"""Recipes: ordered rules that say which layers get which compression.

A `Rule` holds a regular expression that must match a module's whole path (``re.fullmatch``;
paths join attribute names and list indices with "/", e.g. ``layers/0/attn/q_proj``) and what
to do with the matching layers. Rules are tried in order and the first match wins, so a
``skip=True`` rule placed first protects layers from the broader rules after it.

Recipes round-trip through `ml_collections.ConfigDict`, so every experiment is a config file
whose knobs can be overridden from the command line (``--config.recipe.rules.mlp.quant.w_bits=4``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ml_collections

from jaxcomp.quant.spec import Quant, SpecError
from jaxcomp.lowrank.spec import LowRank
from jaxcomp.sparse.spec import Sparsity


class RecipeError(ValueError):
  """A recipe or rule is malformed; the message names the field."""


@dataclasses.dataclass(frozen=True)
class Rule:
  """One recipe line: the layers whose path fully matches ``pattern`` and what they get.

  Example:
    >>> rule = Rule(r".*attn/(q|k|v|o)_proj", quant=Quant(w_bits=8, a_bits=8))
    >>> rule.matches("layers/0/attn/q_proj"), rule.matches("layers/0/mlp/up_proj")
    (True, False)
    >>> Rule(r"lm_head|embed", skip=True).label
    'lm_head|embed'
  """

  pattern: str  # regex, matched against the whole module path (re.fullmatch).
  _: dataclasses.KW_ONLY
  quant: Quant | None = None  # quantization of the matched layers.
  sparsity: Sparsity | None = None  # pruning of the matched layers (`jaxcomp.prune`).
  lowrank: LowRank | None = None  # factorization of the matched layers (`jaxcomp.factorize`).
  skip: bool = False  # leave the matched layers as they are (and stop matching further rules).
  name: str | None = None  # label in reports and configs; defaults to the pattern.

  def __post_init__(self) -> None:
    if not isinstance(self.pattern, str):
      raise RecipeError(f"Rule.pattern must be a string, got {self.pattern!r}")
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise RecipeError(f"Rule.pattern {self.pattern!r} is not a valid regex: {e}") from None
    if not isinstance(self.skip, bool):
      raise RecipeError(f"Rule.skip must be a bool, got {self.skip!r}")
    if self.quant is not None and not isinstance(self.quant, Quant):
      raise RecipeError(f"Rule.quant must be a jaxcomp.Quant, got {type(self.quant).__name__}")
    if self.sparsity is not None and not isinstance(self.sparsity, Sparsity):
      raise RecipeError(
          f"Rule.sparsity must be a jaxcomp.Sparsity, got {type(self.sparsity).__name__}")
    if self.lowrank is not None and not isinstance(self.lowrank, LowRank):
      raise RecipeError(
          f"Rule.lowrank must be a jaxcomp.LowRank, got {type(self.lowrank).__name__}")
    payloads = (self.quant, self.sparsity, self.lowrank)
    if self.skip and any(p is not None for p in payloads):
      raise RecipeError(f"Rule {self.pattern!r}: skip=True excludes quant=, sparsity= and "
                        "lowrank=")
    if not self.skip and all(p is None for p in payloads):
      raise RecipeError(
          f"Rule {self.pattern!r} does nothing: give quant=, sparsity=, lowrank= or skip=True")
    if self.name is not None and (not isinstance(self.name, str) or not self.name):
      raise RecipeError(f"Rule.name must be a non-empty string, got {self.name!r}")

  @property
  def label(self) -> str:
    return self.name or self.pattern

  def matches(self, path: str) -> bool:
    """Whether ``path`` (e.g. ``layers/0/mlp/up_proj``) fully matches the pattern."""
    return re.fullmatch(self.pattern, path) is not None


_RULE_FIELDS = ("pattern", "quant", "sparsity", "lowrank", "skip", "name")


@dataclasses.dataclass(frozen=True)
class Recipe:
  """An ordered list of `Rule`s; the first rule whose pattern matches a path decides.

  Example:
    >>> recipe = Recipe([
    ...     Rule(r"lm_head|embed", skip=True),
    ...     Rule(r".*", quant=Quant(w_bits=8, a_bits=8)),
    ... ])
    >>> recipe.match("layers/0/mlp/up_proj").quant.a_bits
    8
  """

  rules: tuple[Rule, ...]

  def __init__(self, rules: Iterable[Rule]):
    rules = tuple(rules)
    for i, r in enumerate(rules):
      if not isinstance(r, Rule):
        raise RecipeError(f"Recipe.rules[{i}] must be a jaxcomp.Rule, got {type(r).__name__}")
    labels = [r.label for r in rules]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
      raise RecipeError(f"Recipe.rules: two rules share the label {dup[0]!r}; give them names")
    object.__setattr__(self, "rules", rules)

  def match(self, path: str) -> Rule | None:
    """The first rule matching ``path``, or None."""
    for r in self.rules:
      if r.matches(path):
        return r
    return None

  # ---------------------------------------------------------------- config round trip

  def to_config(self) -> ml_collections.ConfigDict:
    """The recipe as a ConfigDict: ``rules`` maps each rule's name (``rule<i>`` when unnamed) to
    its fields; ``order`` lists the names, first match first (a ConfigDict sorts its keys).

    Example:
      >>> cfg = Recipe([Rule(".*", quant=Quant(w_bits=4), name="all")]).to_config()
      >>> cfg.rules.all.quant.w_bits
      4
    """
    rules = {}
    for i, r in enumerate(self.rules):  # keys are rule names (patterns may hold dots)
      rules[r.name or f"rule{i}"] = {
          "pattern": r.pattern,
          "name": r.name,
          "skip": r.skip,
          "quant": None if r.quant is None else r.quant.to_dict(),
          "sparsity": None if r.sparsity is None else r.sparsity.to_dict(),
          "lowrank": None if r.lowrank is None else r.lowrank.to_dict(),
      }
    return ml_collections.ConfigDict({"rules": rules, "order": list(rules)})

  @classmethod
  def from_config(cls, cfg: Any) -> "Recipe":
    """Builds a recipe from a ConfigDict/dict made by `to_config` (or written by hand).

    ``rules`` is either a mapping from rule names to rule fields, tried in the order of
    ``order`` (the rule names; needed for a ConfigDict of several rules, which sorts its keys;
    a plain dict's own order otherwise), or a list of rule-field mappings. Unknown keys are
    errors naming their place, e.g. ``recipe.rules.mlp.quant has no field 'wbits'``.
    """
    d = _plain(cfg)
    if not isinstance(d, Mapping):
      raise RecipeError(f"recipe must be a mapping with a 'rules' entry, got {type(cfg).__name__}")
    unknown = sorted(set(d) - {"rules", "order"})
    if unknown:
      raise RecipeError(f"recipe has no field {unknown[0]!r} (fields: rules, order)")
    if "rules" not in d:
      raise RecipeError("recipe.rules is missing")
    raw = d["rules"]
    if isinstance(raw, Mapping):
      order = d.get("order")
      if order is None:
        if len(raw) > 1 and isinstance(cfg, (ml_collections.ConfigDict,
                                             ml_collections.FrozenConfigDict)):
          raise RecipeError("recipe.order is missing: a ConfigDict sorts recipe.rules by name, "
                            "so list the rule names in match order")
        order = list(raw)
      if sorted(order) != sorted(raw):
        raise RecipeError(f"recipe.order {list(order)} must list each name of recipe.rules "
                          f"({', '.join(raw)}) once")
      items = [(f"recipe.rules.{k}", k, raw[k]) for k in order]
    elif isinstance(raw, Sequence) and not isinstance(raw, str):
      items = [(f"recipe.rules[{i}]", None, v) for i, v in enumerate(raw)]
    else:
      raise RecipeError(f"recipe.rules must be a mapping or a list, got {type(raw).__name__}")
    return cls(_rule_from_mapping(where, name, v) for where, name, v in items)


def _rule_from_mapping(where: str, name: str | None, v: Any) -> Rule:
  if not isinstance(v, Mapping):
    raise RecipeError(f"{where} must be a mapping of rule fields, got {type(v).__name__}")
  unknown = sorted(set(v) - set(_RULE_FIELDS))
  if unknown:
    raise RecipeError(f"{where} has no field {unknown[0]!r} (fields: {', '.join(_RULE_FIELDS)})")
  if "pattern" not in v:
    raise RecipeError(f"{where}.pattern is missing")
  quant, sparsity, lowrank = v.get("quant"), v.get("sparsity"), v.get("lowrank")
  try:
    if quant is not None:
      quant = Quant.from_dict(quant)
    if sparsity is not None:
      sparsity = Sparsity.from_dict(sparsity)
    if lowrank is not None:
      lowrank = LowRank.from_dict(lowrank)
    return Rule(v["pattern"], quant=quant, sparsity=sparsity, lowrank=lowrank,
                skip=v.get("skip", False), name=v["name"] if "name" in v else name)
  except (SpecError, RecipeError) as e:
    raise RecipeError(f"{where}: {e}") from None


def _plain(cfg: Any) -> Any:
  if isinstance(cfg, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
    return cfg.to_dict()
  return cfg


# ------------------------------------------------------------------------ match reports


@dataclasses.dataclass(frozen=True)
class MatchReport:
  """Which layers each rule took, which rules took nothing, and what could not be handled.

  Attributes:
    matched: rule label -> paths of the layers it was applied to (skips included).
    unused: labels of the rules that matched no supported layer.
    unsupported: ``(path, type name)`` of modules that a non-skip rule matched but that the
      transform cannot handle (e.g. a norm layer under ``r".*"``); they stay in float.
    depth: path -> number of stacked copies, for each matched layer that stacks several
      (``nnx.vmap``); such a layer is one path in ``matched``.
  """

  matched: dict[str, list[str]]
  unused: list[str]
  unsupported: list[tuple[str, str]]
  depth: dict[str, int] = dataclasses.field(default_factory=dict)

  def __str__(self) -> str:
    lines = [f"{'rule':<40} layers"]
    for label, paths in self.matched.items():
      stacked = [f"{p} x{self.depth[p]}" for p in paths if p in self.depth]
      lines.append(f"{label:<40} {len(paths)}" + (
          f" (stacked: {', '.join(stacked)})" if stacked else ""))
    if self.unused:
      lines.append("rules that matched nothing: " + ", ".join(self.unused))
    if self.unsupported:
      lines.append("left in float, not supported: " + ", ".join(
          f"{path} ({kind})" for path, kind in self.unsupported))
    return "\n".join(lines)

  def check(self) -> None:
    """Raises `RecipeError` (strict mode) on the first unused rule or unsupported module."""
    if self.unused:
      raise RecipeError(f"strict: rule {self.unused[0]!r} matched no layer")
    if self.unsupported:
      path, kind = self.unsupported[0]
      raise RecipeError(f"strict: {path} ({kind}) matched a rule but {kind} is not supported")
