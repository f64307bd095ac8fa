"""Vectorised torch quantisers for the ggml block formats, including the K-quants.

``gguf`` (the PyPI package) can write Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 in numpy but no K-quant, which is
what diffusion GGUFs mostly use; so every format is implemented here, in torch, over whole tensors
(no Python loop over blocks):

* Q8_0, Q4_0, Q4_1, Q5_0, Q5_1: the ggml reference rounding, bit-exact with
  ``gguf.quants.quantize`` (same fp32 operations in the same order);
* Q2_K, Q3_K, Q4_K, Q5_K, Q6_K: the algorithms of ggml's reference quantisers (without an
  importance matrix): a weighted least-squares search over candidate scales per sub-block
  (``make_qkx2``: affine K-quants; ``make_qx``: symmetric Q6_K; coordinate descent for Q3_K), 6/4-bit
  quantisation of the sub-block scales against one fp16 super-block scale, then re-rounding every
  value against the scale it will actually be decoded with.  Sums run in torch's (pairwise)
  order, so the bytes can differ from llama.cpp's in the last bit of a tie; the format is the same
  and ggml/gguf decode them identically.

:func:`quantize` returns the raw bytes; :func:`quantize_with_values` also returns the values the
bytes decode to, computed with the decoder's own fp32 operations, so tests can check a round trip
through any decoder bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .ggml_types import QK_K, TYPE_SIZES, GGMLType, type_name

__all__ = [
    "QUANTIZERS",
    "quantizable_types",
    "quantize",
    "quantize_with_values",
    "quantize_blocks",
]

_GROUP_MAX_EPS = 1e-15
_CHUNK_VALUES = {"cpu": 1 << 18}  # CPU: temporaries stay in cache
_DEFAULT_CHUNK_VALUES = 1 << 24  # accelerators: few, large launches

Quantizer = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""fp32 ``[n_blocks, values_per_block]`` -> (uint8 ``[n_blocks, bytes_per_block]``, decoded fp32 values)."""


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _f16_bytes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``[n, 1]`` -> (little-endian fp16 bytes ``[n, 2]``, the rounded value back in fp32)."""
    h = x.to(torch.float16)
    return h.contiguous().view(torch.uint8).view(-1, 2), h.to(torch.float32)


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C ``roundf`` (half away from zero), computed like ``gguf.quants.np_roundf``."""
    a = x.abs()
    f = a.floor()
    return torch.sign(x) * (f + (2 * (a - f)).floor())


def _nearest(x: torch.Tensor) -> torch.Tensor:
    """ggml's ``nearest_int``: round half to even (the FPU's mode), as a float (never -0.0, which
    an integer code cannot be)."""
    return torch.round(x).add_(0.0)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """``0 if d == 0 else 1 / d``."""
    return torch.where(d == 0, torch.zeros_like(d), 1 / torch.where(d == 0, torch.ones_like(d), d))


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``[n, 2, m]`` -> bytes ``[n, m]``: the first m codes in the low nibbles."""
    return (q[:, 0] & 0x0F) | (q[:, 1] << 4)


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """uint8 0/1 ``[n, 8k]`` -> ``[n, k]`` little-endian (bit j of byte i = element 8i + j)."""
    b = bits.view(bits.shape[0], -1, 8).to(torch.uint8)
    out = b[..., 0].clone()
    for j in range(1, 8):
        out |= b[..., j] << j
    return out


def _signed_max(x: torch.Tensor) -> torch.Tensor:
    """The element of largest magnitude along the last axis (the first one on ties), keepdim."""
    idx = x.abs().argmax(dim=-1, keepdim=True)
    return x.gather(-1, idx)


# ---------------------------------------------------------------------------------------------
# Legacy 32-value formats (bit-exact with gguf.quants)
# ---------------------------------------------------------------------------------------------


def _q8_0(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = x.abs().amax(dim=1, keepdim=True) / 127
    q = _roundf(x * _inverse(d)).to(torch.int8)
    d_bytes, d16 = _f16_bytes(d)
    return torch.cat((d_bytes, q.view(torch.uint8)), dim=1), q.to(torch.float32) * d16


def _q4_0(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = _signed_max(x) / -8
    q = torch.trunc(x * _inverse(d) + 8.5).clamp_(0, 15).to(torch.uint8)
    d_bytes, d16 = _f16_bytes(d)
    packed = _pack_nibbles(q.view(-1, 2, 16))
    values = d16 * (q.to(torch.int8) - 8).to(torch.float32)
    return torch.cat((d_bytes, packed), dim=1), values


def _q4_1(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mx = x.amax(dim=1, keepdim=True)
    mn = x.amin(dim=1, keepdim=True)
    d = (mx - mn) / 15
    q = torch.trunc((x - mn) * _inverse(d) + 0.5).clamp_(0, 15).to(torch.uint8)
    d_bytes, d16 = _f16_bytes(d)
    m_bytes, m16 = _f16_bytes(mn)
    values = d16 * q.to(torch.float32) + m16
    return torch.cat((d_bytes, m_bytes, _pack_nibbles(q.view(-1, 2, 16))), dim=1), values


def _q5_0(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = _signed_max(x) / -16
    q = torch.trunc(x * _inverse(d) + 16.5).clamp_(0, 31).to(torch.uint8)
    d_bytes, d16 = _f16_bytes(d)
    qh = _pack_bits(q >> 4)
    values = d16 * (q.to(torch.int8) - 16).to(torch.float32)
    return torch.cat((d_bytes, qh, _pack_nibbles(q.view(-1, 2, 16))), dim=1), values


def _q5_1(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mx = x.amax(dim=1, keepdim=True)
    mn = x.amin(dim=1, keepdim=True)
    d = (mx - mn) / 31
    q = torch.trunc((x - mn) * _inverse(d) + 0.5).clamp_(0, 31).to(torch.uint8)
    d_bytes, d16 = _f16_bytes(d)
    m_bytes, m16 = _f16_bytes(mn)
    values = d16 * q.to(torch.float32) + m16
    return torch.cat((d_bytes, m_bytes, _pack_bits(q >> 4), _pack_nibbles(q.view(-1, 2, 16))), dim=1), values


# ---------------------------------------------------------------------------------------------
# K-quant building blocks
# ---------------------------------------------------------------------------------------------


def _make_qkx2(
    x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine fit ``x ~ scale * L - min`` with ``L`` in ``0..nmax`` per row of ``x`` ``[..., n]``.

    Weighted least squares over ``nstep + 1`` candidate rounding grids (ggml's ``make_qkx2_quants``).
    Returns ``(scale, min)`` with ``min >= 0`` (the value subtracted).
    """
    mn = x.amin(dim=-1).clamp(max=0)
    mx = x.amax(dim=-1)
    sum_w = w.sum(-1)
    sum_x = (w * x).sum(-1)
    rng = mx - mn
    flat = rng == 0
    rng = torch.where(flat, torch.ones_like(rng), rng)
    shifted = x - mn[..., None]

    def err(scale: torch.Tensor, offset: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        diff = scale[..., None] * q + offset[..., None] - x
        return (w * (diff.abs() if use_mad else diff * diff)).sum(-1)

    iscale = nmax / rng
    scale = 1 / iscale
    q = _nearest(iscale[..., None] * shifted).clamp_(0, nmax)
    best = err(scale, mn, q)
    best_min = mn
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * step + nmax) / rng
        q = _nearest(iscale[..., None] * shifted).clamp_(0, nmax)
        sum_l = (w * q).sum(-1)
        sum_l2 = (w * q * q).sum(-1)
        sum_xl = (w * q * x).sum(-1)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        safe = torch.where(ok, det, torch.ones_like(det))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe
        positive = this_min > 0
        l2 = torch.where(sum_l2 > 0, sum_l2, torch.ones_like(sum_l2))
        this_scale = torch.where(positive, sum_xl / l2, this_scale)
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        mad = err(this_scale, this_min, q)
        better = ok & (mad < best)
        best = torch.where(better, mad, best)
        scale = torch.where(better, this_scale, scale)
        best_min = torch.where(better, this_min, best_min)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return scale, -best_min


def _make_qx(x: torch.Tensor, nmax: int) -> torch.Tensor:
    """Symmetric fit ``x ~ scale * L``, ``L`` in ``-nmax..nmax-1``, weights ``x**2`` (ggml's
    ``make_qx_quants`` with rmse_type 1); returns the scale per row of ``x`` ``[..., n]``."""
    mx = _signed_max(x).squeeze(-1)
    small = mx.abs() < _GROUP_MAX_EPS
    mx = torch.where(small, torch.ones_like(mx), mx)
    w = x * x

    def sums(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = _nearest(iscale[..., None] * x).clamp_(-nmax, nmax - 1)
        return (w * x * q).sum(-1), (w * q * q).sum(-1)

    sumlx, suml2 = sums(-nmax / mx)
    scale = torch.where(
        suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2)), torch.zeros_like(sumlx)
    )
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        sumlx, suml2 = sums(-(nmax + 0.1 * step) / mx)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        this = sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2))
        scale = torch.where(better, this, scale)
        best = torch.where(better, this * sumlx, best)
    return torch.where(small, torch.zeros_like(scale), scale)


def _make_q3(x: torch.Tensor, nmax: int = 4, tries: int = 5) -> torch.Tensor:
    """Symmetric fit for Q3_K (``L`` in ``-nmax..nmax-1``, weights ``x**2``) refined by coordinate
    descent (ggml's ``make_q3_quants`` with rmse); returns the scale per row of ``x`` ``[..., n]``."""
    mx = _signed_max(x).squeeze(-1)
    small = mx.abs() < _GROUP_MAX_EPS
    mx = torch.where(small, torch.ones_like(mx), mx)
    q = _nearest((-nmax / mx)[..., None] * x).clamp_(-nmax, nmax - 1)
    w = x * x
    sumlx = (w * x * q).sum(-1)
    suml2 = (w * q * q).sum(-1)
    for _ in range(tries):
        changed = torch.zeros((), dtype=torch.bool, device=x.device)
        for i in range(x.shape[-1]):
            wi, xi, li = w[..., i], x[..., i], q[..., i]
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            ok = slx > 0
            new = _nearest(xi * sl2 / torch.where(ok, slx, torch.ones_like(slx))).clamp_(-nmax, nmax - 1)
            slx_new = slx + wi * xi * new
            sl2_new = sl2 + wi * new * new
            accept = ok & (new != li) & (sl2_new > 0) & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new)
            q[..., i] = torch.where(accept, new, li)
            sumlx = torch.where(accept, slx_new, sumlx)
            suml2 = torch.where(accept, sl2_new, suml2)
            changed |= accept.any()
        if not bool(changed):
            break
    scale = sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2))
    return torch.where(small | (suml2 <= 0), torch.zeros_like(scale), scale)


def _pack_k_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and mins ``[n, 8]`` -> the 12-byte Q4_K/Q5_K packing."""
    ls = ls.to(torch.uint8)
    lm = lm.to(torch.uint8)
    b0 = (ls[:, :4] & 0x3F) | ((ls[:, 4:] >> 4) << 6)
    b1 = (lm[:, :4] & 0x3F) | ((lm[:, 4:] >> 4) << 6)
    b2 = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    return torch.cat((b0, b1, b2), dim=1)


def _affine_k(x: torch.Tensor, nmax: int, rmin: float, nstep: int) -> tuple[torch.Tensor, ...]:
    """Shared part of Q4_K/Q5_K: x ``[n, 256]`` -> (d bytes, dmin bytes, 12 scale bytes, codes [n, 8, 32], values)."""
    xs = x.view(-1, 8, 32)
    av = ((xs * xs).sum(-1, keepdim=True) / 32).sqrt()
    scales, mins = _make_qkx2(xs, av + xs.abs(), nmax, rmin, 0.1, nstep, use_mad=False)  # [n, 8]
    max_scale = scales.amax(-1, keepdim=True)
    max_min = mins.amax(-1, keepdim=True)
    ls = _nearest(_inverse_scaled(63.0, max_scale) * scales).clamp_(0, 63)
    lm = _nearest(_inverse_scaled(63.0, max_min) * mins).clamp_(0, 63)
    d_bytes, d16 = _f16_bytes(max_scale / 63)
    m_bytes, m16 = _f16_bytes(max_min / 63)
    dl = d16 * ls  # [n, 8], exactly as the decoder forms them
    ml = m16 * lm
    safe = torch.where(dl == 0, torch.ones_like(dl), dl)
    q = _nearest((xs + ml[..., None]) / safe[..., None]).clamp_(0, nmax)
    q = torch.where((dl == 0)[..., None], torch.zeros_like(q), q)
    values = (q * dl[..., None] - ml[..., None]).view(-1, QK_K)
    return d_bytes, m_bytes, _pack_k_scales(ls, lm), q.to(torch.uint8), values


def _inverse_scaled(top: float, m: torch.Tensor) -> torch.Tensor:
    """``top / m`` where ``m > 0``, else 0."""
    return torch.where(m > 0, top / torch.where(m > 0, m, torch.ones_like(m)), torch.zeros_like(m))


# ---------------------------------------------------------------------------------------------
# K-quants
# ---------------------------------------------------------------------------------------------


def _q4_k(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """d, dmin, 12 scale bytes, 128 bytes: byte 32g + l = code 64g + l | code 64g + 32 + l << 4."""
    d, dmin, scales, q, values = _affine_k(x, 15, -1.0, 20)
    qs = _pack_nibbles(q.view(-1, 2, 32)).view(-1, 128)  # rows: pairs of sub-blocks (2g, 2g + 1)
    return torch.cat((d, dmin, scales, qs), dim=1), values


def _q5_k(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K layout plus qh (32 bytes after the scales): bit k of qh[j] = bit 4 of code 32k + j."""
    d, dmin, scales, q, values = _affine_k(x, 31, -0.5, 15)
    high = (q >> 4).view(-1, 8, 32)  # [n, k, j]
    qh = high[:, 0].clone()
    for k in range(1, 8):
        qh |= high[:, k] << k
    qs = _pack_nibbles((q & 0x0F).view(-1, 2, 32)).view(-1, 128)
    return torch.cat((d, dmin, scales, qh, qs), dim=1), values


def _q6_k(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ql (128), qh (64), 16 int8 scales, d: see :func:`quant.dequant._q6_k` for the bit layout."""
    xs = x.view(-1, 16, 16)
    scales = _make_qx(xs, 32)  # [n, 16]
    max_scale = _signed_max(scales)  # [n, 1]
    zero = max_scale.abs() < _GROUP_MAX_EPS
    iscale = torch.where(
        zero, torch.zeros_like(max_scale), -128 / torch.where(zero, torch.ones_like(max_scale), max_scale)
    )
    sc = _nearest(iscale * scales).clamp_(-128, 127)
    d_bytes, d16 = _f16_bytes(
        torch.where(zero, torch.zeros_like(iscale), 1 / torch.where(zero, torch.ones_like(iscale), iscale))
    )
    dl = d16 * sc  # [n, 16]
    safe = torch.where(dl == 0, torch.ones_like(dl), dl)
    q = _nearest(xs / safe[..., None]).clamp_(-32, 31)
    q = torch.where((dl == 0)[..., None], torch.zeros_like(q), q)
    values = (q * dl[..., None]).view(-1, QK_K)
    codes = (q + 32).to(torch.uint8).view(-1, 2, 4, 32)  # [n, half, quarter, l]
    low = codes & 0x0F
    ql = torch.cat(
        (low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)), dim=2
    )  # [n, 2, 64]
    hi = codes >> 4
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)  # [n, 2, 32]
    sc_bytes = sc.to(torch.int8).view(torch.uint8)
    return torch.cat((ql.reshape(-1, 128), qh.reshape(-1, 64), sc_bytes, d_bytes), dim=1), values


def _q3_k(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hmask (32), qs (64), 12 scale bytes, d: see :func:`quant.dequant._q3_k`."""
    xs = x.view(-1, 16, 16)
    scales = _make_q3(xs)  # [n, 16]
    max_scale = _signed_max(scales)
    zero = max_scale == 0
    iscale = torch.where(
        zero, torch.zeros_like(max_scale), -32 / torch.where(zero, torch.ones_like(max_scale), max_scale)
    )
    ls = _nearest(iscale * scales).clamp_(-32, 31) + 32  # [n, 16] in 0..63
    ls = torch.where(zero, torch.full_like(ls, 32), ls)
    d_bytes, d16 = _f16_bytes(
        torch.where(zero, torch.zeros_like(iscale), 1 / torch.where(zero, torch.ones_like(iscale), iscale))
    )
    dl = d16 * (ls - 32)
    safe = torch.where(dl == 0, torch.ones_like(dl), dl)
    q = _nearest(xs / safe[..., None]).clamp_(-4, 3)
    q = torch.where((dl == 0)[..., None], torch.zeros_like(q), q)
    values = (q * dl[..., None]).view(-1, QK_K)
    codes = (q + 4).to(torch.uint8).view(-1, QK_K)
    hmask = _pack_bits_fieldwise(codes >> 2)  # [n, 32]
    low = (codes & 3).view(-1, 2, 4, 32)
    qs = low[:, :, 0] | (low[:, :, 1] << 2) | (low[:, :, 2] << 4) | (low[:, :, 3] << 6)  # [n, 2, 32]
    lsb = ls.to(torch.uint8)
    s_low = (lsb[:, :8] & 0x0F) | ((lsb[:, 8:] & 0x0F) << 4)  # [n, 8]
    hi2 = (lsb >> 4).view(-1, 4, 4)  # [n, j // 4, j % 4]
    s_high = hi2[:, 0] | (hi2[:, 1] << 2) | (hi2[:, 2] << 4) | (hi2[:, 3] << 6)  # [n, 4]
    return torch.cat((hmask, qs.reshape(-1, 64), s_low, s_high, d_bytes), dim=1), values


def _pack_bits_fieldwise(bits: torch.Tensor) -> torch.Tensor:
    """0/1 ``[n, 256]`` -> ``[n, 32]``: bit k of byte j is element 32k + j."""
    b = bits.view(-1, 8, 32)
    out = b[:, 0].clone()
    for k in range(1, 8):
        out |= b[:, k] << k
    return out


def _q2_k(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """16 scale bytes (scale | min << 4), 64 bytes of 2-bit codes, d, dmin."""
    xs = x.view(-1, 16, 16)
    scales, mins = _make_qkx2(xs, xs.abs(), 3, -0.5, 0.1, 15, use_mad=True)  # [n, 16]
    max_scale = scales.amax(-1, keepdim=True)
    max_min = mins.amax(-1, keepdim=True)
    ls = _nearest(_inverse_scaled(15.0, max_scale) * scales).clamp_(0, 15)
    lm = _nearest(_inverse_scaled(15.0, max_min) * mins).clamp_(0, 15)
    d_bytes, d16 = _f16_bytes(torch.where(max_scale > 0, max_scale / 15, torch.zeros_like(max_scale)))
    m_bytes, m16 = _f16_bytes(torch.where(max_min > 0, max_min / 15, torch.zeros_like(max_min)))
    dl = d16 * ls
    ml = m16 * lm
    safe = torch.where(dl == 0, torch.ones_like(dl), dl)
    q = _nearest((xs + ml[..., None]) / safe[..., None]).clamp_(0, 3)
    q = torch.where((dl == 0)[..., None], torch.zeros_like(q), q)
    values = (q * dl[..., None] - ml[..., None]).view(-1, QK_K)
    codes = q.to(torch.uint8).view(-1, 2, 4, 32)
    qs = codes[:, :, 0] | (codes[:, :, 1] << 2) | (codes[:, :, 2] << 4) | (codes[:, :, 3] << 6)
    sc = ls.to(torch.uint8) | (lm.to(torch.uint8) << 4)
    return torch.cat((sc, qs.reshape(-1, 64), d_bytes, m_bytes), dim=1), values


# ---------------------------------------------------------------------------------------------
# Float "formats"
# ---------------------------------------------------------------------------------------------


def _float_quantizer(dtype: torch.dtype) -> Quantizer:
    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = x.to(dtype)
        return y.contiguous().view(torch.uint8).view(x.shape[0], -1), y.to(torch.float32)

    return run


QUANTIZERS: dict[GGMLType, Quantizer] = {
    GGMLType.F32: _float_quantizer(torch.float32),
    GGMLType.F16: _float_quantizer(torch.float16),
    GGMLType.BF16: _float_quantizer(torch.bfloat16),
    GGMLType.Q8_0: _q8_0,
    GGMLType.Q4_0: _q4_0,
    GGMLType.Q4_1: _q4_1,
    GGMLType.Q5_0: _q5_0,
    GGMLType.Q5_1: _q5_1,
    GGMLType.Q2_K: _q2_k,
    GGMLType.Q3_K: _q3_k,
    GGMLType.Q4_K: _q4_k,
    GGMLType.Q5_K: _q5_k,
    GGMLType.Q6_K: _q6_k,
}
"""ggml type -> block quantiser (fp32 ``[n, values_per_block]`` -> bytes, decoded values)."""


def quantizable_types() -> list[str]:
    return [t.name for t in QUANTIZERS]


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------


def quantize_blocks(blocks: torch.Tensor, ggml_type: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise fp32 ``[n_blocks, values_per_block]``; returns (bytes, decoded values)."""
    gtype = GGMLType(int(ggml_type))
    fn = QUANTIZERS.get(gtype)
    if fn is None:
        raise NotImplementedError(f"no quantiser for ggml type {type_name(gtype)}")
    return fn(blocks.to(torch.float32).contiguous())


def _run(x: torch.Tensor, ggml_type: int, want_values: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    gtype = GGMLType(int(ggml_type))
    fn = QUANTIZERS.get(gtype)
    if fn is None:
        raise NotImplementedError(
            f"no quantiser for ggml type {type_name(gtype)} (available: {', '.join(quantizable_types())})"
        )
    if not x.is_floating_point():
        raise TypeError(f"can only quantise floating tensors, got {x.dtype}")
    block_values, block_bytes = TYPE_SIZES[gtype]
    shape = tuple(x.shape)
    if not shape or shape[-1] % block_values:
        raise ValueError(
            f"{gtype.name} needs rows that are a multiple of {block_values} values, got shape {shape}"
        )
    flat = x.reshape(-1)
    n_blocks = flat.numel() // block_values
    out = torch.empty(n_blocks * block_bytes, dtype=torch.uint8, device=x.device)
    values = torch.empty(flat.numel(), dtype=torch.float32, device=x.device) if want_values else None
    step = max(1, _CHUNK_VALUES.get(x.device.type, _DEFAULT_CHUNK_VALUES) // block_values)
    out_blocks = out.view(n_blocks, block_bytes)
    blocks = flat.view(n_blocks, block_values)
    for start in range(0, n_blocks, step):
        chunk = blocks[start : start + step].to(torch.float32)
        if not bool(torch.isfinite(chunk).all()):
            raise ValueError("cannot quantise a tensor holding inf or NaN")
        b, v = fn(chunk)
        out_blocks[start : start + step] = b
        if values is not None:
            values.view(n_blocks, block_values)[start : start + step] = v
    return out, (values.view(shape) if values is not None else None)


def quantize(x: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """Quantise ``x`` (any float dtype, rows along the last axis) to ``ggml_type``.

    Returns the raw bytes as 1-D uint8, in ggml order (what a GGUF file stores and
    :func:`quant.dequant.dequantize` reads), on ``x``'s device (CPU or CUDA).  Processed in chunks
    (~256k values on the CPU, 16M on accelerators), so temporaries stay small whatever the tensor size.
    """
    return _run(x, ggml_type, want_values=False)[0]


def quantize_with_values(x: torch.Tensor, ggml_type: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`quantize`, also returning the fp32 values the bytes decode to (same shape as ``x``),
    computed with the decoder's own fp32 operations."""
    raw, values = _run(x, ggml_type, want_values=True)
    assert values is not None
    return raw, values


def to_numpy_bytes(raw: torch.Tensor, shape: tuple[int, ...], ggml_type: int) -> np.ndarray:
    """Raw bytes -> the ``(*shape[:-1], bytes_per_row)`` uint8 array ``gguf.GGUFWriter`` takes."""
    block_values, block_bytes = TYPE_SIZES[GGMLType(int(ggml_type))]
    return raw.cpu().numpy().reshape(*shape[:-1], shape[-1] // block_values * block_bytes)
