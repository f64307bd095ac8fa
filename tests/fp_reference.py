"""Independent references for the fp8 / MXFP8 / NVFP4 tests.

* numpy decoders written from the format definitions (bit fields of E4M3, E5M2, E2M1, E8M0, and
  the cuBLAS tiled scale layout as an explicit index formula), in float64;
* :func:`decode_checkpoint`: a whole ComfyUI quantised state dict decoded with them;
* :func:`run_comfy_reference`: ComfyUI's own loaders and comfy_kitchen, run in ComfyUI's Python by
  ``tests/fixtures/comfy_quant_reference.py`` (the test is skipped, loudly, without a ComfyUI).
"""

from __future__ import annotations

import json
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from .comfy_server import comfyui_installs, comfyui_python

SCRIPT = Path(__file__).with_name("fixtures") / "comfy_quant_reference.py"


def _minifloat(codes: np.ndarray, exp_bits: int, man_bits: int, bias: int) -> np.ndarray:
    """IEEE-like decode without inf/NaN handling (callers exclude those codes)."""
    codes = codes.astype(np.int64)
    sign = np.where(codes >> (exp_bits + man_bits) & 1, -1.0, 1.0)
    exp = (codes >> man_bits) & ((1 << exp_bits) - 1)
    man = (codes & ((1 << man_bits) - 1)).astype(np.float64)
    normal = (1 + man / 2**man_bits) * np.exp2(exp - bias)
    subnormal = (man / 2**man_bits) * 2.0 ** (1 - bias)
    return sign * np.where(exp == 0, subnormal, normal)


def e4m3(codes: np.ndarray) -> np.ndarray:
    """float8_e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; 0x7F/0xFF are NaN."""
    return _minifloat(codes, 4, 3, 7)


def e5m2(codes: np.ndarray) -> np.ndarray:
    """float8_e5m2: 1 sign, 5 exponent (bias 15), 2 mantissa bits; exponent 31 is inf/NaN."""
    return _minifloat(codes, 5, 2, 15)


def e2m1(codes: np.ndarray) -> np.ndarray:
    """FP4 E2M1: 1 sign, 2 exponent (bias 1), 1 mantissa bit: 0, .5, 1, 1.5, 2, 3, 4, 6."""
    return _minifloat(codes, 2, 1, 1)


def e8m0(codes: np.ndarray) -> np.ndarray:
    """E8M0 scale byte: 2 ** (byte - 127)."""
    return np.exp2(codes.astype(np.float64) - 127)


def tiled_offsets(rows: int, cols: int) -> np.ndarray:
    """Offset of scale (r, c) in the cuBLAS tiled layout: 128 x 4 tiles in row-major tile order;
    inside a tile, row 32a + b and column c sit at 16b + 4a + c."""
    col_tiles = -(-cols // 4)
    r = np.arange(rows)[:, None]
    c = np.arange(cols)[None, :]
    tile = (r // 128) * col_tiles + c // 4
    return tile * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4


def _bytes(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.uint8).numpy()


def decode_mxfp8(data: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """``[R, C]`` fp8 values times their block's E8M0 scale (padded size)."""
    values = e4m3(_bytes(data)) if data.dtype == torch.float8_e4m3fn else e5m2(_bytes(data))
    rows, cols = values.shape
    block = e8m0(_bytes(scales).reshape(-1)[tiled_offsets(rows, cols // 32)])
    return values * np.repeat(block, 32, axis=1)


def decode_nvfp4(data: torch.Tensor, block_scales: torch.Tensor, tensor_scale: torch.Tensor) -> np.ndarray:
    """``[R, 2 * C]``: E2M1 codes (first value in the high nibble) * fp8 block scale * tensor scale."""
    packed = _bytes(data)
    codes = np.stack((packed >> 4, packed & 0x0F), axis=-1).reshape(packed.shape[0], -1)
    rows, cols = codes.shape
    block = e4m3(_bytes(block_scales).reshape(-1)[tiled_offsets(rows, cols // 16)])
    return e2m1(codes) * np.repeat(block, 16, axis=1) * float(tensor_scale.reshape(()))


def _decode_matrix(fmt: str, part: dict[str, torch.Tensor]) -> np.ndarray:
    if fmt == "mxfp8":
        return decode_mxfp8(part["weight"], part["weight_scale"])
    if fmt == "nvfp4":
        return decode_nvfp4(part["weight"], part["weight_scale"], part["weight_scale_2"])
    w = part["weight"]
    values = e4m3(_bytes(w)) if w.dtype == torch.float8_e4m3fn else e5m2(_bytes(w))
    scale = part.get("weight_scale", part.get("scale_weight"))
    return values * (1.0 if scale is None else float(scale.double().reshape(())))


def decode_checkpoint(state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """A ComfyUI quantised state dict as fp32 tensors (packed weights decoded in float64, rounded
    once), aux tensors dropped.  Formats from ``comfy_quant`` tensors, ``_quantization_metadata``,
    ``scale_weight`` (with the ``scaled_fp8`` marker) or an fp8 dtype."""
    formats = dict(json.loads((metadata or {}).get("_quantization_metadata", '{"layers": {}}'))["layers"])
    for k, v in state.items():
        if k.endswith(".comfy_quant"):
            formats[k[: -len(".comfy_quant")]] = json.loads(bytes(v.tolist()))
    aux = ("comfy_quant", "weight_scale", "weight_scale_2", "scale_weight", "input_scale", "scale_input")
    out = {}
    for k, v in state.items():
        if k.endswith(aux) or k.split(".")[-1] == "scaled_fp8":
            continue
        layer = k[: -len(".weight")]
        conf = formats.get(layer)
        if k.endswith(".weight") and (conf is not None or v.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)):
            part = {s: state[f"{layer}.{s}"] for s in ("weight", *aux[1:]) if f"{layer}.{s}" in state}
            fmt = conf["format"] if conf else "fp8"
            if v.dim() == 3:  # expert bank: every tensor with a leading E axis is per expert
                experts = v.shape[0]
                dense = np.stack([
                    _decode_matrix(fmt, {s: t[e] if t.dim() and t.shape[0] == experts else t for s, t in part.items()})
                    for e in range(experts)
                ])
            else:
                dense = _decode_matrix(fmt, part)
            out[k] = torch.from_numpy(dense).float()
        else:
            out[k] = v.float() if v.is_floating_point() else v
    return out


def run_comfy_reference(tmp_path: Path, *args: str | Path) -> None:
    """Run the ComfyUI reference script (``dequantize IN OUT`` or ``quantize IN OUT FORMAT``) in
    ComfyUI's Python; skips (with a warning) when no ComfyUI with comfy_kitchen is installed."""
    installs = comfyui_installs()
    if not installs:
        _loud_skip("no ComfyUI checkout (set COMFYUI_PATH, or put one at ~/ComfyUI)")
    root = installs[0]
    result = subprocess.run(
        [comfyui_python(root), str(SCRIPT), str(root), *map(str, args)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    if result.returncode == 3 or "No module named" in result.stderr:
        _loud_skip(f"{root} cannot run the reference: {result.stderr.strip().splitlines()[-1:]}")
    assert result.returncode == 0, result.stderr[-3000:]


def _loud_skip(reason: str) -> None:
    warnings.warn(f"ComfyUI quantisation reference SKIPPED: {reason}", stacklevel=3)
    pytest.skip(f"ComfyUI quantisation reference SKIPPED: {reason}")
