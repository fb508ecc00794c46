"""Files of a Debian package, fetched once without installing it: ``apt-get download`` then
``dpkg-deb -x`` into a cache (no root needed; nothing is installed). The Austen novels
(`jaxcomp.data.austen`) and the fortune cookies (`jaxcomp.data.fortunes`) come this way.

Example::

  root = fetch_deb("fortunes", "usr/share/games/fortunes", "computers", cache / "fortunes")
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import tempfile

from absl import logging


def _run(cmd: list[str], cwd: str, what: str, package: str) -> None:
  try:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
  except (OSError, subprocess.TimeoutExpired) as e:
    raise RuntimeError(f"could not run `{' '.join(cmd)}` ({what}): {e}") from e
  if proc.returncode:
    tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
    hint = ""
    if "Unable to locate package" in tail or "Can't select" in tail:
      hint = f"; the apt lists do not know {package}: run `apt-get update` first"
    raise RuntimeError(f"`{' '.join(cmd)}` ({what}) failed with exit {proc.returncode}: "
                       f"{tail}{hint}")


def fetch_deb(package: str, inner: str, marker: str, root: str | os.PathLike[str]
              ) -> pathlib.Path:
  """The folder ``inner`` of Debian package ``package``, unpacked into ``root`` once.

  Args:
    package: the Debian package name.
    inner: the folder inside the ``.deb`` to keep (e.g. ``"usr/share/games/fortunes"``).
    marker: a file (relative to ``inner``) whose presence means the copy is complete.
    root: where the folder goes; returned as is when ``root / marker`` exists.

  Raises:
    RuntimeError: ``apt-get`` or ``dpkg-deb`` is missing or failed (no Debian package tools,
      no network, or apt lists that lack the package), or the package lacks ``inner/marker``.
  """
  root = pathlib.Path(root)
  if (root / marker).exists():
    return root
  missing = [tool for tool in ("apt-get", "dpkg-deb") if shutil.which(tool) is None]
  if missing:
    raise RuntimeError(f"cannot fetch {package}: {' and '.join(missing)} not found (needs "
                       "Debian's package tools)")
  root.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
    logging.info("downloading the Debian package %s into %s", package, root.parent)
    cmd = ["apt-get", "download", package]
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # apt's _apt user cannot write to tmp.
      cmd[1:1] = ["-o", "APT::Sandbox::User=root"]
    _run(cmd, tmp, "download", package)
    debs = sorted(pathlib.Path(tmp).glob("*.deb"))
    if not debs:
      raise RuntimeError(f"`{' '.join(cmd)}` wrote no .deb file in {tmp}")
    extracted = pathlib.Path(tmp) / "extracted"
    _run(["dpkg-deb", "-x", str(debs[0]), str(extracted)], tmp, "extract", package)
    folder = extracted / inner
    if not (folder / marker).exists():
      raise RuntimeError(f"{debs[0].name} has no {inner}/{marker}; not the expected "
                         f"{package} package layout")
    if root.exists():  # A partial copy, or another process got there first.
      if (root / marker).exists():
        return root
      shutil.rmtree(root)
    os.replace(folder, root)
  logging.info("%s unpacked into %s", package, root)
  return root
