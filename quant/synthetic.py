"""Random but well-formed ggml blocks, for tests and benchmarks of anything built on ``quant``.

``gguf`` can only quantise a few types, and no real weights can be downloaded here, so every
format is exercised with random bytes instead: random bytes are valid codes for every field
except the fp16 block scales (which could come out NaN/inf and make bit-exact comparisons
meaningless) and the MXFP4 exponent (which could overflow).  Those fields are overwritten with
small finite values; everything else (codes, sub-block scales, high bits) stays uniformly random,
so every bit of every layout is exercised.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .ggml_types import TYPE_SIZES, GGMLType

F16_SCALE_FIELDS: dict[GGMLType, tuple[int, ...]] = {
    GGMLType.Q4_0: (0,),
    GGMLType.Q4_1: (0, 2),
    GGMLType.Q5_0: (0,),
    GGMLType.Q5_1: (0, 2),
    GGMLType.Q8_0: (0,),
    GGMLType.Q2_K: (80, 82),
    GGMLType.Q3_K: (108,),
    GGMLType.Q4_K: (0, 2),
    GGMLType.Q5_K: (0, 2),
    GGMLType.Q6_K: (208,),
    GGMLType.IQ4_NL: (0,),
    GGMLType.IQ4_XS: (0,),
}
"""Byte offsets, within a block, of the fp16 scale fields of each block-quantised type."""


def random_blocks(
    ggml_type: int,
    shape: Sequence[int],
    seed: int = 0,
    scale: float = 0.02,
) -> np.ndarray:
    """Random data of ``shape`` (torch order) in format ``ggml_type``, as raw bytes.

    Returns uint8 of shape ``(*shape[:-1], bytes_per_row)``: the layout ``gguf.GGUFWriter``
    expects with ``raw_dtype``; ``.reshape(-1)`` gives the flat bytes ``dequantize`` takes.
    Block scales are ~N(0, scale) in fp16 (so negative and subnormal scales occur too).
    """
    gtype = GGMLType(ggml_type)
    shape = tuple(int(s) for s in shape)
    rng = np.random.default_rng(seed)
    block_values, block_bytes = TYPE_SIZES[gtype]
    n_values = int(np.prod(shape))
    if shape[-1] % block_values:
        raise ValueError(f"{gtype.name}: last axis {shape[-1]} is not a multiple of {block_values}")
    byte_shape = (*shape[:-1], shape[-1] // block_values * block_bytes)

    if gtype in (GGMLType.F32, GGMLType.F16, GGMLType.BF16):
        values = rng.standard_normal(n_values, dtype=np.float32)
        if gtype == GGMLType.F16:
            return values.astype(np.float16).view(np.uint8).reshape(byte_shape)
        if gtype == GGMLType.BF16:  # truncate: any bf16 bit pattern of a finite value will do
            return (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(byte_shape)
        return values.view(np.uint8).reshape(byte_shape)

    n_blocks = n_values // block_values
    blocks = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for offset in F16_SCALE_FIELDS.get(gtype, ()):
        field = (rng.standard_normal(n_blocks) * scale).astype(np.float16)
        blocks[:, offset : offset + 2] = field.view(np.uint8).reshape(n_blocks, 2)
    if gtype == GGMLType.MXFP4:  # E8M0 exponent: 2**(e-128) * (codes up to 12) stays ~[1e-4, 100]
        blocks[:, 0] = rng.integers(114, 134, size=n_blocks, dtype=np.uint8)
    elif gtype not in F16_SCALE_FIELDS:
        raise NotImplementedError(f"no synthetic generator for {gtype.name}")
    return blocks.reshape(byte_shape)
