"""A safetensors writer that streams: the header is written from the shapes, then each tensor as it
is produced, so converting a multi-GB checkpoint holds about one tensor in memory.
The files are what ``safetensors`` writes (8-byte header length, JSON header padded with spaces,
tensors back to back), under a temporary name renamed when complete."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lens_core.safetensors_io import SAFETENSORS_DTYPES

__all__ = ["Layout", "write_streaming"]


Layout = Sequence[tuple[str, torch.dtype, Sequence[int]]]
"""``(name, dtype, shape)`` of every tensor, in file order."""


def _header_bytes(layout: Layout, metadata: Mapping[str, str]) -> bytes:
    """Length prefix + JSON header (padded to 8 bytes) of a safetensors file holding ``layout``."""
    names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape in layout:
        n = torch.empty((), dtype=dtype).element_size()
        for d in shape:
            n *= int(d)
        header[name] = {
            "dtype": names[dtype],
            "shape": [int(d) for d in shape],
            "data_offsets": [offset, offset + n],
        }
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(len(text) + 8) % 8)
    return len(text).to_bytes(8, "little") + text


def write_streaming(
    path: str | os.PathLike[str],
    layout: Layout,
    tensors: Iterable[Mapping[str, torch.Tensor]],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a safetensors file whose ``layout`` (name, dtype, shape, in file order) is known up front,
    from ``tensors`` yielded a few at a time in that order: memory stays near one tensor.

    Written under a temporary name and renamed when complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    expected = iter(layout)
    try:
        with tmp.open("wb") as f:
            f.write(_header_bytes(layout, metadata or {}))
            for group in tensors:
                for name, t in group.items():
                    want = next(expected, None)
                    got = (name, t.dtype, tuple(t.shape))
                    if want is None or (want[0], want[1], tuple(want[2])) != got:
                        raise RuntimeError(f"tensor {got} does not match the announced layout entry {want}")
                    f.write(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
            if next(expected, None) is not None:
                raise RuntimeError("fewer tensors written than announced")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
