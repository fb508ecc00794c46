"""Jane Austen's six novels from the Debian package ``r-cran-janeaustenr``, read without R.

The package (`janeaustenr <https://cran.r-project.org/package=janeaustenr>`_, MIT; the texts are
public domain, from Project Gutenberg) keeps each novel as an R character vector, one element per
line of text, in an R lazy-load database (``data/Rdata.rdb`` with its index ``data/Rdata.rdx``).
`fetch_janeaustenr` downloads the ``.deb`` once with ``apt-get download`` (nothing is installed)
and unpacks it with ``dpkg-deb -x`` into a cache; `read_rdb` reads such a database with a small
pure-Python reader of R's serialization format; `austen_books` and `austen_text` give the novels.

The formats, as R writes them (``src/main/serialize.c``, ``src/library/base/R/lazyload.R``):

* A serialization starts with ``"X\\n"`` (XDR: big-endian) and three int32, the format version
  (2 or 3), the writing and the minimal reading R version; version 3 adds the native encoding
  (int32 length, then its name). Then one item: an int32 of flags (SEXP type in the low byte,
  then the object, attribute and tag bits, ``levels`` from bit 12), then its content: a length
  and the elements for vectors (``CHARSXP`` strings as length + bytes, length -1 for ``NA``),
  attributes/tag/CAR/CDR items for pairlists, and back references (``REFSXP``) to symbols and
  environments read before.
* An ``.rds`` file is one serialization, usually gzip-compressed (bzip2, xz or none also occur).
* A lazy-load database is a pair: ``NAME.rdx``, an ``.rds`` holding
  ``list(variables = list(name = c(offset, length), ...), references = ..., compressed = ...)``,
  and ``NAME.rdb``, the concatenated blobs: each a big-endian uint32 of the uncompressed length,
  then (``compressed`` 2 or 3 only) a type byte (``Z`` zlib, ``2`` bzip2, ``X`` xz, ``0`` none),
  then the compressed serialization (zlib when ``compressed`` is ``TRUE``).

R objects become Python objects (`unserialize`): ``NULL`` -> ``None``; character vectors ->
``list[str | None]`` (``NA`` -> ``None``); integer, double, complex and logical vectors ->
numpy ``int32``, ``float64``, ``complex128`` and ``bool`` arrays (a ``numpy.ma`` masked array
where an integer or logical vector has ``NA``; double ``NA`` is a NaN), reshaped (column-major)
by a ``dim`` attribute; raw vectors -> ``bytes``; factors -> `Factor`; data frames -> ``dict``
column name -> column; lists and pairlists with unique non-empty names -> ``dict``, other lists
-> ``list``; symbols -> `RSymbol`; anything else (functions, calls, environments, ...) ->
`RObject`, unconverted. Other attributes (``names`` of atomic vectors, ``row.names``, ...) are
dropped.

Example::

  books = austen_books()                  # {"Emma": "EMMA\\n\\nBy Jane Austen...", ...}
  text = austen_text()                    # the six, in that order, one blank line apart
  objects = read_rdb(fetch_janeaustenr() / "data" / "Rdata.rdb")   # {"emma": [lines], ...}

  >>> unserialize(bytes.fromhex("580a 00000003 00040201 00030500 00000005") + b"UTF-8"
  ...             + bytes.fromhex("00000010 00000002 00040009 00000002") + b"hi"
  ...             + bytes.fromhex("00000009 ffffffff"))
  ['hi', None]
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import lzma
import os
import pathlib
import struct
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxcomp.data import debian

PACKAGE = "r-cran-janeaustenr"
"""The Debian package that ships the novels."""

PACKAGE_SUBDIR = "usr/lib/R/site-library/janeaustenr"
"""Where the R package lies inside the ``.deb``."""

DATA_DB = "data/Rdata.rdb"
"""The lazy-load database of the package's data sets, relative to the package root."""

BOOKS: Mapping[str, str] = {
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
"""R object name -> title, in publication order (the order of ``janeaustenr::austen_books()``)."""

# SEXP types (Rinternals.h) and the pseudo-types of the serialization stream (serialize.c).
NILSXP, SYMSXP, LISTSXP, CLOSXP, ENVSXP, PROMSXP, LANGSXP = 0, 1, 2, 3, 4, 5, 6
SPECIALSXP, BUILTINSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, CPLXSXP = 7, 8, 9, 10, 13, 14, 15
STRSXP, DOTSXP, VECSXP, EXPRSXP, BCODESXP, EXTPTRSXP, WEAKREFSXP = 16, 17, 19, 20, 21, 22, 23
RAWSXP, S4SXP = 24, 25
ALTREP_SXP, ATTRLISTSXP, ATTRLANGSXP, BASEENV_SXP, EMPTYENV_SXP = 238, 239, 240, 241, 242
BCREPREF, BCREPDEF, GENERICREFSXP, CLASSREFSXP, PERSISTSXP = 243, 244, 245, 246, 247
PACKAGESXP, NAMESPACESXP, BASENAMESPACE_SXP, MISSINGARG_SXP = 248, 249, 250, 251
UNBOUNDVALUE_SXP, GLOBALENV_SXP, NILVALUE_SXP, REFSXP = 252, 253, 254, 255

_TYPE_NAMES = {value: name for name, value in globals().items() if name.endswith("SXP")}
_PAIRLIST_TYPES = (LISTSXP, LANGSXP, DOTSXP, ATTRLISTSXP, ATTRLANGSXP)
_SINGLETONS = {  # Pseudo-types that stand for one well-known object and carry no content.
    BASEENV_SXP: "baseenv",
    EMPTYENV_SXP: "emptyenv",
    BASENAMESPACE_SXP: "base namespace",
    MISSINGARG_SXP: "missing argument",
    UNBOUNDVALUE_SXP: "unbound value",
    GLOBALENV_SXP: "globalenv",
}
# CHARSXP encoding bits in the flags' levels (Defn.h).
_BYTES_MASK, _LATIN1_MASK, _UTF8_MASK, _ASCII_MASK = 1 << 1, 1 << 2, 1 << 3, 1 << 6
_NA_INTEGER = -(2**31)


class RSymbol(str):
  """An R symbol (a name such as a pairlist tag or a variable in a call), not a string.

  Example:
    >>> RSymbol("x"), RSymbol("x") == "x"
    (RSymbol('x'), True)
  """

  def __repr__(self) -> str:
    return f"RSymbol({str.__repr__(self)})"


@dataclasses.dataclass(eq=False)
class RObject:
  """An R object with no plain Python counterpart (function, call, environment, ...).

  Attributes:
    type: the SEXP type name, e.g. ``"CLOSXP"``, ``"LANGSXP"``, ``"ENVSXP"``.
    value: the content as read (type-dependent: the cells ``[(tag, value), ...]`` of a call,
      ``{"enclos": ..., "frame": ..., ...}`` for an environment, ...); ``None`` for singletons.
    attributes: attribute name -> value, as Python objects.
  """

  type: str
  value: Any = None
  attributes: dict[str, Any] = dataclasses.field(default_factory=dict)

  def __repr__(self) -> str:
    return f"RObject({self.type})"


@dataclasses.dataclass(eq=False)
class Factor:
  """An R factor: codes into levels.

  Attributes:
    codes: int32 ``(n,)``, 0-based indices into ``levels``, -1 for ``NA`` (R's codes minus 1).
    levels: the level labels, in R's order.
    ordered: whether the factor is ordered.

  Example:
    >>> f = Factor(np.array([1, 0, -1], np.int32), ["a", "b"])
    >>> len(f), f.to_list()
    (3, ['b', 'a', None])
  """

  codes: np.ndarray
  levels: list[str | None]
  ordered: bool = False

  def __len__(self) -> int:
    return len(self.codes)

  def __eq__(self, other: object) -> bool:
    if not isinstance(other, Factor):
      return NotImplemented
    return (np.array_equal(self.codes, other.codes) and self.levels == other.levels
            and self.ordered == other.ordered)

  def to_list(self) -> list[str | None]:
    """The labels, one per element (``None`` for ``NA``)."""
    return [None if c < 0 else self.levels[c] for c in self.codes.tolist()]


class _Node:
  """A raw object as read, before conversion: type, content, attributes as (tag, _Node) pairs."""

  __slots__ = ("type", "value", "attrs", "is_obj")

  def __init__(self, type_: int, value: Any = None, attrs: list | None = None, is_obj=False):
    self.type, self.value, self.attrs, self.is_obj = type_, value, attrs, is_obj

  def attr(self, name: str) -> _Node | None:
    for tag, value in self.attrs or ():
      if tag == name:
        return value
    return None


_NIL = _Node(NILSXP)


class _Reader:
  """Reads one XDR serialization from ``data`` into a `_Node` tree (`read`)."""

  def __init__(self, data: bytes, source: str):
    self.data, self.source, self.pos = memoryview(data), source, 0
    self.refs: list[_Node] = []
    self.native_encoding = "utf-8"

  def error(self, message: str) -> ValueError:
    return ValueError(f"{self.source}: {message} (at byte {self.pos})")

  def take(self, n: int) -> memoryview:
    if n < 0 or self.pos + n > len(self.data):
      raise self.error(f"truncated R serialization: needs {n} more bytes, "
                       f"{len(self.data) - self.pos} left")
    start, self.pos = self.pos, self.pos + n
    return self.data[start:self.pos]

  def int32(self) -> int:
    return struct.unpack(">i", self.take(4))[0]

  def length(self) -> int:
    n = self.int32()
    if n == -1:  # Long vector: two more int32, upper and lower half.
      upper, lower = struct.unpack(">II", self.take(8))
      n = (upper << 32) + lower
    if n < 0:
      raise self.error(f"negative vector length {n}")
    return n

  def array(self, dtype: str, n: int) -> np.ndarray:
    itemsize = np.dtype(dtype).itemsize
    if n > (len(self.data) - self.pos) // itemsize:
      raise self.error(f"truncated R serialization: vector of {n} x {itemsize} bytes, "
                       f"{len(self.data) - self.pos} left")
    return np.frombuffer(self.take(n * itemsize), dtype=dtype)

  def read(self) -> _Node:
    """Reads the header and the one item after it."""
    fmt = bytes(self.take(2))
    if fmt != b"X\n":
      kind = {b"A\n": "ASCII", b"B\n": "native binary"}.get(fmt)
      what = f"R's {kind} serialization format" if kind else f"not an R serialization {fmt!r}"
      raise self.error(f"{what}; only XDR ('X\\n', as saveRDS and lazy-load databases write) "
                       "is supported")
    version, _, _ = self.int32(), self.int32(), self.int32()
    if version == 3:
      self.native_encoding = bytes(self.take(self.length())).decode("ascii", "replace")
    elif version != 2:
      raise self.error(f"R serialization format version {version}; only 2 and 3 are known")
    item = self.item()
    if self.pos != len(self.data):
      raise self.error(f"{len(self.data) - self.pos} trailing bytes after the serialized object")
    return item

  def item(self) -> _Node:
    flags = self.int32()
    type_, levels = flags & 0xFF, flags >> 12
    is_obj, has_attr, has_tag = bool(flags & 1 << 8), bool(flags & 1 << 9), bool(flags & 1 << 10)
    if type_ == NILVALUE_SXP:
      return _NIL
    if type_ == REFSXP:
      index = (flags >> 8) or self.int32()
      if not 1 <= index <= len(self.refs):
        raise self.error(f"reference {index} to an object not read yet ({len(self.refs)} read)")
      return self.refs[index - 1]
    if type_ in _SINGLETONS:
      return _Node(type_, _SINGLETONS[type_])
    if type_ == SYMSXP:
      name = self.item()
      if name.type != CHARSXP:
        raise self.error(f"symbol name is a {_type_name(name.type)}, expected a CHARSXP")
      node = _Node(SYMSXP, RSymbol(name.value or "NA"))
      self.refs.append(node)
      return node
    if type_ in (PACKAGESXP, NAMESPACESXP, PERSISTSXP):
      node = _Node(type_, self.string_vector())
      self.refs.append(node)
      return node
    if type_ == ENVSXP:
      node = _Node(ENVSXP, {"locked": bool(self.int32())})
      self.refs.append(node)  # Before its content, which may refer back to it.
      for key in ("enclos", "frame", "hashtab"):
        node.value[key] = self.item()
      attrs = self.item()
      node.attrs = attrs.value if attrs.type == LISTSXP else None
      return node
    if type_ in _PAIRLIST_TYPES:
      return self.pairlist(type_, has_attr, has_tag)
    if type_ in (CLOSXP, PROMSXP):
      attrs = self.attributes() if has_attr else None
      env = self.item() if has_tag else _NIL
      car, cdr = self.item(), self.item()
      keys = ("environment", "formals", "body") if type_ == CLOSXP else ("env", "value", "expr")
      return _Node(type_, dict(zip(keys, (env, car, cdr))), attrs, is_obj)
    if type_ in (EXTPTRSXP, WEAKREFSXP):
      node = _Node(type_, {})
      self.refs.append(node)
      if type_ == EXTPTRSXP:
        node.value["prot"], node.value["tag"] = self.item(), self.item()
    elif type_ in (SPECIALSXP, BUILTINSXP):
      node = _Node(type_, bytes(self.take(self.length())).decode("ascii", "replace"))
    elif type_ == CHARSXP:
      return _Node(CHARSXP, self.charsxp(levels))
    elif type_ in (LGLSXP, INTSXP):
      node = _Node(type_, self.array(">i4", self.length()))
    elif type_ == REALSXP:
      node = _Node(type_, self.array(">f8", self.length()))
    elif type_ == CPLXSXP:
      node = _Node(type_, self.array(">c16", self.length()))
    elif type_ == RAWSXP:
      node = _Node(type_, bytes(self.take(self.length())))
    elif type_ == STRSXP:
      node = _Node(type_, [self.string_element() for _ in range(self.length())])
    elif type_ in (VECSXP, EXPRSXP):
      node = _Node(type_, [self.item() for _ in range(self.length())])
    elif type_ == S4SXP:
      node = _Node(type_)
    elif type_ == BCODESXP:
      reps: list[Any] = [None] * self.int32()
      node = _Node(type_, self.bytecode(reps))
    elif type_ == ALTREP_SXP:
      return self.altrep()
    else:
      raise self.error(f"unknown SEXP type {type_} (flags {flags:#010x}); corrupt data?")
    node.is_obj = is_obj
    if has_attr:
      node.attrs = self.attributes()
    return node

  def attributes(self) -> list[tuple[str | None, _Node]]:
    attrs = self.item()
    if attrs.type not in _PAIRLIST_TYPES:
      raise self.error(f"attributes are a {_type_name(attrs.type)}, expected a pairlist")
    return attrs.value

  def pairlist(self, type_: int, has_attr: bool, has_tag: bool) -> _Node:
    """A chain of cons cells, read iteratively: value = [(tag or None, car), ...]."""
    head = _Node(type_, [])
    while True:
      attrs = self.attributes() if has_attr else None
      if head.attrs is None:
        head.attrs = attrs
      tag = self.item() if has_tag else None
      if tag is not None and tag.type != SYMSXP:
        raise self.error(f"pairlist tag is a {_type_name(tag.type)}, expected a symbol")
      head.value.append((None if tag is None else tag.value, self.item()))
      flags = self.int32()
      cdr_type = flags & 0xFF
      if cdr_type == NILVALUE_SXP:
        return head
      if cdr_type not in (LISTSXP, ATTRLISTSXP):
        raise self.error(f"improper pairlist ends in a {_type_name(cdr_type)}; not supported")
      has_attr, has_tag = bool(flags & 1 << 9), bool(flags & 1 << 10)

  def charsxp(self, levels: int) -> str | bytes | None:
    n = self.int32()
    if n == -1:
      return None  # NA_character_.
    raw = bytes(self.take(n))
    if levels & _BYTES_MASK:
      return raw
    if levels & _LATIN1_MASK:
      encoding = "latin-1"
    elif levels & (_UTF8_MASK | _ASCII_MASK):
      encoding = "utf-8"
    else:
      encoding = self.native_encoding
    try:
      return raw.decode(encoding)
    except (UnicodeDecodeError, LookupError) as e:
      raise self.error(f"string {raw[:40]!r} is not valid {encoding}: {e}") from None

  def string_element(self) -> str | bytes | None:
    flags = self.int32()
    if flags & 0xFF != CHARSXP:
      raise self.error(f"character vector element is a {_type_name(flags & 0xFF)}, "
                       "expected a CHARSXP")
    return self.charsxp(flags >> 12)

  def string_vector(self) -> list[str | bytes | None]:
    if self.int32() != 0:
      raise self.error("names of a package/namespace/persistent reference: bad header")
    return [self.string_element() for _ in range(self.length())]

  def altrep(self) -> _Node:
    """A compact or wrapped vector (R >= 3.5), expanded to the ordinary vector it stands for."""
    info, state, attrs = self.item(), self.item(), self.item()
    cls = info.value[0][1].value if info.type == LISTSXP and info.value else None
    if cls in ("compact_intseq", "compact_realseq"):
      n, start, step = (float(v) for v in state.value[:3])
      values = start + step * np.arange(int(n))
      node = _Node(INTSXP, values.astype(np.int32)) if cls == "compact_intseq" else \
          _Node(REALSXP, values)
    elif cls is not None and cls.startswith("wrap_") and state.type == VECSXP:
      inner = state.value[0]
      node = _Node(inner.type, inner.value)
    elif cls == "deferred_string" and state.type in _PAIRLIST_TYPES:
      node = _Node(STRSXP, _as_character(state.value[0][1]))
    else:
      raise self.error(f"ALTREP class {cls!r} is not supported")
    if attrs.type in _PAIRLIST_TYPES:
      node.attrs = attrs.value
    node.is_obj = node.attr("class") is not None
    return node

  def bytecode(self, reps: list[Any]) -> _Node:
    """Byte code (compiled function bodies): read to skip it; kept as ``(code, consts)``."""
    code = self.item()
    consts = []
    for _ in range(self.length()):
      type_ = self.int32()
      if type_ == BCODESXP:
        consts.append(self.bytecode(reps))
      elif type_ in (LANGSXP, LISTSXP, BCREPDEF, BCREPREF, ATTRLANGSXP, ATTRLISTSXP):
        consts.append(self.bytecode_lang(type_, reps))
      else:
        consts.append(self.item())
    return _Node(BCODESXP, (code, consts))

  def bytecode_lang(self, type_: int, reps: list[Any]) -> Any:
    if type_ == BCREPREF:
      index = self.int32()
      if not 0 <= index < len(reps):
        raise self.error(f"byte code reference {index} out of range")
      return reps[index]
    if type_ not in (BCREPDEF, LANGSXP, LISTSXP, ATTRLANGSXP, ATTRLISTSXP):
      return self.item()
    pos = -1
    if type_ == BCREPDEF:
      pos, type_ = self.int32(), self.int32()
      if not 0 <= pos < len(reps):
        raise self.error(f"byte code definition {pos} out of range")
    cell = _Node(type_, {})
    if pos >= 0:
      reps[pos] = cell
    if type_ in (ATTRLANGSXP, ATTRLISTSXP):
      cell.attrs = self.attributes()
    cell.value["tag"] = self.item()
    cell.value["car"] = self.bytecode_lang(self.int32(), reps)
    cell.value["cdr"] = self.bytecode_lang(self.int32(), reps)
    return cell


def _type_name(type_: int) -> str:
  return _TYPE_NAMES.get(type_, f"SEXP type {type_}")


def _as_character(node: _Node) -> list[str | None]:
  """``as.character`` of an integer or double vector (for deferred strings)."""
  if node.type == INTSXP:
    return [None if v == _NA_INTEGER else str(v) for v in node.value.tolist()]
  if node.type == REALSXP:
    return [None if np.isnan(v) else format(v, ".15g") for v in node.value.tolist()]
  raise ValueError(f"deferred string of a {_type_name(node.type)}")


def _strings(node: _Node | None) -> list[Any]:
  return list(node.value) if node is not None and node.type == STRSXP else []


class _Converter:
  """`_Node` tree -> Python objects (see the module docstring); shared nodes convert once."""

  def __init__(self):
    self.memo: dict[int, Any] = {}

  def __call__(self, node: _Node) -> Any:
    key = id(node)
    if key in self.memo:
      return self.memo[key]
    result = self.convert(node)
    if node.type in (SYMSXP, ENVSXP, PACKAGESXP, NAMESPACESXP, PERSISTSXP):
      self.memo[key] = result
    return result

  def attributes(self, node: _Node) -> dict[str, Any]:
    return {str(tag): self(value) for tag, value in node.attrs or () if tag is not None}

  def convert(self, node: _Node) -> Any:
    t = node.type
    if t == NILSXP:
      return None
    if t in (SYMSXP, CHARSXP, RAWSXP):
      return node.value
    classes = _strings(node.attr("class"))
    if t == STRSXP:
      return _shape(list(node.value), node)
    if t == INTSXP and "factor" in classes:
      codes = node.value.astype(np.int32)
      codes = np.where(codes == _NA_INTEGER, 0, codes) - 1
      return Factor(codes, _strings(node.attr("levels")), ordered="ordered" in classes)
    if t in (LGLSXP, INTSXP):
      values = node.value.astype(np.int32)
      na = values == _NA_INTEGER
      if t == LGLSXP:
        values = values != 0
      if na.any():
        values = np.ma.masked_array(values, mask=na)
      return _shape(values, node)
    if t in (REALSXP, CPLXSXP):
      return _shape(node.value.astype(node.value.dtype.newbyteorder("=")), node)
    if t in (VECSXP, EXPRSXP):
      items = [self(item) for item in node.value]
      names = _strings(node.attr("names"))
      if t == VECSXP and (("data.frame" in classes and len(names) == len(items)) or
                          _usable_names(names, len(items))):
        return dict(zip(names, items))
      return items
    if t == LISTSXP:
      tags = [tag for tag, _ in node.value]
      values = [self(value) for _, value in node.value]
      return dict(zip(tags, values)) if _usable_names(tags, len(values)) else values
    if t == ENVSXP:
      result = RObject("ENVSXP", {})
      self.memo[id(node)] = result  # Before the content, which may refer back.
      result.value.update({k: v if k == "locked" else self(v) for k, v in node.value.items()})
      result.attributes = self.attributes(node)
      return result
    if t in _SINGLETONS or t in (PACKAGESXP, NAMESPACESXP, PERSISTSXP, BUILTINSXP, SPECIALSXP):
      return RObject(_type_name(t), node.value)
    if t in (LANGSXP, DOTSXP, ATTRLANGSXP):
      value = [(tag, self(v)) for tag, v in node.value]
    elif t in (CLOSXP, PROMSXP, EXTPTRSXP):
      value = {k: self(v) for k, v in node.value.items()}
    else:  # Byte code, weak references, S4 objects: opaque.
      value = None
    return RObject(_type_name(t), value, self.attributes(node))


def _usable_names(names: list[Any], n: int) -> bool:
  return (n > 0 and len(names) == n and all(isinstance(x, str) and x for x in names)
          and len(set(names)) == n)


def _shape(values: Any, node: _Node) -> Any:
  dim = node.attr("dim")
  if dim is None or dim.type != INTSXP:
    return values
  shape = tuple(int(d) for d in dim.value)
  if isinstance(values, list):
    return np.array(values, dtype=object).reshape(shape, order="F")
  return values.reshape(shape, order="F")


def unserialize(data: bytes, source: str = "R serialization") -> Any:
  """Reads one uncompressed R serialization (XDR, version 2 or 3) into Python objects.

  Args:
    data: the bytes, starting with ``b"X\\n"``.
    source: what ``data`` is, for error messages (e.g. a file name).

  Returns:
    The object, converted as the module docstring describes.

  Raises:
    ValueError: ``data`` is not a well-formed XDR serialization, is truncated, or holds a type
      this reader does not know.

  Example:
    >>> header = bytes.fromhex("580a 00000002 00040201 00020300")
    >>> ints = unserialize(header + bytes.fromhex("0000000d 00000003 00000001 80000000 00000007"))
    >>> ints.dtype, ints.tolist()  # NA is masked.
    (dtype('int32'), [1, None, 7])
    >>> unserialize(b"A\\n1\\n")
    Traceback (most recent call last):
    ...
    ValueError: R serialization: R's ASCII serialization format; only XDR ...
  """
  return _Converter()(_Reader(bytes(data), source).read())


def _decompress(data: bytes, source: str) -> bytes:
  """gzip / bzip2 / xz / uncompressed serialization, or a length-prefixed zlib blob."""
  try:
    if data[:2] == b"\x1f\x8b":
      return gzip.decompress(data)
    if data[:3] == b"BZh":
      return bz2.decompress(data)
    if data[:6] == b"\xfd7zXZ\x00":
      return lzma.decompress(data)
  except (OSError, EOFError, ValueError, lzma.LZMAError) as e:
    raise ValueError(f"{source}: corrupt compressed data: {e}") from None
  if data[:2] in (b"X\n", b"A\n", b"B\n"):
    return data
  return _decompress_blob(data, None, source)


_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]


def _decompress_blob(blob: bytes, compressed: Any, source: str) -> bytes:
  """One lazy-load database entry: uint32 length, [type byte,] compressed serialization.

  ``compressed`` is the index's flag: ``True``/1 zlib, 2 or 3 a type byte first, ``None``
  unknown (then a type byte is recognised by its value).
  """
  if len(blob) < 5:
    raise ValueError(f"{source}: database entry of {len(blob)} bytes is too short "
                     "(at least a 4-byte length and data)")
  size = struct.unpack(">I", blob[:4])[0]
  typed = compressed in (2, 3) or (compressed is None and blob[4:5] in (b"Z", b"2", b"X", b"0"))
  kind, payload = (blob[4:5], blob[5:]) if typed else (b"Z", blob[4:])
  try:
    if kind == b"Z":
      out = zlib.decompress(payload)
    elif kind == b"2":
      out = bz2.decompress(payload)
    elif kind == b"X":
      out = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=_LZMA_FILTERS).decompress(payload)
    elif kind == b"0":
      out = payload
    else:
      raise ValueError(f"unknown compression type byte {kind!r}")
  except (zlib.error, OSError, EOFError, ValueError, lzma.LZMAError) as e:
    raise ValueError(f"{source}: cannot decompress database entry: {e}") from None
  if len(out) != size:
    raise ValueError(f"{source}: entry header says {size} bytes uncompressed, got {len(out)}")
  return out


def read_rds(path: str | os.PathLike[str]) -> Any:
  """Reads an ``.rds`` file (``saveRDS``: gzip, bzip2, xz or no compression).

  Args:
    path: the file, e.g. ``Meta/package.rds`` or a lazy-load index ``Rdata.rdx``.

  Returns:
    The object, converted as `unserialize` says.

  Raises:
    ValueError: the file is not a well-formed XDR serialization (see `unserialize`).
  """
  path = os.fspath(path)
  with open(path, "rb") as f:
    data = f.read()
  return unserialize(_decompress(data, path), path)


def read_rdb(rdb_path: str | os.PathLike[str]) -> dict[str, Any]:
  """Reads every object of an R lazy-load database (``NAME.rdb`` and its index ``NAME.rdx``).

  Args:
    rdb_path: the ``.rdb`` file (the ``.rdx`` beside it is the index); ``NAME`` without a
      suffix works too. E.g. ``data/Rdata.rdb`` of an installed R package with data.

  Returns:
    Object name -> Python object (as `unserialize` converts it), in the index's order; e.g.
    ``{"emma": ["EMMA", "", "By Jane Austen", ...], ...}`` for janeaustenr.

  Raises:
    FileNotFoundError: the ``.rdb`` or the ``.rdx`` is missing.
    ValueError: the index or an entry is malformed or truncated; the message names which.

  Example::

    objects = read_rdb(fetch_janeaustenr() / "data" / "Rdata.rdb")
    objects["emma"][:3]                           # ['EMMA', '', 'By Jane Austen']
  """
  rdb = pathlib.Path(rdb_path)
  if rdb.suffix != ".rdb":
    rdb = rdb.with_name(rdb.name + ".rdb")
  rdx = rdb.with_suffix(".rdx")
  for path in (rdb, rdx):
    if not path.is_file():
      raise FileNotFoundError(f"lazy-load database file {path} does not exist")
  index = read_rds(rdx)
  if not isinstance(index, dict) or not isinstance(index.get("variables", {}), dict):
    raise ValueError(f"{rdx}: not a lazy-load index (expected a list with a named list "
                     f"'variables', got {type(index).__name__})")
  compressed = index.get("compressed")
  if isinstance(compressed, np.ndarray) and compressed.size == 1:
    compressed = True if compressed.dtype == bool and compressed.item() else compressed.item()
    compressed = 1 if compressed is True else compressed
  data = rdb.read_bytes()
  objects = {}
  for name, key in index.get("variables", {}).items():
    if not isinstance(key, np.ndarray) or key.shape != (2,) or np.ma.is_masked(key):
      raise ValueError(f"{rdx}: entry {name!r} is {key!r}, expected c(offset, length)")
    offset, length = (int(v) for v in key)
    if offset < 0 or length < 0 or offset + length > len(data):
      raise ValueError(f"{rdb}: object {name!r} at bytes [{offset}, {offset + length}) is past "
                       f"the end of the file ({len(data)} bytes); truncated?")
    source = f"{rdb}[{name}]"
    blob = _decompress_blob(data[offset:offset + length], compressed, source)
    objects[name] = unserialize(blob, source)
  return objects


def _default_cache_dir() -> pathlib.Path:
  # The project's cache root ($JAXCOMP_CACHE or ~/.cache/jaxcomp); imported here so that reading
  # R files does not load the model code.
  from jaxcomp.models.io.gguf import default_cache_dir  # pylint: disable=g-import-not-at-top
  return default_cache_dir() / "janeaustenr"


def fetch_janeaustenr(cache_dir: str | os.PathLike[str] | None = None) -> pathlib.Path:
  """Returns the janeaustenr R package directory, downloading and unpacking it once.

  Runs ``apt-get download r-cran-janeaustenr`` (the ``.deb`` only; nothing is installed, no
  root needed) and ``dpkg-deb -x`` in a temporary folder in ``cache_dir``, then moves the R
  package into ``cache_dir / "janeaustenr"``; later calls return it without the network.

  Args:
    cache_dir: folder for the package; default ``$JAXCOMP_CACHE/janeaustenr`` or
      ``~/.cache/jaxcomp/janeaustenr`` (see ``jaxcomp.models.io.default_cache_dir``).

  Returns:
    The package root (``DESCRIPTION``, ``data/Rdata.rdb``, ...): ``cache_dir / "janeaustenr"``.

  Raises:
    RuntimeError: ``apt-get`` or ``dpkg-deb`` is missing or failed (no Debian package tools,
      no network, or apt lists that lack the package), or the package has no ``data/Rdata.rdb``.

  Example::

    root = fetch_janeaustenr("/tmp/austen")     # /tmp/austen/janeaustenr
  """
  cache = pathlib.Path(cache_dir) if cache_dir else _default_cache_dir()
  return debian.fetch_deb(PACKAGE, PACKAGE_SUBDIR, DATA_DB, cache / "janeaustenr")


def austen_books(cache_dir: str | os.PathLike[str] | None = None) -> dict[str, str]:
  """The six novels, title -> full text (the package's lines joined with ``"\\n"``).

  Args:
    cache_dir: where `fetch_janeaustenr` keeps the package (downloaded on first use).

  Returns:
    ``{"Sense & Sensibility": ..., "Pride & Prejudice": ..., "Mansfield Park": ..., "Emma": ...,
    "Northanger Abbey": ..., "Persuasion": ...}`` in that (publication) order; each text starts
    with the title page (e.g. ``"PRIDE AND PREJUDICE\\n\\nBy Jane Austen\\n..."``).

  Raises:
    RuntimeError: the package cannot be fetched (see `fetch_janeaustenr`).
    ValueError: the package's data is malformed or lacks a novel.

  Example::

    books = austen_books()
    len(books["Emma"])                              # characters
  """
  db = fetch_janeaustenr(cache_dir) / DATA_DB
  objects = read_rdb(db)
  books = {}
  for name, title in BOOKS.items():
    lines = objects.get(name)
    if not isinstance(lines, list) or not all(isinstance(x, (str, type(None))) for x in lines):
      raise ValueError(f"{db}: {name!r} should be a character vector (the text of {title}), "
                       f"found {type(lines).__name__}")
    books[title] = "\n".join("" if line is None else line for line in lines)
  return books


def austen_text(cache_dir: str | os.PathLike[str] | None = None) -> str:
  """All six novels in `BOOKS` order, one blank line between two novels (see `austen_books`)."""
  return "\n\n".join(book.strip("\n") for book in austen_books(cache_dir).values())
