"""Low-precision float weights as ComfyUI stores them in safetensors: fp8, MXFP8 and NVFP4.

Each format is a :class:`~quant.layers.PackedWeight`, so :class:`~quant.layers.GGMLLinear` keeps it
packed in memory (on any device) and decodes it to the activations' dtype at every call.  A weight
is a matrix ``[out, in]`` or a bank of expert matrices ``[E, out, in]``.  Opt-in
(:func:`quant.layers.set_fp8_matmul`), per-tensor-scaled ``float8_e4m3fn`` matrices skip the decode
on GPUs with fp8 tensor cores: :func:`fp8_linear` rounds the input to fp8 and calls
``torch._scaled_mm``.

* **fp8** (:class:`Fp8Weight`): ``float8_e4m3fn`` or ``float8_e5m2`` values times one fp32 scale per
  matrix (1 for plain fp8 files; ComfyUI's ``weight_scale`` / legacy ``scale_weight``).
* **MXFP8** (:class:`MXFP8Weight`): ``float8_e4m3fn`` values; each run of 32 values along a row shares
  an E8M0 scale byte ``s`` meaning ``2 ** (s - 127)``.  The matrix is zero-padded to multiples of 32
  in both axes.
* **NVFP4** (:class:`NVFP4Weight`): 4-bit E2M1 codes (magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6; bit 3 is
  the sign), two per byte with the *first* value in the *high* nibble (ComfyUI's order; the
  gpt-oss MXFP4 checkpoints put it in the low nibble); each run of 16 values shares a
  ``float8_e4m3fn`` scale, and the whole matrix one fp32 scale: ``value = code * block * tensor``.
  Padded to multiples of 16.

Block scales are stored in the cuBLAS "tiled" layout (ComfyUI's ``to_blocked``): the scale matrix
``[rows, cols]`` is zero-padded to ``[rows rounded up to 128, cols rounded up to 4]`` and cut into
128 x 4 tiles, stored tile after tile in row-major tile order; inside a tile, the scale of tile row
``32 * a + b`` and column ``c`` sits at offset ``16 * b + 4 * a + c``.

The quantisers (round to nearest, ties to even) produce exactly these layouts for
:mod:`quant.comfy_quant`'s converters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from lens_core.mxfp4 import E8M0_BIAS, e2m1_codes, e2m1_table, shared_exponents

from .layers import PackedWeight

__all__ = [
    "FP8_DTYPES",
    "MXFP8_BLOCK",
    "NVFP4_BLOCK",
    "Fp8Weight",
    "MXFP8Weight",
    "NVFP4Weight",
    "dequantize_mxfp8",
    "dequantize_nvfp4",
    "fp8_linear",
    "fp8_matmul_supported",
    "quantize_fp8",
    "quantize_mxfp8",
    "quantize_nvfp4",
    "swizzle_scales",
    "tiled_scale_shape",
    "unswizzle_scales",
]

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
MXFP8_BLOCK = 32
NVFP4_BLOCK = 16
F8_E4M3_MAX = 448.0
E2M1_MAX = 6.0
_TILE_ROWS, _TILE_COLS = 128, 4


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# ---------------------------------------------------------------------------------------------
# The tiled scale layout
# ---------------------------------------------------------------------------------------------


def tiled_scale_shape(rows: int, cols: int) -> tuple[int, int]:
    """Stored shape of a ``[rows, cols]`` scale matrix in the tiled layout."""
    return _round_up(rows, _TILE_ROWS), _round_up(cols, _TILE_COLS)


def swizzle_scales(scales: torch.Tensor) -> torch.Tensor:
    """``[rows, cols]`` -> the tiled layout ``tiled_scale_shape(rows, cols)`` (zero padding)."""
    rows, cols = scales.shape
    r, c = tiled_scale_shape(rows, cols)
    padded = scales.new_zeros((r, c))
    padded[:rows, :cols] = scales
    # [row tile, a, b, col tile, c] -> tile-major, then b, a, c inside the tile.
    tiles = padded.view(r // _TILE_ROWS, 4, 32, c // _TILE_COLS, _TILE_COLS).permute(0, 3, 2, 1, 4)
    return tiles.reshape(r, c)


def unswizzle_scales(tiled: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The ``[rows, cols]`` scale matrix back from its tiled layout (any shape of the right size)."""
    r, c = tiled_scale_shape(rows, cols)
    if tiled.numel() != r * c:
        raise ValueError(f"a tiled [{rows}, {cols}] scale matrix has {r * c} entries, got {tiled.numel()}")
    tiles = tiled.reshape(r // _TILE_ROWS, c // _TILE_COLS, 32, 4, _TILE_COLS).permute(0, 3, 2, 1, 4)
    return tiles.reshape(r, c)[:rows, :cols]


# ---------------------------------------------------------------------------------------------
# Decoders (2-D)
# ---------------------------------------------------------------------------------------------


def _fp32_target(shape: Sequence[int], dtype: torch.dtype, out: torch.Tensor | None, device) -> torch.Tensor:
    """Where to build an fp32 result: ``out`` itself when it is fp32, else a fresh tensor."""
    if out is not None and dtype == torch.float32:
        return out.view(*shape)
    return torch.empty(*shape, dtype=torch.float32, device=device)


def _finish(w: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
    """The fp32 result ``w`` in ``dtype``, in ``out`` when given (rounded once)."""
    if out is not None:
        target = out.view(w.shape)
        return target if target.data_ptr() == w.data_ptr() else target.copy_(w)
    return w if dtype == torch.float32 else w.to(dtype)


_CODE_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
_GATHER_CHUNK = 1 << 18  # values per gather: the int32 indices (1 MiB) stay in cache


def _uses_table(data: torch.Tensor) -> bool:
    """Whether to decode ``data`` by table lookup rather than torch's cast.

    Measured with torch 2.13 on a 2-core x86 CPU (``benchmarks/bench_fp8.py``): the CPU cast from
    ``float8_e4m3fn`` is scalar code, several times slower than a 256-entry gather; the cast from
    ``float8_e5m2`` (the high byte of an fp16) is vectorised and beats the gather, as do casts on
    accelerators.
    """
    return data.device.type == "cpu" and data.dtype == torch.float8_e4m3fn


def _code_table(fp8_dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """fp32 ``[256]``: every fp8 byte converted by torch itself, so a gather from it is bit-identical
    to the cast (NaN, inf and -0 included)."""
    key = (fp8_dtype, device)
    table = _CODE_TABLES.get(key)
    if table is None:
        codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fp8_dtype)
        table = _CODE_TABLES[key] = codes.to(torch.float32).to(device)
    return table


def _gather(table: torch.Tensor, codes: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` (contiguous, ``codes``' shape) = ``table[codes]`` for 2-D fp8 ``codes`` (strided rows
    allowed), in row chunks so the int32 indices index_select needs stay small."""
    if codes.numel() == 0:
        return out
    rows = codes.reshape(-1, codes.shape[-1]).view(torch.uint8)
    target = out.view(rows.shape)
    step = max(1, _GATHER_CHUNK // max(1, rows.shape[1]))
    for r in range(0, rows.shape[0], step):
        index = rows[r : r + step].to(torch.int32).view(-1)
        torch.index_select(table, 0, index, out=target[r : r + step].view(-1))
    return out


def _fp8_to_fp32(data: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``w`` (fp32, ``data``'s shape) = the values of the fp8 ``data``, by the faster route."""
    return _gather(_code_table(data.dtype, data.device), data, w) if _uses_table(data) else w.copy_(data)


def dequantize_fp8(
    data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``data * scale`` (fp8 values, one fp32 scale), computed in fp32 and rounded once to ``dtype``.

    With a lookup table (:func:`_uses_table`) the 256 possible results are computed that way and
    gathered straight into the output: one pass, same bits.
    """
    scale = scale.to(device=data.device, dtype=torch.float32).reshape(())
    if _uses_table(data):
        table = (_code_table(data.dtype, data.device) * scale).to(dtype)
        target = out if out is not None else torch.empty(data.shape, dtype=dtype, device=data.device)
        return _gather(table, data, target).view(data.shape)
    w = _fp32_target(data.shape, dtype, out, data.device)
    w.copy_(data).mul_(scale)
    return _finish(w, dtype, out)


def dequantize_mxfp8(
    data: torch.Tensor,
    scales: torch.Tensor,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode one MXFP8 matrix: ``data`` ``[R, C]`` (fp8, padded), tiled E8M0 ``scales`` (uint8),
    logical ``shape`` ``(rows, cols)`` within the padding."""
    rows, cols = shape
    n_blocks = data.shape[1] // MXFP8_BLOCK
    exps = unswizzle_scales(scales, data.shape[0], n_blocks)[:rows, : -(-cols // MXFP8_BLOCK)]
    factor = exps.contiguous().view(torch.float8_e8m0fnu).float()  # 2 ** (s - 127); 255 is NaN
    w = _fp8_to_fp32(data[:rows, :cols], _fp32_target((rows, cols), dtype, out, data.device))
    if cols % MXFP8_BLOCK == 0:
        w.view(rows, -1, MXFP8_BLOCK).mul_(factor.unsqueeze(-1))
    else:
        w.mul_(factor.repeat_interleave(MXFP8_BLOCK, dim=1)[:, :cols])
    return _finish(w, dtype, out)


_NIBBLE_TABLES: dict[torch.device, torch.Tensor] = {}


def _hi_lo_table(device: torch.device) -> torch.Tensor:
    """``[256, 2]`` fp32: the (high nibble, low nibble) E2M1 values of every byte."""
    table = _NIBBLE_TABLES.get(device)
    if table is None:
        values = e2m1_table()
        byte = torch.arange(256)
        table = _NIBBLE_TABLES[device] = torch.stack((values[byte >> 4], values[byte & 0x0F]), -1).to(device)
    return table


def dequantize_nvfp4(
    data: torch.Tensor,
    block_scales: torch.Tensor,
    tensor_scale: torch.Tensor,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode one NVFP4 matrix: ``data`` uint8 ``[R, C/2]`` (padded, high nibble first), tiled
    ``float8_e4m3fn`` ``block_scales``, fp32 ``tensor_scale``; logical ``shape`` ``(rows, cols)``."""
    rows, cols = shape
    padded_cols = data.shape[1] * 2
    blocks = unswizzle_scales(block_scales, data.shape[0], padded_cols // NVFP4_BLOCK)[:rows]
    scale = blocks.contiguous().view(torch.float8_e4m3fn).float()
    scale = tensor_scale.to(device=data.device, dtype=torch.float32).reshape(()) * scale  # [rows, C/16]
    values = F.embedding(data[:rows].long(), _hi_lo_table(data.device))  # [rows, C/2, 2]
    values = values.view(rows, -1, NVFP4_BLOCK).mul_(scale.unsqueeze(-1)).view(rows, padded_cols)
    if cols == padded_cols:
        return _finish(values, dtype, out)
    w = _fp32_target((rows, cols), dtype, out, data.device)
    w.copy_(values[:, :cols])
    return _finish(w, dtype, out)


# ---------------------------------------------------------------------------------------------
# fp8 matmul
# ---------------------------------------------------------------------------------------------

_MATMUL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fp8_matmul_supported(device: torch.device) -> bool:
    """Whether ``torch._scaled_mm`` runs on fp8 hardware there: CUDA GPUs of compute capability 8.9+
    (Ada, Hopper, Blackwell).  torch's CPU ``_scaled_mm`` works but is a reference loop, about 3000x
    slower than decoding plus a bf16 matmul on this project's CPU (``benchmarks/bench_fp8.py``)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_linear(
    x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor | None:
    """``F.linear(x, data * scale, bias)`` on fp8 tensor cores, or None where that cannot run.

    ``x`` is rounded to ``float8_e4m3fn`` with one scale ``max|x| / 448`` per call (per tensor, the
    scaling every fp8 GPU supports), so the result carries that rounding (about 2**-4 relative per
    input value) on top of the weight's.  None (the caller decodes) unless: ``data`` is a 2-D
    ``float8_e4m3fn`` matrix (row-major) whose dims are multiples of 16 (cuBLASLt's requirement), ``x`` is
    fp32/fp16/bf16 and non-empty on a device :func:`fp8_matmul_supported` accepts.
    """
    out_features, in_features = data.shape
    if (
        data.dtype != torch.float8_e4m3fn
        or not data.is_contiguous()
        or in_features % 16
        or out_features % 16
        or x.dtype not in _MATMUL_DTYPES
        or x.numel() == 0
        or not fp8_matmul_supported(x.device)
    ):
        return None
    rows = x.reshape(-1, in_features)
    x_scale = (rows.abs().amax().float() / F8_E4M3_MAX).clamp_(min=torch.finfo(torch.float32).tiny)
    xq = (rows.float() / x_scale).clamp_(-F8_E4M3_MAX, F8_E4M3_MAX).to(torch.float8_e4m3fn)
    w_scale = scale.to(device=x.device, dtype=torch.float32).reshape(())
    y = torch._scaled_mm(xq, data.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=x.dtype)
    if bias is not None:
        y = y.add_(bias.to(x.dtype))
    return y.view(*x.shape[:-1], out_features)


# ---------------------------------------------------------------------------------------------
# Quantisers (2-D)
# ---------------------------------------------------------------------------------------------


def _check_matrix(x: torch.Tensor, what: str) -> None:
    if not x.is_floating_point() or x.ndim != 2:
        raise ValueError(f"{what} quantises a 2-D float matrix, got {x.dtype} {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what}: input holds inf or NaN")


def quantize_fp8(
    x: torch.Tensor, fp8_dtype: torch.dtype = torch.float8_e4m3fn, scaled: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(data, scale)`` with ``x ~ data * scale``.

    ``scaled``: ``scale = max|x| / max(fp8)`` (the ComfyUI convention), else 1 with values beyond
    the fp8 range clamped (plain fp8 files).  ``scale`` is a 0-d fp32 tensor.
    """
    if fp8_dtype not in FP8_DTYPES:
        raise ValueError(f"fp8 dtype must be one of {FP8_DTYPES}, got {fp8_dtype}")
    if not x.is_floating_point() or not bool(torch.isfinite(x).all()):
        raise ValueError("quantize_fp8 needs a finite float tensor")
    top = torch.finfo(fp8_dtype).max
    xf = x.float()
    amax = xf.abs().amax() if xf.numel() else xf.new_zeros(())
    scale = amax / top if scaled and bool(amax > 0) else torch.ones((), dtype=torch.float32)
    data = (xf / scale.to(xf.device)).clamp_(-top, top).to(fp8_dtype)
    return data, scale.to(torch.float32).reshape(())


def _padded(x: torch.Tensor, multiple: int) -> torch.Tensor:
    rows, cols = x.shape
    return F.pad(x.float(), (0, _round_up(cols, multiple) - cols, 0, _round_up(rows, multiple) - rows))


def quantize_mxfp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[rows, cols]`` -> ``(data, scales)``: fp8 ``[rows, cols]`` padded to multiples of 32 and the
    tiled uint8 E8M0 scales.  Each block gets the smallest power of two that fits its largest
    magnitude into the fp8 range; values round to nearest (ties to even)."""
    _check_matrix(x, "quantize_mxfp8")
    xp = _padded(x, MXFP8_BLOCK)
    blocks = xp.view(xp.shape[0], -1, MXFP8_BLOCK)
    exponent = shared_exponents(blocks.abs().amax(dim=-1), F8_E4M3_MAX)
    data = torch.ldexp(blocks, -exponent.unsqueeze(-1)).view_as(xp).to(torch.float8_e4m3fn)
    return data, swizzle_scales((exponent + E8M0_BIAS).to(torch.uint8))


def quantize_nvfp4(
    x: torch.Tensor, tensor_scale: torch.Tensor | float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[rows, cols]`` -> ``(data, block_scales, tensor_scale)`` in ComfyUI's NVFP4 layout.

    ``tensor_scale`` defaults to ``max|x| / (448 * 6)`` so the largest block scale is the fp8
    maximum.  Block scale = block max / 6 / tensor scale rounded to ``float8_e4m3fn``; values are
    divided by block * tensor scale and rounded to the nearest E2M1 code (ties to even).
    """
    _check_matrix(x, "quantize_nvfp4")
    xp = _padded(x, NVFP4_BLOCK)
    blocks = xp.view(xp.shape[0], -1, NVFP4_BLOCK)
    amax = blocks.abs().amax(dim=-1)
    if tensor_scale is None:
        top = amax.max() if amax.numel() else amax.new_zeros(())
        tensor_scale = top / (F8_E4M3_MAX * E2M1_MAX) if bool(top > 0) else torch.ones(())
    ts = torch.as_tensor(tensor_scale, dtype=torch.float32, device=x.device).reshape(())
    block = (amax / E2M1_MAX / ts).clamp_(max=F8_E4M3_MAX).to(torch.float8_e4m3fn)
    total = (ts * block.float()).unsqueeze(-1)
    scaled = torch.where(total > 0, blocks / total.clamp(min=torch.finfo(torch.float32).tiny), 0.0)
    codes = e2m1_codes(scaled.clamp_(-E2M1_MAX, E2M1_MAX)).view(xp.shape[0], -1)
    data = (codes[:, 0::2] << 4) | codes[:, 1::2]
    return data, swizzle_scales(block.view(torch.uint8)).view(torch.float8_e4m3fn), ts


# ---------------------------------------------------------------------------------------------
# Packed weights
# ---------------------------------------------------------------------------------------------


def _expert_count(shape: Sequence[int]) -> int | None:
    if len(shape) not in (2, 3):
        raise ValueError(f"a packed weight is [out, in] or [experts, out, in], got shape {tuple(shape)}")
    return shape[0] if len(shape) == 3 else None


def _per_matrix_scale(scale: torch.Tensor, experts: int | None, what: str) -> torch.Tensor:
    """A per-tensor scale as fp32: 0-d, or ``[E]`` (one per expert) for a bank."""
    n = scale.numel()
    if n == 1:
        return scale.float().reshape(())
    if experts is not None and n == experts:
        return scale.float().reshape(experts)
    need = "1 value" if experts is None else f"1 or {experts} values"
    raise ValueError(f"{what} needs {need}, got shape {tuple(scale.shape)}")


def _check_scale_size(
    scale: torch.Tensor, experts: int | None, tiles: tuple[int, int], dtypes: tuple[torch.dtype, ...], what: str
) -> None:
    """Block scales hold one tiled matrix per expert (ComfyUI stores ``tiles``, ``[E, *tiles]`` for banks)."""
    lead = () if experts is None else (experts,)
    if (
        scale.dtype not in dtypes
        or scale.numel() != tiles[0] * tiles[1] * (experts or 1)
        or (experts is not None and (scale.ndim < 2 or scale.shape[0] != experts))
    ):
        names = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        got = f"{str(scale.dtype).removeprefix('torch.')} {tuple(scale.shape)}"
        raise ValueError(f"{what} must be {names} of shape {(*lead, *tiles)}, got {got}")


def _scale_of(scale: torch.Tensor, expert: int) -> torch.Tensor:
    return scale if scale.ndim == 0 else scale[expert]


class _MatrixWeight(PackedWeight):
    """Shared behaviour: 2-D matrices decode directly, banks expert by expert."""

    def expert(self, index: int) -> PackedWeight:
        """Expert ``index`` of a bank ``[E, out, in]`` as a 2-D weight (views, no copy)."""
        raise NotImplementedError

    def _decode(self, dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(
        self,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        *,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        dtype = dtype or torch.float32
        q = self.to(device) if device is not None else self
        if len(self.shape) == 2:
            return q._decode(dtype, out)
        per = self.shape[1] * self.shape[2]
        result = torch.empty(self.shape, dtype=dtype, device=q.device) if out is None else out.view(self.shape)
        for e in range(self.shape[0]):
            q.expert(e).dequantize(dtype, out=result[e].view(per))
        return result


class Fp8Weight(_MatrixWeight):
    """fp8 values ``data`` (``[out, in]`` or ``[E, out, in]``) times ``scale`` (fp32, 0-d or ``[E]``)."""

    row_access = True

    def __init__(self, data: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        if data.dtype not in FP8_DTYPES:
            raise ValueError(f"fp8 weight data must be float8_e4m3fn or float8_e5m2, got {data.dtype}")
        experts = _expert_count(data.shape)
        self.data = data
        self.scale = _per_matrix_scale(
            scale if scale is not None else torch.ones((), device=data.device), experts, "an fp8 weight scale"
        )
        self.shape = tuple(data.shape)

    @property
    def kind(self) -> str:
        return str(self.data.dtype).removeprefix("torch.")

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"data": self.data, "scale": self.scale}

    def with_tensors(self, tensors: Mapping[str, torch.Tensor]) -> Fp8Weight:
        return Fp8Weight(tensors["data"], tensors["scale"])

    def expert(self, index: int) -> Fp8Weight:
        return Fp8Weight(self.data[index], _scale_of(self.scale, index))

    def rows(self, index: torch.Tensor) -> Fp8Weight:
        if len(self.shape) != 2:
            raise ValueError("rows() needs a 2-D weight")
        return Fp8Weight(self.data.index_select(0, index.reshape(-1).to(self.data.device)), self.scale)

    def _decode(self, dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
        return dequantize_fp8(self.data, self.scale, dtype, out)

    def packed_linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        return fp8_linear(x, self.data, self.scale, bias) if len(self.shape) == 2 else None


class MXFP8Weight(_MatrixWeight):
    """MXFP8: fp8 ``data`` padded to multiples of 32, tiled E8M0 ``scale`` (uint8), logical ``shape``."""

    def __init__(self, data: torch.Tensor, scale: torch.Tensor, shape: Sequence[int] | None = None) -> None:
        if data.dtype not in FP8_DTYPES:
            raise ValueError(f"MXFP8 data must be float8_e4m3fn or float8_e5m2, got {data.dtype}")
        shape = tuple(int(s) for s in (shape if shape is not None else data.shape))
        experts = _expert_count(shape)
        padded = tuple(_round_up(s, MXFP8_BLOCK) for s in shape[-2:])
        if tuple(data.shape) != (*shape[:-2], *padded):
            want = (*shape[:-2], *padded)
            raise ValueError(f"MXFP8 data of a {shape} weight must have shape {want}, got {tuple(data.shape)}")
        tiles = tiled_scale_shape(padded[0], padded[1] // MXFP8_BLOCK)
        _check_scale_size(scale, experts, tiles, (torch.uint8, torch.float8_e8m0fnu), "MXFP8 block scales")
        self.data = data
        self.scale = scale.view(torch.uint8)
        self.shape = shape

    @property
    def kind(self) -> str:
        return "mxfp8"

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"data": self.data, "scale": self.scale}

    def with_tensors(self, tensors: Mapping[str, torch.Tensor]) -> MXFP8Weight:
        return MXFP8Weight(tensors["data"], tensors["scale"], self.shape)

    def expert(self, index: int) -> MXFP8Weight:
        return MXFP8Weight(self.data[index], self.scale[index], self.shape[1:])

    def _decode(self, dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
        return dequantize_mxfp8(self.data, self.scale, self.shape, dtype, out)


class NVFP4Weight(_MatrixWeight):
    """NVFP4: packed codes ``data`` (uint8, padded to 16), tiled fp8 ``block_scale``, fp32 ``scale``
    (0-d, or ``[E]`` for a bank), logical ``shape``."""

    def __init__(
        self,
        data: torch.Tensor,
        block_scale: torch.Tensor,
        scale: torch.Tensor,
        shape: Sequence[int] | None = None,
    ) -> None:
        if data.dtype != torch.uint8:
            raise ValueError(f"NVFP4 data must be uint8 (two codes per byte), got {data.dtype}")
        if shape is None:
            shape = (*data.shape[:-1], data.shape[-1] * 2)
        shape = tuple(int(s) for s in shape)
        experts = _expert_count(shape)
        rows, cols = (_round_up(s, NVFP4_BLOCK) for s in shape[-2:])
        want = (*shape[:-2], rows, cols // 2)
        if tuple(data.shape) != want:
            raise ValueError(f"NVFP4 data of a {shape} weight must have shape {want}, got {tuple(data.shape)}")
        tiles = tiled_scale_shape(rows, cols // NVFP4_BLOCK)
        _check_scale_size(block_scale, experts, tiles, (torch.float8_e4m3fn, torch.uint8), "NVFP4 block scales")
        self.data = data
        self.block_scale = block_scale.view(torch.float8_e4m3fn)
        self.scale = _per_matrix_scale(scale, experts, "an NVFP4 tensor scale")
        self.shape = shape

    @property
    def kind(self) -> str:
        return "nvfp4"

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"data": self.data, "block_scale": self.block_scale, "scale": self.scale}

    def with_tensors(self, tensors: Mapping[str, torch.Tensor]) -> NVFP4Weight:
        return NVFP4Weight(tensors["data"], tensors["block_scale"], tensors["scale"], self.shape)

    def expert(self, index: int) -> NVFP4Weight:
        return NVFP4Weight(
            self.data[index], self.block_scale[index], _scale_of(self.scale, index), self.shape[1:]
        )

    def _decode(self, dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
        return dequantize_nvfp4(self.data, self.block_scale, self.scale, self.shape, dtype, out)
