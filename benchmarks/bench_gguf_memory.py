"""Peak host memory (RSS) of loading a full-size Lens MMDiT GGUF, against its file size.

Issue 5's target: peak RSS below file size + 1 GB when loading a full-size MMDiT converted to
Q4_K (or any type: Q8_0, BF16, F16).  The file is written straight from random blocks with the
real tensor names, shapes, types and header of ``lens-quantize --type T``
(``benchmarks/gguf_files.py``): quantising 4 B random floats would take hours here, and neither the
loader nor its memory depends on the values.  When the model needs more than the file (a BF16 file
in an fp32 model: every float tensor converted, twice the file) the bound is the model's own bytes
+ 1 GB instead: the loader converts tensor by tensor and releases the file pages it has read, so
the file never sits in memory beside the converted model.

A fresh child process (so nothing else inflates its high-water mark) imports ``lens_core``, then
``lens_core.loading.load_mmdit`` builds the model on the meta device and fills it from the memory
map (quantised weights, and float tensors stored in the compute dtype, stay zero-copy views of the
file), then optionally runs one forward at a small resolution, which touches every weight.
Reported from ``/proc/self/status`` after each stage: VmHWM (peak RSS so far; also
``ru_maxrss``), and the current RSS split into file-backed pages (the mapped GGUF, shared with the
page cache) and anonymous memory (everything the process allocated itself).

    python benchmarks/bench_gguf_memory.py [--type Q4_K|Q8_0|BF16|...] [--dir /tmp/gguf-bench]
        [--forward] [--resolution 256] [--dtype float32|bfloat16] [--layers 48] [--keep]

A full-size BF16 file is 7.65 GiB (``--type BF16 --dtype bfloat16``: views, ~ the file; with
``--dtype float32`` the model alone is 15.3 GiB).
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

TARGET_MARGIN = 1 << 30
"""Peak RSS may exceed the file size (or the model's own bytes, if larger) by at most this much."""
STATUS_FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile")


def proc_status() -> dict[str, int]:
    """Memory fields of ``/proc/self/status``, in bytes (Linux)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in STATUS_FIELDS:
                out[key] = int(value.split()[0]) * 1024
    return out


def child(path: Path, dtype_name: str, resolution: int, threads: int) -> None:
    """Runs in the fresh process: load (and run), print one JSON line of measurements."""
    import torch
    from bench_quant_models import forward, inputs

    from lens_core.loading import load_mmdit

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    stages = {"imports": proc_status()}
    start = time.perf_counter()
    model = load_mmdit(path, device="cpu", dtype=dtype)
    stages["load"] = proc_status()
    stages["load"]["seconds"] = time.perf_counter() - start
    stages["model_bytes"] = sum(t.nbytes for t in itertools.chain(model.parameters(), model.buffers()))
    if resolution:
        tokens = resolution // 16
        start = time.perf_counter()
        y = forward(model, inputs(model.config, tokens, tokens, 64, 1, "cpu", dtype))
        stages["forward"] = proc_status()
        stages["forward"]["seconds"] = time.perf_counter() - start
        stages["forward"]["finite"] = bool(torch.isfinite(y).all())
    stages["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(stages))


def measure(path: Path, dtype: str, resolution: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", str(path), "--dtype", dtype]
    cmd += ["--resolution", str(resolution), "--threads", str(threads)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if result.returncode:
        raise SystemExit(f"child failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def report(size: int, stages: dict) -> bool:
    """Print the table; True if the peak RSS meets the target."""
    print("| after | peak RSS GiB (VmHWM) | RSS now GiB | of which the mapped file | anonymous | seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in ("imports", "load", "forward"):
        s = stages.get(name)
        if s is not None:
            print(
                f"| {name} | {gib(s['VmHWM'])} | {gib(s['VmRSS'])} | {gib(s['RssFile'])} | "
                f"{gib(s['RssAnon'])} | {s.get('seconds', 0):.1f} |"
            )
    peak = max(stages["ru_maxrss"], *(s["VmHWM"] for s in stages.values() if isinstance(s, dict)))
    model = stages["model_bytes"]
    bound = max(size, model)
    margin = bound + TARGET_MARGIN - peak
    ok = margin >= 0
    print(
        f"\nfile {gib(size)} GiB, model {gib(model)} GiB (parameters and buffers, views included); "
        f"peak RSS {gib(peak)} GiB (ru_maxrss {gib(stages['ru_maxrss'])}); target < "
        f"{'file' if size >= model else 'model'} + 1 GiB = {gib(bound + TARGET_MARGIN)} GiB: "
        f"{'PASS' if ok else 'FAIL'}, margin {gib(margin)} GiB"
    )
    if "forward" in stages and not stages["forward"]["finite"]:
        print("note: the forward of random weights produced non-finite values (memory is still valid)")
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--type", default="Q4_K", help="lens-quantize type of the file (Q4_K, Q8_0, BF16 ...)")
    p.add_argument("--dir", type=Path, default=Path("/tmp/gguf-bench"), help="where the file is written")
    p.add_argument("--forward", action="store_true", help="also run one forward after loading")
    p.add_argument("--resolution", type=int, default=256, help="square image size of that forward")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--layers", type=int, default=48, help="MMDiT blocks (48 = the released model)")
    p.add_argument("--keep", action="store_true", help="keep the file (default: delete it at the end)")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.dtype, args.resolution, args.threads)
        return 0

    from gguf_files import write_random_mmdit

    from lens_core.mmdit import MMDiTConfig

    args.dir.mkdir(parents=True, exist_ok=True)
    path = args.dir / f"lens-random-{args.layers}-{args.type}.gguf"
    try:
        if not path.exists():
            start = time.perf_counter()
            write_random_mmdit(path, args.type, MMDiTConfig(num_layers=args.layers))
            print(f"wrote {path} in {time.perf_counter() - start:.0f} s")
        size = path.stat().st_size
        print(
            f"random Lens MMDiT ({args.layers} blocks), {args.type}, {args.dtype} compute: "
            f"{size:,} bytes ({gib(size)} GiB)\n"
        )
        stages = measure(path, args.dtype, args.resolution if args.forward else 0, args.threads)
        ok = report(size, stages)
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
