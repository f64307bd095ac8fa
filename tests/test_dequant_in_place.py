"""quant.dequant's fp32 in-place path and int16 scale reads, for every type, against ``gguf``.

fp32 output is written chunk by chunk straight into the result (or a caller's buffer), and the
fp16 block scales are read as int16 columns unless a chunk sits at an odd address.
``test_quant_gguf.py`` checks every kernel on single chunks; here every kernel goes through the
chunked in-place path and the odd-address fallback, bit for bit against ``gguf.quants``.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from quant import BLOCK_INFO, GGMLType, dequantize
from quant import dequant as dequant_module
from quant.synthetic import random_blocks

ALL_TYPES = [GGMLType(t).name for t in BLOCK_INFO]


def reference(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> np.ndarray:
    with np.errstate(over="ignore"):
        values = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name])
    return np.ascontiguousarray(values, dtype=np.float32).reshape(shape)


def same_bits(ours: torch.Tensor, ref: np.ndarray) -> bool:
    return ours.dtype == torch.float32 and np.array_equal(ours.numpy().view(np.uint32), ref.view(np.uint32))


def case(type_name: str, seed: int) -> tuple[torch.Tensor, np.ndarray, tuple[int, int]]:
    """37 rows of at least 3 blocks: with 1000-value chunks, several chunks and a ragged last one."""
    shape = (37, max(3 * BLOCK_INFO[GGMLType[type_name]][0], 96))
    raw = random_blocks(GGMLType[type_name], shape, seed=seed)
    return torch.from_numpy(raw.reshape(-1)), reference(raw, type_name, shape), shape


@pytest.mark.parametrize("type_name", ALL_TYPES)
def test_chunked_fp32_written_in_place(monkeypatch, type_name):
    monkeypatch.setitem(dequant_module._CHUNK_VALUES, "cpu", 1000)
    raw, ref, shape = case(type_name, seed=11)
    buffer = torch.full((shape[0] * shape[1],), float("nan"))
    result = dequantize(raw, GGMLType[type_name], shape, out=buffer)
    assert result.data_ptr() == buffer.data_ptr() and same_bits(result, ref)
    assert same_bits(dequantize(raw, GGMLType[type_name], shape), ref)


@pytest.mark.parametrize("chunk", [None, 1000])
@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_1", "Q2_K", "Q6_K", "IQ4_XS"])
def test_odd_address(monkeypatch, type_name, chunk):
    """Blocks at an odd byte address cannot be viewed as int16: the byte-pair fallback is exact too."""
    if chunk is not None:
        monkeypatch.setitem(dequant_module._CHUNK_VALUES, "cpu", chunk)
    raw, ref, shape = case(type_name, seed=12)
    padded = torch.zeros(raw.numel() + 1, dtype=torch.uint8)
    padded[1:] = raw
    odd = padded[1:]
    assert odd.storage_offset() % 2 == 1
    assert same_bits(dequantize(odd, GGMLType[type_name], shape), ref)
    low = dequantize(odd, GGMLType[type_name], shape, torch.bfloat16)
    assert torch.equal(low.view(torch.int16), torch.from_numpy(ref).to(torch.bfloat16).view(torch.int16))
