"""Our torch dequantisation against ComfyUI-GGUF's (the issue's anchor): same data, same run.

Issue 5 sets the bar: our kernels should be at least 1.5x faster than ComfyUI-GGUF's torch
dequantiser on the same machine, for every ggml type it supports.  Its code is not part of this
repository and never will be: ``--anchor`` names a checkout (a folder holding its ``dequant.py``,
or a bare git directory, from which ``HEAD:dequant.py`` is extracted to a temporary folder outside
the repository), and the module is imported at run time.

For every type both implement (read from the anchor's own ``dequantize_functions``), one weight of
random but valid blocks (:mod:`quant.synthetic`) is decoded to fp32 and to bf16:

* sanity: our fp32 results must be bit-identical to the anchor's fp32 setting, and our bf16 equal
  to them rounded once (its other settings compute in fp16/bf16: not the same values);
* speed: the anchor is called through its layers' entry point ``dequantize_tensor(t, dtype,
  dequant_dtype)`` with each of its settings (``None`` = compute in fp16, ``"target"``, fp32) and
  its fastest is the baseline, so a PASS does not depend on which setting a user picked (the
  ratio to its fp32 setting, which gives our values, is shown too).  The target is judged on
  fresh tensors on both sides.  The last columns time our decode into a reused buffer, which is
  how ``quant.layers`` calls it on every forward (the anchor's layers allocate a fresh weight
  each time), so they compare what a forward pays.  Calls of all candidates are interleaved
  round by round in a shuffled order and the median is reported, so load from other processes
  hits both sides alike.  On CPU the clock is the process's CPU time by default: on a machine busy with other
  jobs wall time measures the scheduler, not the code.

MB/s counts the ggml bytes decoded per second.  Exit status 1 if any type misses the target.

    python benchmarks/bench_gguf_anchor.py --anchor /path/to/ComfyUI-GGUF [--device cpu|cuda]
        [--threads N] [--shape 4096 1536] [--repeats 9] [--types Q4_K Q8_0 ...] [--target 1.5]
        [--clock cpu|wall]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quant import BLOCK_INFO, TYPE_SIZES, GGMLType, dequantize  # noqa: E402
from quant.synthetic import random_blocks  # noqa: E402

ANCHOR_SETTINGS: dict[str, object] = {"None": None, "target": "target", "fp32": torch.float32}
"""The anchor's ``dequant_dtype`` choices (its loader node offers these, plus fp16/bf16 = target here)."""


def anchor_source(path: Path, tmp: Path) -> Path:
    """The anchor's ``dequant.py``: in the folder, or extracted from a bare git directory into ``tmp``."""
    if (path / "dequant.py").is_file():
        return path / "dequant.py"
    if (path / "HEAD").is_file() and (path / "objects").is_dir():
        text = subprocess.run(
            ["git", f"--git-dir={path}", "show", "HEAD:dequant.py"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        target = tmp / "dequant.py"
        target.write_text(text, encoding="utf-8")
        return target
    raise SystemExit(f"--anchor {path}: neither a folder with dequant.py nor a git directory")


def load_anchor(path: Path, tmp: Path) -> ModuleType:
    """Import the anchor's dequant module under a private name (it needs ``gguf``, ``torch``, ``tqdm``)."""
    source = anchor_source(path.expanduser().resolve(), tmp)
    if REPO in source.resolve().parents:
        raise SystemExit(f"{source}: the anchor must live outside this repository (it is never committed)")
    spec = importlib.util.spec_from_file_location("comfyui_gguf_dequant_anchor", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in ("dequantize_tensor", "dequantize_functions"):
        if not hasattr(module, name):
            raise SystemExit(f"{source}: no '{name}': not ComfyUI-GGUF's dequant.py, or a newer API")
    return module


def common_types(anchor: ModuleType) -> list[GGMLType]:
    """Types the anchor dequantises itself (not via numpy fallback) that we implement too."""
    return [GGMLType(int(t)) for t in anchor.dequantize_functions if int(t) in BLOCK_INFO]


def anchor_tensor(raw_rows: torch.Tensor, gtype: GGMLType, shape: tuple[int, int]) -> torch.Tensor:
    """The bytes as the anchor's layers hold them: a uint8 tensor tagged with type and shape."""
    import gguf

    t = raw_rows.clone()
    t.tensor_type = gguf.GGMLQuantizationType(int(gtype))
    t.tensor_shape = torch.Size(shape)
    return t


CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.process_time, "wall": time.perf_counter}
"""``cpu``: this process's CPU time (user + system, all threads), which on a machine shared with
other jobs measures the work done rather than the share of the cores the scheduler granted;
``wall``: elapsed time (idle machines, GPUs, or to see multi-thread latency)."""


def interleaved_medians(
    fns: dict[str, Callable[[], object]], repeats: int, sync: Callable[[], None], clock: Callable[[], float]
) -> dict[str, float]:
    """Median seconds per candidate; one warm-up call each, then ``repeats`` rounds calling each
    once in a shuffled order (what ran just before - a freed block of the same size, a warm
    cache - shifts a call's time; a fixed order would turn that into a bias)."""
    for fn in fns.values():
        fn()
    sync()
    times: dict[str, list[float]] = {k: [] for k in fns}
    order, rng = list(fns), random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            start = clock()
            fns[name]()
            sync()
            times[name].append(clock() - start)
    return {k: statistics.median(v) for k, v in times.items()}


@dataclass
class Row:
    """One type and output dtype: median seconds of each side and whether the values agree."""

    type_name: str
    out: str
    nbytes: int
    ours_s: float
    ours_buffer_s: float
    anchor_s: dict[str, float]
    """Per ``ANCHOR_SETTINGS`` key."""
    exact: bool

    @property
    def fastest(self) -> str:
        return min(self.anchor_s, key=self.anchor_s.__getitem__)

    @property
    def ratio(self) -> float:
        """Against the anchor's fastest setting, whatever its precision: what the target is judged on."""
        return self.anchor_s[self.fastest] / self.ours_s

    @property
    def same_values_ratio(self) -> float:
        """Against its fp32 setting, which gives exactly our values."""
        return self.anchor_s["fp32"] / self.ours_s

    @property
    def layer_ratio(self) -> float:
        return self.anchor_s[self.fastest] / self.ours_buffer_s


def bench_type(
    anchor: ModuleType,
    gtype: GGMLType,
    shape: tuple[int, int],
    device: torch.device,
    repeats: int,
    clock: Callable[[], float],
) -> list[Row]:
    """Sanity-check, then time, one type for fp32 and bf16 output."""
    rows_np = random_blocks(gtype, shape, seed=int(gtype))
    raw = torch.from_numpy(rows_np.reshape(-1)).to(device)
    tagged = anchor_tensor(torch.from_numpy(rows_np).to(device), gtype, shape)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    ours32 = dequantize(raw, gtype, shape)
    theirs32 = anchor.dequantize_tensor(tagged, torch.float32, torch.float32).reshape(shape)
    exact = {
        "fp32": torch.equal(ours32.view(torch.int32), theirs32.view(torch.int32)),
        "bf16": torch.equal(
            dequantize(raw, gtype, shape, torch.bfloat16).view(torch.int16),
            theirs32.to(torch.bfloat16).view(torch.int16),
        ),
    }
    del ours32, theirs32

    results = []
    for out_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        buffer = torch.empty(shape, dtype=dtype, device=device)
        fns: dict[str, Callable[[], object]] = {
            "ours": lambda dtype=dtype: dequantize(raw, gtype, shape, dtype),
            "ours_buffer": lambda buffer=buffer: dequantize(raw, gtype, shape, out=buffer),
        }
        for setting, value in ANCHOR_SETTINGS.items():
            fns[setting] = lambda dtype=dtype, value=value: anchor.dequantize_tensor(tagged, dtype, value)
        med = interleaved_medians(fns, repeats, sync, clock)
        anchor_s = {k: med[k] for k in ANCHOR_SETTINGS}
        results.append(
            Row(gtype.name, out_name, raw.numel(), med["ours"], med["ours_buffer"], anchor_s, exact[out_name])
        )
        del buffer
    return results


def print_header(target: float) -> None:
    print(
        f"| type | out | ours MB/s | anchor MB/s ({' / '.join(ANCHOR_SETTINGS)}) | ratio to its fastest | "
        f">= {target}x | ratio to its fp32 (same values) | ours into a reused buffer MB/s | "
        "ratio as layers call them | same values |"
    )
    print("|---|---|---:|---:|---:|---|---:|---:|---:|---|")


def print_row(r: Row, target: float) -> bool:
    """One markdown row; True if the values agree and the fresh-tensor ratio meets ``target``."""
    passed = r.exact and r.ratio >= target
    mb = r.nbytes / 1e6
    anchor = " / ".join(f"{mb / t:.0f}" for t in r.anchor_s.values())
    print(
        f"| {r.type_name} | {r.out} | {mb / r.ours_s:.0f} | {anchor} | {r.ratio:.2f}x | "
        f"{'PASS' if passed else 'FAIL'} | {r.same_values_ratio:.2f}x | {mb / r.ours_buffer_s:.0f} | "
        f"{r.layer_ratio:.2f}x | {'yes' if r.exact else 'NO'} |",
        flush=True,
    )
    return passed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--anchor", type=Path, required=True, help="ComfyUI-GGUF checkout or bare git dir")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--shape",
        type=int,
        nargs=2,
        default=(4096, 1536),
        metavar=("ROWS", "COLS"),
        help="weight shape (default: a Lens MLP w1/w3 weight, 4096x1536)",
    )
    p.add_argument("--repeats", type=int, default=9, help="timed rounds (median reported)")
    p.add_argument("--types", nargs="*", default=None, help="ggml type names (default: all shared)")
    p.add_argument("--target", type=float, default=1.5, help="required speed-up over the anchor")
    p.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default=None,
        help="cpu: process CPU time (default on CPU: robust on a busy machine); wall: elapsed (default on cuda)",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA GPU")
    clock_name = args.clock or ("wall" if device.type == "cuda" else "cpu")
    rows, cols = args.shape

    with tempfile.TemporaryDirectory(prefix="gguf-anchor-") as tmp:
        anchor = load_anchor(args.anchor, Path(tmp))
        shared = common_types(anchor)
        types = shared if args.types is None else [GGMLType[t] for t in args.types]
        unsupported = [t.name for t in types if t not in shared]
        if unsupported:
            raise SystemExit(f"not supported by both: {', '.join(unsupported)}")
        where = (
            torch.cuda.get_device_name()
            if device.type == "cuda"
            else platform.processor() or platform.machine()
        )
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(
            f"torch {torch.__version__}, {device.type} ({where}), {torch.get_num_threads()} CPU threads, "
            f"{os.cpu_count()} CPUs, load average {load:.2f}; {rows}x{cols} weight, "
            f"median {clock_name} time of {args.repeats} interleaved rounds; anchor {args.anchor}"
        )
        print(f"types both support: {', '.join(t.name for t in shared)}\n")
        print_header(args.target)
        ok = True
        for gtype in types:
            if cols % TYPE_SIZES[gtype][0]:
                raise SystemExit(f"COLS must be a multiple of {TYPE_SIZES[gtype][0]} for {gtype.name}")
            for row in bench_type(anchor, gtype, (rows, cols), device, args.repeats, CLOCKS[clock_name]):
                ok &= print_row(row, args.target)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
