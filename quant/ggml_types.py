"""ggml tensor-type ids and block geometry, as fixed by the GGUF/ggml file format.

Kept apart from the reader and the kernels because both need it, and so will the quantised
layers and the converter that are built on them: one table of (values per block, bytes per
block) for every type a GGUF file may contain, whether or not we can dequantise it, lets the
reader size and bounds-check every tensor in a file without knowing how to decode it.
"""

from __future__ import annotations

from enum import IntEnum

QK_K = 256
"""Values per super-block of the K-quants and the IQ*_XS/S types."""


class GGMLType(IntEnum):
    """ggml tensor type ids (``enum ggml_type``); ids 4, 5 and 31-33 were retired upstream."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39
    NVFP4 = 40
    Q1_0 = 41


TYPE_SIZES: dict[GGMLType, tuple[int, int]] = {
    GGMLType.F32: (1, 4),
    GGMLType.F16: (1, 2),
    GGMLType.Q4_0: (32, 18),
    GGMLType.Q4_1: (32, 20),
    GGMLType.Q5_0: (32, 22),
    GGMLType.Q5_1: (32, 24),
    GGMLType.Q8_0: (32, 34),
    GGMLType.Q8_1: (32, 40),
    GGMLType.Q2_K: (QK_K, 84),
    GGMLType.Q3_K: (QK_K, 110),
    GGMLType.Q4_K: (QK_K, 144),
    GGMLType.Q5_K: (QK_K, 176),
    GGMLType.Q6_K: (QK_K, 210),
    GGMLType.Q8_K: (QK_K, 292),
    GGMLType.IQ2_XXS: (QK_K, 66),
    GGMLType.IQ2_XS: (QK_K, 74),
    GGMLType.IQ3_XXS: (QK_K, 98),
    GGMLType.IQ1_S: (QK_K, 50),
    GGMLType.IQ4_NL: (32, 18),
    GGMLType.IQ3_S: (QK_K, 110),
    GGMLType.IQ2_S: (QK_K, 82),
    GGMLType.IQ4_XS: (QK_K, 136),
    GGMLType.I8: (1, 1),
    GGMLType.I16: (1, 2),
    GGMLType.I32: (1, 4),
    GGMLType.I64: (1, 8),
    GGMLType.F64: (1, 8),
    GGMLType.IQ1_M: (QK_K, 56),
    GGMLType.BF16: (1, 2),
    GGMLType.TQ1_0: (QK_K, 54),
    GGMLType.TQ2_0: (QK_K, 66),
    GGMLType.MXFP4: (32, 17),
    GGMLType.NVFP4: (64, 36),
    GGMLType.Q1_0: (128, 18),
}
"""ggml type -> (values per block, bytes per block) for every type a GGUF file may hold."""


def type_name(type_id: int) -> str:
    """Readable name for error messages, also for ids this table does not know."""
    try:
        return GGMLType(type_id).name
    except ValueError:
        return f"unknown type {type_id}"


def tensor_nbytes(ggml_type: int, shape: tuple[int, ...]) -> int:
    """Bytes taken by a tensor of ``shape`` (torch order): ggml packs each row (last axis) into
    whole blocks, so the row length must be a multiple of the block size."""
    block_values, block_bytes = TYPE_SIZES[GGMLType(ggml_type)]
    n_values = 1
    for dim in shape:
        n_values *= dim
    if (shape and shape[-1] % block_values) or n_values % block_values:
        raise ValueError(
            f"{type_name(ggml_type)} stores rows in whole {block_values}-value blocks, "
            f"but shape {tuple(shape)} (torch order) has rows of {shape[-1] if shape else 1}"
        )
    return n_values // block_values * block_bytes
