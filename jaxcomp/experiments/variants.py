"""Config-file variants: ``"<variant>[,tiny]"`` arguments of ``configs/*.py``."""

from __future__ import annotations

from typing import Any


def parse_variant(arg: str, variants: Any, file: str) -> tuple[str, bool]:
  """``"<variant>[,tiny]"`` -> ``(variant, tiny)``, with one-line errors naming ``file``.

  Example:
    >>> parse_variant("w8a8,tiny", ["w8a8", "w4"], "configs/x.py")
    ('w8a8', True)
  """
  variant, *mods = arg.split(",")
  if variant not in variants:
    raise ValueError(f"unknown variant {variant!r} of {file} (variants: {', '.join(variants)})")
  unknown = [m for m in mods if m != "tiny"]
  if unknown:
    raise ValueError(f"unknown modifier {unknown[0]!r} of {file} (modifiers: tiny)")
  return variant, "tiny" in mods
