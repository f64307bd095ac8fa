"""MXFP4 (OCP microscaling FP4) packing, as stored in the openai/gpt-oss checkpoints.

Format: values come in groups of 32 along the last axis. Each group shares one E8M0 scale byte
(the value ``2 ** (byte - 127)``) and each value is a 4-bit E2M1 code (1 sign bit, 2 exponent
bits, 1 mantissa bit: magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6). Two codes share a byte: the low
nibble holds the even element of a pair, the high nibble the odd one. A group therefore takes
16 code bytes + 1 scale byte = 4.25 bits per value.

Tensor layout used here (and by the HF gpt-oss checkpoints):

* ``blocks``: uint8 ``[..., G, 16]``: 32 codes per group, packed two per byte;
* ``scales``: uint8 ``[..., G]``: one E8M0 exponent per group;
* the matching dense tensor is ``[..., G * 32]``.

For the GPT-OSS experts the packed axis is the *contracted* (input) axis of each projection,
so the checkpoint stores every expert matrix transposed with respect to the dense
``transformers`` layout: ``gate_up_proj_blocks`` is ``[E, 2I, H/32, 16]`` for the dense
``gate_up_proj`` ``[E, H, 2I]``, and ``down_proj_blocks`` is ``[E, H, I/32, 16]`` for the dense
``down_proj`` ``[E, I, H]``. :func:`dequantize_expert_weight` and
:func:`quantize_expert_weight` perform that transposition.
"""

from __future__ import annotations

import torch

GROUP_SIZE = 32
"""Values sharing one E8M0 scale."""

E8M0_BIAS = 127
"""A scale byte ``s`` means ``2 ** (s - E8M0_BIAS)``."""

# Magnitudes of the eight non-negative E2M1 codes 0..7; code | 8 is the negative value.
_E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0


def e2m1_table(device: torch.device | str | None = None) -> torch.Tensor:
    """All 16 E2M1 values indexed by their 4-bit code, fp32 ``[16]`` (codes 8..15 are negative)."""
    mags = torch.tensor(_E2M1_MAGNITUDES, dtype=torch.float32, device=device)
    return torch.cat([mags, -mags])


_BYTE_TABLES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _byte_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``[256, 2]`` in ``dtype``: the (even, odd) element values a code byte holds, at scale 1."""
    key = (device, dtype)
    table = _BYTE_TABLES.get(key)
    if table is None:
        values = e2m1_table()
        byte = torch.arange(256)
        table = torch.stack((values[byte & 0x0F], values[byte >> 4]), dim=-1).to(device=device, dtype=dtype)
        _BYTE_TABLES[key] = table
    return table


def dequantize_mxfp4(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Unpack MXFP4 groups into a dense tensor.

    Args:
        blocks: uint8 ``[..., G, 16]``, two E2M1 codes per byte, low nibble first.
        scales: uint8 ``[..., G]``, E8M0 exponents (bias 127).
        dtype: floating dtype of the result.

    Returns:
        ``[..., G * 32]`` in ``dtype``: each code's value (exact in any float dtype) scaled by
        ``torch.ldexp`` in ``dtype``, so results that do not fit ``dtype`` (e.g. fp16 above 65504)
        round or overflow there. Bit-identical to transformers' gpt-oss dequantiser.
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[-1] != GROUP_SIZE // 2 or blocks.shape[:-1] != scales.shape:
        raise ValueError(
            f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match "
            f"(expected blocks [..., G, {GROUP_SIZE // 2}] and scales [..., G])"
        )
    values = _byte_table(blocks.device, dtype)[blocks.int()]  # [..., G, 16, 2]
    values = values.flatten(-2)  # [..., G, 32]: even elements from the low nibbles
    exponent = scales.to(torch.int32).sub_(E8M0_BIAS).unsqueeze(-1)  # [..., G, 1]
    return torch.ldexp(values, exponent).flatten(-2)


def shared_exponents(amax: torch.Tensor, element_max: float) -> torch.Tensor:
    """Per-group E8M0 exponents: the smallest ``e`` with ``amax / 2**e <= element_max`` (nothing is
    clipped), -127 for all-zero groups, clamped to the E8M0 range [-127, 127]. int32, ``amax``'s shape.
    """
    # e = ceil(log2(amax / max)), done exactly with frexp: amax / max = m * 2**k, m in [0.5, 1);
    # e = k - 1 when m == 0.5 (exact power of two), else k.
    mantissa, k = torch.frexp(amax.float() / element_max)
    exponent = torch.where(mantissa == 0.5, k - 1, k)
    exponent = torch.where(amax > 0, exponent, torch.full_like(exponent, -E8M0_BIAS))
    exponent = exponent.clamp(-E8M0_BIAS, E8M0_BIAS)
    # amax / max rounds in fp32, so re-check the bound and step up where it was missed.
    scaled_max = torch.ldexp(amax.float(), -exponent)
    return torch.where(scaled_max > element_max, exponent + 1, exponent).clamp(max=E8M0_BIAS)


def e2m1_codes(scaled: torch.Tensor) -> torch.Tensor:
    """Round fp32 values to the nearest E2M1 code (ties to the even code; beyond 6 saturates).

    Returns uint8 codes 0..15 (8..15 negative; -0 becomes code 0), indices into :func:`e2m1_table`.
    """
    magnitude = scaled.abs()
    mags = torch.tensor(_E2M1_MAGNITUDES, dtype=torch.float32, device=scaled.device)
    midpoints = (mags[1:] + mags[:-1]) / 2  # [7]
    code = torch.bucketize(magnitude, midpoints)  # ties land on the lower code
    tie_to_odd = (magnitude == midpoints[code.clamp(max=midpoints.numel() - 1)]) & (code % 2 == 1)
    code = code + tie_to_odd.long()
    code = code + 8 * ((scaled < 0) & (code > 0)).long()
    return code.to(torch.uint8)


def quantize_mxfp4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest MXFP4 quantiser (ties to the even code).

    Each group of 32 values along the last axis gets the smallest power-of-two scale that brings
    its largest magnitude within the E2M1 range (so nothing is clipped); each value is then
    rounded to the nearest E2M1 code.

    Args:
        x: floating ``[..., N]`` with ``N`` a multiple of 32, all values finite.

    Returns:
        ``(blocks, scales)``: uint8 ``[..., N/32, 16]`` and uint8 ``[..., N/32]``, the layout read by
        :func:`dequantize_mxfp4`.
    """
    if not x.is_floating_point():
        raise TypeError(f"quantize_mxfp4 expects a floating tensor, got {x.dtype}")
    if x.ndim == 0 or x.shape[-1] % GROUP_SIZE:
        raise ValueError(f"last axis of {tuple(x.shape)} is not a multiple of {GROUP_SIZE}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("quantize_mxfp4: input holds inf or NaN")
    groups = x.float().contiguous().view(*x.shape[:-1], x.shape[-1] // GROUP_SIZE, GROUP_SIZE)  # [..., G, 32]
    exponent = shared_exponents(groups.abs().amax(dim=-1), E2M1_MAX)  # [..., G]
    code = e2m1_codes(torch.ldexp(groups, -exponent.unsqueeze(-1)))  # [..., G, 32]
    blocks = code[..., 0::2] | (code[..., 1::2] << 4)  # [..., G, 16]
    scales = (exponent + E8M0_BIAS).to(torch.uint8)  # [..., G]
    return blocks.contiguous(), scales.contiguous()


def dequantize_expert_weight(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Checkpoint-layout expert weight -> dense ``transformers`` layout.

    Args:
        blocks: uint8 ``[..., out, in/32, 16]`` (``in`` = contracted axis).
        scales: uint8 ``[..., out, in/32]``.
        dtype: result dtype.

    Returns:
        ``[..., in, out]`` (a transposed view), e.g. ``gate_up_proj`` ``[H, 2I]`` per expert.
    """
    return dequantize_mxfp4(blocks, scales, dtype).transpose(-1, -2)


def quantize_expert_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``transformers`` expert weight ``[..., in, out]`` -> checkpoint ``(blocks, scales)``.

    Returns uint8 ``[..., out, in/32, 16]`` and ``[..., out, in/32]`` (``in`` must be a multiple of 32).
    """
    return quantize_mxfp4(weight.transpose(-1, -2))
