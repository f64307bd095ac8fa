"""CPU benchmark of ``quant``: torch dequantisation and GGUF open time, against the ``gguf`` package.

1. Dequantise a 4096x4096 weight of every supported ggml type to bf16 with our torch kernels and
   with ``gguf.quants.dequantize`` (numpy, fp32, then cast to bf16 by torch), in the same run,
   and check the two agree bit for bit.  The last column decodes into a reused buffer (``out=``),
   as a layer dequantising on every forward pass would.
2. Open a GGUF file whose metadata holds a 201,088-entry string array (the size of the
   o200k_harmony vocabulary in a gpt-oss GGUF) and read a few values, with ``GGUFFile`` and with
   ``gguf.GGUFReader``.

The data is random (random blocks with sane scales; see ``quant.synthetic``): speed does not
depend on the values and no weights can be downloaded here.

    python benchmarks/bench_dequant.py [--threads 2] [--repeats 7] [--types Q4_0 Q6_K ...] [--wait-idle 60]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import torch

from quant import BLOCK_INFO, GGMLType, GGUFFile, dequantize
from quant.synthetic import random_blocks

VOCAB_SIZE = 201_088


def best_of(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Fastest wall time in ms: on a shared machine the minimum is the least noisy estimate."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def cpu_idle_fraction(seconds: float = 1.0) -> float:
    """Share of CPU time spent idle over ``seconds`` (Linux /proc/stat; 1.0 elsewhere)."""

    def snapshot() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        return ticks[3] + ticks[4], sum(ticks)

    try:
        idle0, total0 = snapshot()
        time.sleep(seconds)
        idle1, total1 = snapshot()
    except OSError:
        return 1.0
    return (idle1 - idle0) / max(1, total1 - total0)


def wait_until_idle(max_wait: float, threshold: float = 0.9) -> None:
    """On a machine shared with other jobs, 2-thread torch timings swing by up to 10x (OpenMP
    threads stall at every op's barrier while descheduled); wait (bounded) for a quiet moment."""
    deadline = time.monotonic() + max_wait
    while time.monotonic() < deadline and cpu_idle_fraction() < threshold:
        pass


def bench_dequant(
    type_names: list[str], shape: tuple[int, int], repeats: int, numpy_repeats: int, wait_idle: float
) -> None:
    n_values = shape[0] * shape[1]
    print(
        f"\nDequantise a {shape[0]}x{shape[1]} weight to bf16 (best of {repeats} torch / {numpy_repeats} numpy)"
    )
    header = (
        f"| {'type':7} | {'bits/val':>8} | {'torch ms':>9} | {'Gval/s':>6} | {'numpy ms':>9} | "
        f"{'speedup':>7} | bit-exact | {'torch, out= ms':>14} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for name in type_names:
        gtype = GGMLType[name]
        block_values, block_bytes = BLOCK_INFO[gtype]
        raw_np = random_blocks(gtype, shape, seed=0)
        raw = torch.from_numpy(raw_np.reshape(-1))
        wait_until_idle(wait_idle)

        ours_ms = best_of(lambda: dequantize(raw, gtype, shape, torch.bfloat16), repeats)  # noqa: B023
        buffer = torch.empty(shape, dtype=torch.bfloat16)
        reused_ms = best_of(lambda: dequantize(raw, gtype, shape, out=buffer), repeats)  # noqa: B023

        def numpy_path() -> torch.Tensor:
            values = gguf.quants.dequantize(raw_np, gguf.GGMLQuantizationType(int(gtype)))  # noqa: B023
            return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(torch.bfloat16)

        numpy_ms = best_of(numpy_path, numpy_repeats, warmup=0)
        exact = torch.equal(
            dequantize(raw, gtype, shape, torch.bfloat16).view(torch.int16),
            numpy_path().view(shape).view(torch.int16),
        )
        print(
            f"| {name:7} | {8 * block_bytes / block_values:8.2f} | {ours_ms:9.1f} | "
            f"{n_values / ours_ms / 1e6:6.2f} | {numpy_ms:9.1f} | {numpy_ms / ours_ms:6.1f}x | "
            f"{'yes' if exact else 'NO':>9} | {reused_ms:14.1f} |",
            flush=True,
        )


def write_vocab_file(path: Path) -> list[str]:
    """A small GGUF with a gpt-oss-sized tokenizer in its metadata; returns the tokens."""
    rng = np.random.default_rng(0)
    alphabet = list("abcdefghijklmnopqrstuvwxyz ĠĊ日本語éü0123456789")
    lengths = rng.integers(1, 12, size=VOCAB_SIZE)
    picks = rng.integers(0, len(alphabet), size=int(lengths.sum()))
    tokens, pos = [], 0
    for i, n in enumerate(lengths.tolist()):
        tokens.append(f"{i}:" + "".join(alphabet[c] for c in picks[pos : pos + n]))
        pos += n
    writer = gguf.GGUFWriter(str(path), "gpt-oss")
    writer.add_string("general.name", "vocab benchmark")
    writer.add_uint32("gpt-oss.block_count", 24)
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_array("tokenizer.ggml.token_type", [1] * VOCAB_SIZE)
    writer.add_tensor("token_embd.weight", np.zeros((8, 64), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tokens


def bench_open(repeats: int, wait_idle: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vocab.gguf"
        tokens = write_vocab_file(path)
        size_mb = path.stat().st_size / 1e6

        def ours() -> None:
            with GGUFFile(path) as f:
                md = f.metadata
                vocab = md["tokenizer.ggml.tokens"]
                assert md["gpt-oss.block_count"] == 24 and len(vocab) == VOCAB_SIZE
                assert vocab[1000] == tokens[1000] and vocab[-1] == tokens[-1]
                assert int(md["tokenizer.ggml.token_type"].sum()) == VOCAB_SIZE

        def ours_all_tokens() -> None:
            with GGUFFile(path) as f:
                assert f.metadata["tokenizer.ggml.tokens"].tolist() == tokens

        def reference() -> None:
            reader = gguf.GGUFReader(path)
            field = reader.fields["tokenizer.ggml.tokens"]
            assert (
                int(reader.fields["gpt-oss.block_count"].contents()) == 24 and len(field.data) == VOCAB_SIZE
            )
            assert field.contents(1000) == tokens[1000] and field.contents(-1) == tokens[-1]
            assert int(np.sum(reader.fields["tokenizer.ggml.token_type"].contents())) == VOCAB_SIZE

        wait_until_idle(wait_idle)
        ours_ms = best_of(ours, repeats)
        all_ms = best_of(ours_all_tokens, max(1, repeats // 2))
        ref_ms = best_of(reference, 2, warmup=0)
        print(
            f"\nOpen a GGUF with a {VOCAB_SIZE:,}-entry string array ({size_mb:.1f} MB) and read a few values"
        )
        print("| reader                                   | ms      | vs GGUFReader |")
        print("|------------------------------------------|---------|---------------|")
        print(f"| quant.GGUFFile                           | {ours_ms:7.1f} | {ref_ms / ours_ms:12.0f}x |")
        print(
            f"| quant.GGUFFile + decode all {VOCAB_SIZE:,} tokens | {all_ms:7.1f} | {ref_ms / all_ms:12.1f}x |"
        )
        print(f"| gguf.GGUFReader                          | {ref_ms:7.1f} | {1:12.0f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--numpy-repeats", type=int, default=2)
    parser.add_argument("--types", nargs="*", default=[GGMLType(t).name for t in BLOCK_INFO])
    parser.add_argument("--size", type=int, default=4096, help="rows = columns of the benchmark weight")
    parser.add_argument("--skip-open", action="store_true")
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each row wait up to this long for the CPUs to be >90%% idle (shared machines)",
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), numpy {np.__version__}, "
        f"gguf {importlib.metadata.version('gguf')}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average {load:.2f}"
    )
    bench_dequant(args.types, (args.size, args.size), args.repeats, args.numpy_repeats, args.wait_idle)
    if not args.skip_open:
        bench_open(args.repeats, args.wait_idle)


if __name__ == "__main__":
    main()
