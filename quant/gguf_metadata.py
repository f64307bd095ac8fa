"""Decoding of GGUF metadata values straight from a memory map.

GGUF metadata can be large: a gpt-oss file carries a 201,088-entry token list and ~446k BPE
merges as arrays of strings.  Decoding those into Python strings up front is what makes generic
readers take seconds to open such a file, yet a loader usually reads a handful of scalars.  So:

* numeric arrays become read-only numpy views over the map (no copy, no per-element work);
* string arrays become :class:`LazyStringArray`: opening only walks the length prefixes to find
  where each string starts (one tight loop, ~80 ns per entry) and a string is decoded when asked for.
"""

from __future__ import annotations

import array
import struct
from collections.abc import Iterator, Sequence
from enum import IntEnum
from typing import Any, overload

import numpy as np

from lens_core.errors import CheckpointError


class GGUFError(CheckpointError):
    """A GGUF file is malformed or unsupported.

    A :class:`~lens_core.errors.CheckpointError` (hence a ``ValueError``), so loaders handle bad
    GGUF and bad safetensors files alike; the message starts with the path and names the tensor
    or metadata key at fault.
    """


class GGUFValueType(IntEnum):
    """Metadata value type ids of the GGUF format."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


_NUMERIC_DTYPES: dict[int, np.dtype] = {
    GGUFValueType.UINT8: np.dtype("u1"),
    GGUFValueType.INT8: np.dtype("i1"),
    GGUFValueType.UINT16: np.dtype("<u2"),
    GGUFValueType.INT16: np.dtype("<i2"),
    GGUFValueType.UINT32: np.dtype("<u4"),
    GGUFValueType.INT32: np.dtype("<i4"),
    GGUFValueType.FLOAT32: np.dtype("<f4"),
    GGUFValueType.BOOL: np.dtype("?"),
    GGUFValueType.UINT64: np.dtype("<u8"),
    GGUFValueType.INT64: np.dtype("<i8"),
    GGUFValueType.FLOAT64: np.dtype("<f8"),
}
_SCALARS: dict[int, struct.Struct] = {
    GGUFValueType(t): struct.Struct("<" + fmt) for t, fmt in enumerate("BbHhIif?__Qqd") if fmt != "_"
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class LazyStringArray(Sequence[str]):
    """A GGUF array of strings, decoded (UTF-8) one element at a time on access.

    Holds a view of the memory map and the byte offset of each element's length prefix, so
    indexing is O(1); ``get_bytes`` returns the undecoded bytes (tokenizer vocabularies may want
    those).  Like the numeric arrays, it keeps the map alive for as long as it is referenced,
    also after :meth:`GGUFFile.close`.
    """

    __slots__ = ("_buf", "_offsets", "_path", "_key")

    def __init__(self, buf: memoryview, offsets: np.ndarray, path: str, key: str) -> None:
        self._buf = buf
        self._offsets = offsets
        self._path = path
        self._key = key

    def __len__(self) -> int:
        return len(self._offsets)

    def get_bytes(self, index: int) -> bytes:
        """The raw bytes of element ``index``."""
        off = int(self._offsets[index])
        (n,) = _U64.unpack_from(self._buf, off)
        return self._buf[off + 8 : off + 8 + n].tobytes()

    def _decode(self, index: int, data: memoryview | bytes) -> str:
        try:
            return str(data, "utf-8")
        except UnicodeDecodeError as e:
            raise GGUFError(self._path, f"metadata {self._key!r}[{index}] is not valid UTF-8 ({e})") from None

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> list[str]: ...
    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        off = int(self._offsets[index])
        (n,) = _U64.unpack_from(self._buf, off)
        return self._decode(index, self._buf[off + 8 : off + 8 + n])

    def __iter__(self) -> Iterator[str]:
        buf, unpack = self._buf, _U64.unpack_from
        for i, off in enumerate(self._offsets.tolist()):
            (n,) = unpack(buf, off)
            yield self._decode(i, buf[off + 8 : off + 8 + n])

    def tolist(self) -> list[str]:
        """All elements, decoded (what a generic reader would have built at open time)."""
        return list(self)

    def __repr__(self) -> str:
        return f"<LazyStringArray: {len(self)} strings>"


class MetadataParser:
    """Reads GGUF primitives from a buffer (the file's memory map), with bounds checks that turn
    a short or corrupt file into a :class:`GGUFError` naming the file, key and offset."""

    def __init__(self, buf: Any, size: int, path: str) -> None:
        self.buf = buf
        self.view = memoryview(buf)  # exported to lazy string arrays, which then keep the map alive
        self.size = size
        self.path = path
        self.pos = 0

    def fail(self, problem: str) -> GGUFError:
        return GGUFError(self.path, problem)

    def _need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(
                f"truncated file: {what} at byte {self.pos} needs {n} bytes, file has {self.size}"
            )

    def u32(self, what: str) -> int:
        self._need(4, what)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self._need(8, what)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def string(self, what: str) -> str:
        n = self.u64(what)
        self._need(n, what)
        data = self.buf[self.pos : self.pos + n]
        self.pos += n
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not valid UTF-8 ({e})") from None

    def value(self, vtype: int, key: str) -> Any:
        """One metadata value of type ``vtype``: a Python scalar, a str, or an array."""
        if vtype == GGUFValueType.STRING:
            return self.string(f"string value of {key!r}")
        if vtype == GGUFValueType.ARRAY:
            return self.array(key)
        fmt = _SCALARS.get(vtype)
        if fmt is None:
            raise self.fail(f"metadata {key!r} has unknown value type id {vtype}")
        self._need(fmt.size, f"value of {key!r}")
        (v,) = fmt.unpack_from(self.buf, self.pos)
        self.pos += fmt.size
        return v

    def array(self, key: str) -> np.ndarray | LazyStringArray | list[Any]:
        """An array: numeric -> read-only numpy view; strings -> lazy; arrays -> list of arrays."""
        etype = self.u32(f"array type of {key!r}")
        count = self.u64(f"array length of {key!r}")
        dtype = _NUMERIC_DTYPES.get(etype)
        if dtype is not None:
            self._need(count * dtype.itemsize, f"array {key!r}")
            arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
            self.pos += count * dtype.itemsize
            return arr
        if etype == GGUFValueType.STRING:
            return LazyStringArray(self.view, self._scan_strings(count, key), self.path, key)
        if etype == GGUFValueType.ARRAY:
            self._need(count * 12, f"array {key!r}")  # every element has at least a type and a length
            return [self.array(f"{key}[{i}]") for i in range(count)]
        raise self.fail(f"array {key!r} has unknown element type id {etype}")

    def _scan_strings(self, count: int, key: str) -> np.ndarray:
        """Offsets of the length prefixes of ``count`` consecutive strings; moves past them."""
        self._need(count * 8, f"string array {key!r}")
        buf, unpack, size = self.buf, _U64.unpack_from, self.size
        offsets = array.array("q", bytes(8 * count))  # filled in place: cheaper than a list + np.array
        pos = self.pos
        try:
            for i in range(count):
                offsets[i] = pos
                pos += 8 + unpack(buf, pos)[0]
        except struct.error:
            pos = size + 1
        if pos > size:
            raise self.fail(f"truncated file: string array {key!r} runs past the end of the file")
        self.pos = pos
        return np.frombuffer(offsets, dtype=np.int64)
