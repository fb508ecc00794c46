"""Out-of-domain evaluation text: the fortune cookies of Debian's ``fortunes`` package.

No calibration source here comes from it (WikiText-2 is Wikipedia, the Austen novels are
19th-century fiction, self-generated text is the model's own): quotations, jokes, aphorisms and
short verse on computers, law, love, science, ... (``/usr/share/games/fortunes``, strfile text
files, cookies separated by lines holding ``%``). `fortunes_text` cuts it reproducibly: every
text file of the folder sorted by name except ``ascii-art`` (drawings, not prose), each cookie
stripped, cookies joined by one blank line, files in that order.

Example::

  text = fortunes_text()          # ~2.3 MB of English
"""

from __future__ import annotations

import os
import pathlib

from jaxcomp.data import debian

PACKAGE = "fortunes"
INNER = "usr/share/games/fortunes"
EXCLUDED = ("ascii-art",)


def _default_cache_dir() -> pathlib.Path:
  from jaxcomp.models.io.gguf import default_cache_dir  # pylint: disable=g-import-not-at-top
  return default_cache_dir() / "fortunes"


def fetch_fortunes(cache_dir: str | os.PathLike[str] | None = None) -> pathlib.Path:
  """The ``fortunes`` folder, downloaded (``apt-get download``, nothing installed) and unpacked
  once into ``cache_dir`` (default ``$JAXCOMP_CACHE/fortunes``); a RuntimeError in one line
  when Debian's package tools or the network are missing."""
  cache = pathlib.Path(cache_dir) if cache_dir else _default_cache_dir()
  return debian.fetch_deb(PACKAGE, INNER, "computers", cache / "fortunes")


def fortunes_text(cache_dir: str | os.PathLike[str] | None = None) -> str:
  """All cookies of the text files (sorted by name, `EXCLUDED` left out), one blank line apart.

  Example::

    text = fortunes_text("/tmp/fortunes")
  """
  root = fetch_fortunes(cache_dir)
  cookies = []
  for path in sorted(root.iterdir()):
    if path.suffix or path.name in EXCLUDED or path.is_symlink() or not path.is_file():
      continue  # .dat indexes, .u8 links
    text = path.read_text(encoding="utf-8", errors="replace")
    cookies += [c.strip() for c in text.split("\n%\n") if c.strip() and c.strip() != "%"]
  return "\n\n".join(cookies)
