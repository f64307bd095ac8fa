"""Lazy, validated access to the tensors of one checkpoint (one file or a sharded folder).

Checkpoints are opened by reading only their safetensors headers; tensor data stays on disk
(memory-mapped) until a model asks for one tensor, so loading never holds two full copies.
Headers are checked against the file size first, so a truncated download is reported with the
file and the first tensor that lies past its end instead of failing deep inside a model.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import CheckpointError

PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".pkl"}
_MAX_HEADER = 100 * 1024 * 1024

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,  # MXFP8 block scales (quant.fp_formats)
}


def read_header(path: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """Parse and validate one safetensors header.

    Returns ``(tensors, metadata)`` where ``tensors`` maps name -> ``{"dtype", "shape", "data_offsets"}``.
    Raises CheckpointError naming the file for a corrupt header and naming the tensor for data
    that lies past the end of the file (a truncated download).
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(path, "file is empty or truncated (no safetensors header)")
            (n,) = struct.unpack("<Q", raw_len)
            if n > _MAX_HEADER or n + 8 > size:
                raise CheckpointError(
                    path, "not a safetensors file, or truncated (header length is larger than the file)"
                )
            header = json.loads(f.read(n))
    except OSError as e:
        raise CheckpointError(path, f"cannot read file: {e.strerror or e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(path, f"corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(path, "corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_size = size - 8 - n
    for name, info in header.items():
        try:
            start, end = info["data_offsets"]
            dtype = info["dtype"]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(path, f"corrupt safetensors header entry for tensor '{name}'") from e
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(path, f"tensor '{name}' has unsupported dtype {dtype}")
        if end > data_size:
            raise CheckpointError(
                path,
                f"file is truncated: tensor '{name}' needs bytes up to {end + 8 + n:,} but the file has "
                f"{size:,}. Download it again.",
            )
    return header, metadata


def _reject_unsafe(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            path,
            "pickle-based checkpoints are not loaded (they can run arbitrary code). "
            "Use the .safetensors (or .gguf) release of this model.",
        )


def find_weight_files(path: Path) -> list[Path]:
    """The safetensors files that make up the checkpoint at ``path`` (a file or a folder).

    A folder may hold a ``*.safetensors.index.json`` (sharded diffusers/HF layout) or plain
    ``*.safetensors`` files.
    """
    if not path.exists():
        raise CheckpointError(path, "no such file or folder")
    if path.is_file():
        _reject_unsafe(path)
        if path.suffix.lower() != ".safetensors":
            raise CheckpointError(path, f"unsupported weight file type '{path.suffix}' (expected .safetensors)")
        return [path]
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(indexes[0], f"corrupt shard index ({e})") from e
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(indexes[0], f"shard(s) listed in the index are missing: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        unsafe = [p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
        hint = f" (found pickle files {unsafe}, which are not loaded for safety)" if unsafe else ""
        raise CheckpointError(path, f"folder holds no .safetensors weights{hint}")
    return files


class TensorSource(Mapping[str, torch.Tensor]):
    """Read-only mapping of tensor name -> tensor, loading each tensor from disk on access.

    ``shapes`` gives every tensor's shape without touching the data. Names can be renamed (a
    prefix stripped, a naming scheme converted) with :meth:`renamed`, still lazily.
    """

    def __init__(self, root: Path, files: list[Path]) -> None:
        self.root = root
        self.files = files
        self._where: dict[str, tuple[Path, str]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        self.metadata: dict[str, str] = {}
        self._handles: dict[Path, object] = {}
        for f in files:
            header, meta = read_header(f)
            self.metadata.update(meta)
            for name, info in header.items():
                self._where[name] = (f, name)
                self.shapes[name] = tuple(info["shape"])
                self.dtypes[name] = info["dtype"]

    @classmethod
    def open(cls, path: str | os.PathLike) -> TensorSource:
        path = Path(path).expanduser()
        return cls(path, find_weight_files(path))

    def renamed(self, mapping: Mapping[str, str]) -> TensorSource:
        """A view where ``mapping[old] = new``; tensors not in ``mapping`` are dropped."""
        view = TensorSource.__new__(TensorSource)
        view.root, view.files, view.metadata, view._handles = self.root, self.files, self.metadata, self._handles
        view._where = {new: self._where[old] for old, new in mapping.items()}
        view.shapes = {new: self.shapes[old] for old, new in mapping.items()}
        view.dtypes = {new: self.dtypes[old] for old, new in mapping.items()}
        return view

    def file_of(self, name: str) -> Path:
        return self._where[name][0]

    def __getitem__(self, name: str) -> torch.Tensor:
        f, key = self._where[name]
        handle = self._handles.get(f)
        if handle is None:
            try:
                handle = self._handles[f] = safe_open(str(f), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f, f"cannot open safetensors file ({e})") from e
        try:
            return handle.get_tensor(key)
        except Exception as e:
            raise CheckpointError(f, f"cannot read tensor '{key}' ({e})") from e

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def close(self) -> None:
        self._handles.clear()


def save_file_atomic(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write a safetensors file so that it appears complete or not at all (temp file + rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=dict(metadata or {}))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def save_sharded(
    tensors: Mapping[str, torch.Tensor],
    folder: str | os.PathLike,
    stem: str,
    max_shard_bytes: int,
    metadata: Mapping[str, str] | None = None,
) -> list[Path]:
    """Write ``tensors`` as ``{stem}-0000i-of-0000n.safetensors`` shards plus the HF/diffusers index
    ``{stem}.safetensors.index.json``. The index is written last, so a folder with an index is complete."""
    folder = Path(folder)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    paths, weight_map = [], {}
    for i, shard in enumerate(shards):
        fname = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        paths.append(save_file_atomic(shard, folder / fname, metadata))
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = folder / f"{stem}.safetensors.index.json"
    tmp = index.with_name(f".{index.name}.tmp")
    tmp.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    os.replace(tmp, index)
    return paths
