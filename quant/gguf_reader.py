"""A small, fast GGUF (v2/v3) reader over a read-only memory map.

Written from the format rather than wrapping ``gguf.GGUFReader`` because that reader decodes
every metadata array into Python objects at open time (seconds for a gpt-oss tokenizer) and
returns numpy data; loaders here want torch views and dequantisation on the fly.

Layout (little-endian): magic ``GGUF``, u32 version, u64 tensor count, u64 metadata count,
the metadata key/value pairs, one info record per tensor (name, u32 n_dims, u64 dims in ggml
order - dims[0] varies fastest -, u32 ggml type, u64 offset relative to the data section), then
the data section, which starts at the next multiple of ``general.alignment`` (default 32).

Nothing is read eagerly: ``raw`` returns a uint8 view over the map and ``dequantize`` decodes
one tensor (optionally after moving its compressed bytes to an accelerator).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from .dequant import dequantize as _dequantize
from .ggml_types import GGMLType, tensor_nbytes
from .gguf_metadata import GGUFError, MetadataParser

__all__ = ["GGUFError", "GGUFFile", "GGUFTensorInfo"]

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 8  # ggml itself uses 4; anything far beyond that is corruption


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where and how one tensor is stored.

    ``shape`` is in torch order (ggml dims reversed), ``offset`` is the absolute byte offset of
    the data in the file, ``n_bytes`` its size.
    """

    name: str
    ggml_type: GGMLType
    shape: tuple[int, ...]
    n_bytes: int
    offset: int

    @property
    def n_values(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n


class GGUFFile:
    """An open GGUF file: ``metadata`` and ``tensors`` are parsed at open, tensor data on demand.

    Use as a context manager.  Tensors returned by :meth:`raw` view the read-only map and must not
    be written to; :meth:`dequantize` always returns fresh memory (or fills ``out``).  After
    :meth:`close`, tensor access fails; metadata values (numpy views, lazy string arrays) and
    outstanding :meth:`raw` views stay valid and keep the map alive until they are dropped.
    Little-endian files only (all GGUFs in practice; big-endian ones are named as such).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.version = 0
        self.alignment = DEFAULT_ALIGNMENT
        self.data_offset = 0
        self.metadata: Mapping[str, Any] = MappingProxyType({})
        self.tensors: dict[str, GGUFTensorInfo] = {}
        self._mm: mmap.mmap | None = None
        self._data: torch.Tensor | None = None

        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise GGUFError(self.path, f"truncated file: {size} bytes is shorter than a GGUF header")
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._parse(size)
            with warnings.catch_warnings():  # the map is read-only; we never write through it
                warnings.simplefilter("ignore", UserWarning)
                # Through a memoryview: the export keeps the map open (mm.close() then raises
                # BufferError, which close() ignores) until the last raw()/weight view is freed.
                self._data = torch.frombuffer(memoryview(self._mm), dtype=torch.uint8)
        except BaseException:
            self.close()
            raise

    # -- parsing ------------------------------------------------------------------------------

    def _parse(self, size: int) -> None:
        p = MetadataParser(self._mm, size, str(self.path))
        magic = self._mm[:4]
        if magic != GGUF_MAGIC:
            raise p.fail(f"not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
        p.pos = 4
        version = p.u32("version")
        if version not in SUPPORTED_VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            if swapped in SUPPORTED_VERSIONS:
                raise p.fail(f"big-endian GGUF (version {swapped}) is not supported")
            raise p.fail(f"unsupported GGUF version {version} (supported: {SUPPORTED_VERSIONS})")
        self.version = version
        n_tensors = p.u64("tensor count")
        n_kv = p.u64("metadata count")
        if n_kv > size or n_tensors > size:
            raise p.fail(f"corrupt header: {n_tensors} tensors, {n_kv} metadata entries in {size} bytes")

        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = p.string("metadata key")
            if key in metadata:
                raise p.fail(f"duplicate metadata key {key!r}")
            metadata[key] = p.value(p.u32(f"value type of {key!r}"), key)
        self.metadata = MappingProxyType(metadata)
        self.alignment = self._alignment(p, metadata.get("general.alignment", DEFAULT_ALIGNMENT))

        raw_infos = []
        for _ in range(n_tensors):
            name = p.string("tensor name")
            n_dims = p.u32(f"dimension count of tensor {name!r}")
            if n_dims > MAX_DIMS:
                raise p.fail(f"tensor {name!r}: {n_dims} dimensions (corrupt tensor info?)")
            dims = [p.u64(f"dimensions of tensor {name!r}") for _ in range(n_dims)]
            type_id = p.u32(f"type of tensor {name!r}")
            rel_offset = p.u64(f"offset of tensor {name!r}")
            raw_infos.append((name, dims, type_id, rel_offset))
        self.data_offset = -(-p.pos // self.alignment) * self.alignment

        for name, dims, type_id, rel_offset in raw_infos:
            if name in self.tensors:
                raise p.fail(f"duplicate tensor name {name!r}")
            self.tensors[name] = self._tensor_info(p, size, name, dims, type_id, rel_offset)
        self._check_overlaps(p)

    def _check_overlaps(self, p: MetadataParser) -> None:
        """A corrupt dimension usually makes a tensor run into the next one before it runs off the
        end of the file; catch it here rather than as garbage values later."""
        by_offset = sorted((t for t in self.tensors.values() if t.n_bytes), key=lambda t: t.offset)
        for a, b in zip(by_offset, by_offset[1:], strict=False):
            if a.offset + a.n_bytes > b.offset:
                raise p.fail(
                    f"tensor {a.name!r} (shape {a.shape}, {a.ggml_type.name}, {a.n_bytes} bytes at byte "
                    f"{a.offset}) overlaps tensor {b.name!r} at byte {b.offset}: wrong shape or offset"
                )

    def _alignment(self, p: MetadataParser, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value & (value - 1):
            raise p.fail(f"general.alignment must be a positive power of two, got {value!r}")
        return value

    def _tensor_info(
        self, p: MetadataParser, size: int, name: str, dims: list[int], type_id: int, rel_offset: int
    ) -> GGUFTensorInfo:
        where = f"tensor {name!r}"
        try:
            gtype = GGMLType(type_id)
        except ValueError:
            raise p.fail(f"{where}: unknown ggml type id {type_id}") from None
        shape = tuple(reversed(dims))
        try:
            n_bytes = tensor_nbytes(gtype, shape)
        except ValueError as e:
            raise p.fail(f"{where}: {e}") from None
        if rel_offset % self.alignment:
            raise p.fail(
                f"{where}: data offset {rel_offset} is not a multiple of the alignment {self.alignment}"
            )
        offset = self.data_offset + rel_offset
        if offset + n_bytes > size:
            raise p.fail(
                f"truncated file: {where} ({gtype.name}, {n_bytes} bytes at byte {offset}) "
                f"runs past the end of the file ({size} bytes)"
            )
        return GGUFTensorInfo(name, gtype, shape, n_bytes, offset)

    # -- access -------------------------------------------------------------------------------

    def _info(self, name: str) -> GGUFTensorInfo:
        if self._data is None:
            raise GGUFError(self.path, "file is closed")
        info = self.tensors.get(name)
        if info is None:
            raise KeyError(f"{self.path}: no tensor named {name!r}")
        return info

    def raw(self, name: str) -> torch.Tensor:
        """The tensor's bytes: a 1-D uint8 view over the map, no copy.

        The map is read-only: writing into this tensor (or an in-place op on it) crashes the
        process.  ``.clone()`` or ``.to(device)`` it first if it must be modified.
        """
        info = self._info(name)
        assert self._data is not None
        return self._data[info.offset : info.offset + info.n_bytes]

    def dequantize(
        self,
        name: str,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        *,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decode one tensor to ``dtype`` (fp32 by default, fp16, bf16) in its torch shape.

        With ``device`` (or an ``out`` buffer on another device) the compressed bytes are moved
        first and decoded there, so only the small quantised form crosses the bus.  ``out``: see
        :func:`quant.dequant.dequantize`.
        """
        info = self._info(name)
        raw = self.raw(name)
        target = (
            torch.device(device) if device is not None else (out.device if out is not None else raw.device)
        )
        if target != raw.device:
            raw = raw.to(target)
        try:
            return _dequantize(raw, info.ggml_type, info.shape, dtype, out=out)
        except (NotImplementedError, ValueError) as e:
            raise GGUFError(self.path, f"tensor {name!r}: {e}") from e

    def release(self, name: str) -> None:
        """Drop the file pages of tensor ``name`` from this process's resident memory.

        For loaders that copy a tensor out of the map (another dtype or device): otherwise every
        page they read stays mapped in, and a whole-file load holds the file beside its copy.  The
        pages stay in the page cache and fault back in on the next access, so views of this or a
        neighbouring tensor (sharing an edge page) stay valid.  A no-op without ``MADV_DONTNEED``
        (Windows) or once the file is closed.
        """
        advice = getattr(mmap, "MADV_DONTNEED", None)
        info = self.tensors[name]
        if self._mm is None or advice is None or not info.n_bytes:
            return
        start = info.offset - info.offset % mmap.PAGESIZE  # madvise wants a page-aligned start
        with contextlib.suppress(OSError):
            self._mm.madvise(advice, start, info.offset + info.n_bytes - start)

    # -- lifetime -----------------------------------------------------------------------------

    def close(self) -> None:
        """Release the tensor data.  Safe to call twice; unmaps now unless views are still referenced."""
        self._data = None
        mm, self._mm = self._mm, None
        if mm is not None:
            with contextlib.suppress(BufferError):  # views still out: unmapped with the last of them
                mm.close()

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._data is None else f"{len(self.tensors)} tensors"
        return f"GGUFFile({str(self.path)!r}, v{self.version}, {len(self.metadata)} metadata keys, {state})"
