"""fp8 weights: torch's cast against the 256-entry lookup table, and decode + matmul against
``torch._scaled_mm``, measured in the same run.

1. Decode a 4096x1536 and a 4096x4096 fp8 weight (both fp8 formats, times a per-tensor scale) to
   fp32 and bf16 into a reused buffer, as a layer does at every call: torch's cast (``copy_`` into
   fp32, scale, round) against a gather from the 256 possible results.  Both must agree bit for bit;
   :func:`quant.fp_formats._uses_table` picks the table only where it wins (e4m3fn on the CPU).
2. One ``Linear`` forward ``[rows x 1536] @ fp8 [4096 x 1536]^T`` in bf16: decode + ``F.linear``
   against :func:`quant.fp_formats.fp8_linear` (``torch._scaled_mm``).  On the CPU, where the layers
   never take it, ``_scaled_mm`` is torch's reference loop: a single call takes minutes, so it is
   timed once (``--scaled-mm-repeats``).

    python benchmarks/bench_fp8.py [--threads 2] [--repeats 9] [--rows 256] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dequant import best_of, wait_until_idle  # noqa: E402

from quant import fp_formats  # noqa: E402
from quant.fp_formats import Fp8Weight, fp8_linear, quantize_fp8  # noqa: E402

SHAPES = ((4096, 1536), (4096, 4096))


def cast_decode(data: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The baseline: torch's fp8 cast into fp32, the scale, one rounding into ``out``."""
    fp32 = out.dtype == torch.float32
    w = out.view(data.shape) if fp32 else torch.empty(data.shape, dtype=torch.float32, device=data.device)
    w.copy_(data).mul_(scale)
    return w if fp32 else out.view(data.shape).copy_(w)


def table_decode(data: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The lookup table, whatever :func:`fp_formats._uses_table` would choose."""
    table = (fp_formats._code_table(data.dtype, data.device) * scale).to(out.dtype)
    return fp_formats._gather(table, data, out).view(data.shape)


def bench_decode(device: torch.device, repeats: int, wait_idle: float) -> None:
    print(f"\nfp8 decode into a reused buffer on {device} (best of {repeats}; M values/s = MB/s of fp8 read)")
    print(f"{'shape':>10} {'format':>14} {'out':>9} {'cast Mv/s':>10} {'table Mv/s':>11} {'table/cast':>11} {'used':>6}")
    g = torch.Generator().manual_seed(0)
    for rows, cols in SHAPES:
        codes = torch.randint(0, 256, (rows, cols), dtype=torch.uint8, generator=g).to(device)
        for fp8 in fp_formats.FP8_DTYPES:
            data, scale = codes.view(fp8), torch.tensor(0.0123, device=device)
            for dtype in (torch.float32, torch.bfloat16):
                out = torch.empty(rows * cols, dtype=dtype, device=device)
                a, b = cast_decode(data, scale, out).clone(), table_decode(data, scale, out)
                int_view = torch.int32 if dtype == torch.float32 else torch.int16
                if not torch.equal(a.view(int_view), b.view(int_view)):
                    raise SystemExit(f"table and cast disagree for {fp8} -> {dtype}")
                wait_until_idle(wait_idle)
                t_cast = best_of(partial(cast_decode, data, scale, out), repeats)
                t_table = best_of(partial(table_decode, data, scale, out), repeats)
                used = "table" if fp_formats._uses_table(data) else "cast"
                print(
                    f"{rows}x{cols:>5} {str(fp8).removeprefix('torch.'):>14} {str(dtype).removeprefix('torch.'):>9} "
                    f"{rows * cols / t_cast / 1e3:>10.0f} {rows * cols / t_table / 1e3:>11.0f} "
                    f"{t_cast / t_table:>10.2f}x {used:>6}"
                )


def bench_linear(device: torch.device, rows: int, repeats: int, mm_repeats: int) -> None:
    g = torch.Generator().manual_seed(1)
    data, scale = quantize_fp8(torch.randn(4096, 1536, generator=g) * 0.02)
    weight = Fp8Weight(data.to(device), scale.to(device))
    x = torch.randn(rows, 1536, generator=g).to(device, torch.bfloat16)
    bias = torch.randn(4096, generator=g).to(device, torch.bfloat16)
    buf = torch.empty(weight.numel(), dtype=torch.bfloat16, device=device)

    def decode_matmul() -> torch.Tensor:
        return F.linear(x, weight.dequantize(torch.bfloat16, out=buf), bias)

    # Declared supported so that the CPU's reference _scaled_mm can be timed; layers never do this.
    with mock.patch.object(fp_formats, "fp8_matmul_supported", lambda d: True):
        y = fp8_linear(x, weight.data, weight.scale, bias)
        assert y is not None
        ref = decode_matmul().float()
        err = float((y.float() - ref).norm() / ref.norm())
        t_mm = best_of(lambda: fp8_linear(x, weight.data, weight.scale, bias), mm_repeats, warmup=0)
    t_dec = best_of(decode_matmul, repeats)
    print(f"\nLinear [{rows} x 1536] @ fp8 e4m3fn [4096 x 1536]^T + bias, bf16, on {device}")
    print(f"  decode + F.linear  {t_dec:10.2f} ms (best of {repeats})")
    print(f"  fp8_linear         {t_mm:10.2f} ms (best of {mm_repeats}; _scaled_mm, input rounded to fp8)")
    print(f"  fp8_linear / decode + F.linear time: {t_mm / t_dec:.2f}x; relative difference {err:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--rows", type=int, default=256, help="activation rows of the Linear forward")
    parser.add_argument("--scaled-mm-repeats", type=int, default=None, help="default: 1 on CPU, --repeats elsewhere")
    parser.add_argument("--wait-idle", type=float, default=30.0, help="max seconds to wait for an idle CPU")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {args.threads} threads, device {device}")
    bench_decode(device, args.repeats, args.wait_idle if device.type == "cpu" else 0.0)
    mm_repeats = args.scaled_mm_repeats or (1 if device.type == "cpu" else args.repeats)
    bench_linear(device, args.rows, args.repeats, mm_repeats)


if __name__ == "__main__":
    main()
