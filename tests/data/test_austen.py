"""R serialization / lazy-load database reader, on hand-built XDR bytes (no R, no network).

The bytes are written here from the format (flags int32 = type | object << 8 | attributes << 9 |
tag << 10 | levels << 12, then the content), independently of the reader. One test reads the real
Debian package, only if an earlier `fetch_janeaustenr` left it in the cache.
"""

import bz2
import doctest
import gzip
import lzma
import struct
import zlib

import numpy as np
import pytest

from jaxcomp.data import austen
from jaxcomp.data import debian

NILVALUE, SYM, LIST, CHAR, LGL, INT, REAL, STR, VEC, ALTREP = 254, 1, 2, 9, 10, 13, 14, 16, 19, 238
UTF8, LATIN1, ASCII = 1 << 3, 1 << 2, 1 << 6
NA_INT = -(2**31)


def i32(*values):
  return struct.pack(f">{len(values)}i", *values)


def flags(sexptype, *, obj=False, attr=False, tag=False, levels=0):
  return i32(sexptype | obj << 8 | attr << 9 | tag << 10 | levels << 12)


def header(version=3):
  out = b"X\n" + i32(version, 0x040201, 0x030500 if version == 3 else 0x020300)
  return out + (i32(5) + b"UTF-8" if version == 3 else b"")


class Writer:
  """Serializes a few R types; symbols are written once, then as back references."""

  def __init__(self):
    self.symbols = []

  def sym(self, name):
    if name in self.symbols:
      return i32((self.symbols.index(name) + 1) << 8 | 255)  # REFSXP, index packed in flags.
    self.symbols.append(name)
    return flags(SYM) + self.char(name)

  def char(self, s, encoding=None):
    if s is None:
      return flags(CHAR) + i32(-1)
    if encoding == "latin-1":
      raw, levels = s.encode("latin-1"), LATIN1
    else:
      raw = s.encode("utf-8")
      levels = ASCII if raw.isascii() else UTF8
    return flags(CHAR, levels=levels) + i32(len(raw)) + raw

  def attrs(self, pairs):
    return self.pairlist(pairs) if pairs else b""

  def pairlist(self, pairs):
    out = b""
    for tag, value in pairs:
      out += flags(LIST, tag=True) + self.sym(tag) + value
    return out + flags(NILVALUE)

  def strs(self, strings, attrs=(), encoding=None):
    body = b"".join(self.char(s, encoding) for s in strings)
    return flags(STR, attr=bool(attrs)) + i32(len(strings)) + body + self.attrs(attrs)

  def ints(self, values, attrs=(), obj=False, sexptype=INT):
    return (flags(sexptype, obj=obj, attr=bool(attrs)) + i32(len(values)) + i32(*values)
            + self.attrs(attrs))

  def reals(self, values, attrs=()):
    return (flags(REAL, attr=bool(attrs)) + i32(len(values))
            + struct.pack(f">{len(values)}d", *values) + self.attrs(attrs))

  def vec(self, items, attrs=(), obj=False):
    return (flags(VEC, obj=obj, attr=bool(attrs)) + i32(len(items)) + b"".join(items)
            + self.attrs(attrs))

  def named_list(self, mapping, obj=False, extra=()):
    names = ("names", self.strs(list(mapping)))
    return self.vec(list(mapping.values()), attrs=[names, *extra], obj=obj)


def serialize(build, version=3):
  """``build(writer) -> bytes`` of the item; returns the whole serialization."""
  return header(version) + build(Writer())


def blob(serialized, compressed=True):
  """One .rdb entry as R writes it for ``compressed`` TRUE (zlib), 2 (bzip2) or 3 (xz)."""
  size = struct.pack(">I", len(serialized))
  if compressed is True:
    return size + zlib.compress(serialized)
  if compressed == 2:
    return size + b"2" + bz2.compress(serialized)
  filters = [{"id": lzma.FILTER_LZMA2, "preset": 6}]
  return size + b"X" + lzma.compress(serialized, format=lzma.FORMAT_RAW, filters=filters)


def write_db(directory, objects, compressed=True, version=3):
  """Writes NAME.rdb + NAME.rdx for ``{name: build}``; returns the .rdb path."""
  rdb, offsets = b"", {}
  for name, build in objects.items():
    entry = blob(serialize(build, version), compressed)
    offsets[name] = (len(rdb), len(entry))
    rdb += entry

  def index(w):
    flag = w.ints([1], sexptype=LGL) if compressed is True else w.ints([compressed])
    variables = w.named_list({name: w.ints(list(v)) for name, v in offsets.items()})
    return w.named_list({"variables": variables, "references": w.vec([]), "compressed": flag})

  directory.mkdir(parents=True, exist_ok=True)
  (directory / "Rdata.rdb").write_bytes(rdb)
  (directory / "Rdata.rdx").write_bytes(gzip.compress(serialize(index)))
  return directory / "Rdata.rdb"


def character_vector(w):
  return w.strs(["It is a truth", "", None, "élan", "naïve ☃"])


def data_frame(w):
  book = w.ints([1, 2, 2], obj=True, attrs=[("levels", w.strs(["Emma", "Persuasion"])),
                                            ("class", w.strs(["factor"]))])
  columns = {"text": w.strs(["EMMA", "Persuasion", "by"]), "book": book}
  extra = [("class", w.strs(["tbl_df", "tbl", "data.frame"])),  # "class": a back reference.
           ("row.names", w.ints([NA_INT, -3]))]
  return w.named_list(columns, obj=True, extra=extra)


def test_read_rdb_round_trips_a_character_vector_and_a_data_frame(tmp_path):
  path = write_db(tmp_path, {"lines": character_vector, "books": data_frame})
  objects = austen.read_rdb(path)
  assert list(objects) == ["lines", "books"]
  assert objects["lines"] == ["It is a truth", "", None, "élan", "naïve ☃"]
  books = objects["books"]
  assert list(books) == ["text", "book"] and books["text"] == ["EMMA", "Persuasion", "by"]
  factor = books["book"]
  assert isinstance(factor, austen.Factor) and not factor.ordered
  assert factor.levels == ["Emma", "Persuasion"] and factor.codes.tolist() == [0, 1, 1]
  assert factor.to_list() == ["Emma", "Persuasion", "Persuasion"]
  assert austen.read_rdb(tmp_path / "Rdata") == objects  # The name without suffix works too.


@pytest.mark.parametrize("compressed", [True, 2, 3])
@pytest.mark.parametrize("version", [2, 3])
def test_compression_types_and_format_versions(tmp_path, compressed, version):
  path = write_db(tmp_path, {"lines": character_vector}, compressed=compressed, version=version)
  assert austen.read_rdb(path)["lines"][0] == "It is a truth"


def test_numeric_logical_and_latin1_vectors():
  def build(w):
    return w.named_list({
        "int": w.ints([3, NA_INT, -7]),
        "real": w.reals([0.5, float("nan"), -2.0]),
        "lgl": w.ints([1, 0, NA_INT], sexptype=LGL),
        "matrix": w.ints([1, 2, 3, 4, 5, 6], attrs=[("dim", w.ints([2, 3]))]),
        "latin1": w.strs(["café"], encoding="latin-1"),
        "null": flags(NILVALUE),
        "unnamed": w.vec([w.reals([1.0]), w.strs(["x"])]),
    })

  out = austen.unserialize(serialize(build))
  assert isinstance(out["int"], np.ma.MaskedArray) and out["int"].dtype == np.int32
  assert out["int"].mask.tolist() == [False, True, False] and out["int"][2] == -7
  assert out["real"][0] == 0.5 and np.isnan(out["real"][1]) and out["real"].dtype == np.float64
  assert out["lgl"].mask.tolist() == [False, False, True] and out["lgl"].dtype == bool
  assert out["lgl"][0] and not out["lgl"][1]
  np.testing.assert_array_equal(out["matrix"], [[1, 3, 5], [2, 4, 6]])  # Column-major.
  assert out["latin1"] == ["café"] and out["null"] is None
  assert out["unnamed"][0].tolist() == [1.0] and out["unnamed"][1] == ["x"]


def test_compact_integer_sequence():
  def build(w):  # ALTREP 1:4 as R >= 3.5 writes it: info pairlist, state c(n, start, step).
    info = (flags(LIST) + w.sym("compact_intseq") + flags(LIST) + w.sym("base")
            + flags(LIST) + w.ints([INT]) + flags(NILVALUE))
    return flags(ALTREP) + info + w.reals([4.0, 1.0, 1.0]) + flags(NILVALUE)

  assert austen.unserialize(serialize(build)).tolist() == [1, 2, 3, 4]


def good_db_bytes(tmp_path):
  path = write_db(tmp_path, {"lines": character_vector})
  return path, path.read_bytes()


@pytest.mark.parametrize("corrupt, message", [
    (lambda b: b[:-10], "past the end of the file"),
    (lambda b: b[:8] + bytes(len(b) - 8), "cannot decompress"),
    (lambda b: b[:4] + zlib.compress(serialize(character_vector)[:-5]), "header says"),
    (lambda b: struct.pack(">I", len(serialize(character_vector)) - 5)
     + zlib.compress(serialize(character_vector)[:-5]), "truncated R serialization"),
    (lambda b: blob(b"A\n" + serialize(character_vector)[2:]), "ASCII serialization format"),
    (lambda b: blob(serialize(character_vector) + b"\0"), "1 trailing bytes"),
    (lambda b: blob(serialize(lambda w: i32(77))), "unknown SEXP type 77"),
    (lambda b: blob(serialize(lambda w: i32(3 << 8 | 255))), "reference 3 to an object not read"),
])
def test_malformed_entries_give_a_clear_value_error(tmp_path, corrupt, message):
  path, data = good_db_bytes(tmp_path)
  bad = corrupt(data)
  path.write_bytes(bad)
  # Keep the index consistent with the corrupted entry's size (except the "past the end" case).
  if message != "past the end of the file":
    write_index(tmp_path, {"lines": (0, len(bad))})
  with pytest.raises(ValueError, match=message):
    austen.read_rdb(path)


def write_index(directory, offsets):
  def index(w):
    variables = w.named_list({name: w.ints(list(v)) for name, v in offsets.items()})
    return w.named_list({"variables": variables, "compressed": w.ints([1], sexptype=LGL)})
  (directory / "Rdata.rdx").write_bytes(gzip.compress(serialize(index)))


def test_malformed_index_and_missing_files(tmp_path):
  path, _ = good_db_bytes(tmp_path)
  (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(serialize(character_vector)))
  with pytest.raises(ValueError, match="not a lazy-load index"):
    austen.read_rdb(path)
  (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(serialize(character_vector))[:20])
  with pytest.raises(ValueError, match="corrupt compressed data"):
    austen.read_rdb(path)
  (tmp_path / "Rdata.rdx").unlink()
  with pytest.raises(FileNotFoundError, match="Rdata.rdx does not exist"):
    austen.read_rdb(path)


def fake_package(cache_dir, books=austen.BOOKS):
  """A cache holding a janeaustenr package whose novels are 3 lines each."""
  objects = {name: (lambda w, t=title: w.strs([t.upper(), "", f"{t} ends."]))
             for name, title in books.items()}
  write_db(cache_dir / "janeaustenr" / "data", objects)
  return cache_dir


def test_austen_books_and_text_from_a_cached_package(tmp_path, monkeypatch):
  cache = fake_package(tmp_path)
  monkeypatch.setattr(debian.subprocess, "run", lambda *a, **k: pytest.fail("ran a command"))
  assert austen.fetch_janeaustenr(cache) == cache / "janeaustenr"
  books = austen.austen_books(cache)
  assert list(books) == list(austen.BOOKS.values())
  assert books["Emma"] == "EMMA\n\nEmma ends."
  text = austen.austen_text(cache)
  assert text.startswith("SENSE & SENSIBILITY\n\nSense & Sensibility ends.\n\nPRIDE & PREJUDICE")
  assert text.endswith("PERSUASION\n\nPersuasion ends.")


def test_missing_book_and_missing_tools(tmp_path, monkeypatch):
  cache = fake_package(tmp_path / "a", {"emma": "Emma"})
  with pytest.raises(ValueError, match="'sensesensibility' should be a character vector"):
    austen.austen_books(cache)
  monkeypatch.setattr(debian.shutil, "which", lambda tool: None)
  with pytest.raises(RuntimeError, match="apt-get and dpkg-deb not found"):
    austen.fetch_janeaustenr(tmp_path / "b")


def test_docstring_examples():
  flags_ = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
  result = doctest.testmod(austen, globs={**vars(austen), "np": np}, optionflags=flags_)
  assert result.attempted > 0 and result.failed == 0


def test_real_package_if_cached():
  root = austen._default_cache_dir() / "janeaustenr"
  if not (root / austen.DATA_DB).is_file():
    pytest.skip(f"r-cran-janeaustenr not in the cache ({root}); fetch_janeaustenr() puts it there")
  books = austen.austen_books()
  assert list(books) == list(austen.BOOKS.values())
  assert books["Pride & Prejudice"].startswith("PRIDE AND PREJUDICE\n\nBy Jane Austen\n")
  assert "It is a truth universally acknowledged" in books["Pride & Prejudice"][:200]
  assert books["Emma"].startswith("EMMA\n\nBy Jane Austen\n")
  assert all(len(text) > 400_000 for text in books.values())
