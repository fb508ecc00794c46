"""The out-of-domain text (jaxcomp/data/fortunes.py) and the Debian fetch it shares with the
Austen novels (jaxcomp/data/debian.py), from a fake cached package: no network."""

import pytest

from jaxcomp.data import debian
from jaxcomp.data import fortunes


def test_cookies_are_cut_in_file_order_without_drawings_or_indexes(tmp_path, monkeypatch):
  root = tmp_path / "fortunes"
  root.mkdir()
  (root / "computers").write_text("Bugs are features.\n%\n  Two spaces.  \n%\n")
  (root / "art").write_text("Art is long.\n%\nLife is short.\n")
  (root / "ascii-art").write_text("  /\\_/\\\n ( o.o )\n%\n")
  (root / "art.dat").write_bytes(b"\x00\x01binary")
  (root / "art.u8").symlink_to(root / "art")
  monkeypatch.setattr(debian.subprocess, "run", lambda *a, **k: pytest.fail("ran a command"))
  text = fortunes.fortunes_text(tmp_path)
  assert text == "Art is long.\n\nLife is short.\n\nBugs are features.\n\nTwo spaces."


def test_missing_package_tools_are_one_line(tmp_path, monkeypatch):
  monkeypatch.setattr(debian.shutil, "which", lambda tool: None)
  with pytest.raises(RuntimeError, match="cannot fetch fortunes: apt-get and dpkg-deb not found"):
    fortunes.fetch_fortunes(tmp_path)
