"""Quantised Lens MMDiT: file size, accuracy and converter memory per ggml type; GPU step time.

CPU mode (default):

1. Size of the full-size MMDiT (4.1 B parameters) under the converter's default policy for each
   type, relative to bf16: the exact file size (``gguf_files.mmdit_file_size``, no weights needed;
   ``gguf_sizes.py`` has the full table with the encoder and a pick per GPU).
2. Relative error of one MMDiT forward (velocity) against the fp32 model, for a mid-size random
   model converted to each type (compute in fp32), next to the error of simply running in bf16.
   The weights are random (trained-like scale), so this compares the types with each other; it is
   not the error of the released model.
3. Converter peak memory: the anonymous RSS growth of a child process converting that model
   (sampled every ms from /proc/self/status) and its ru_maxrss, with the input size.

CUDA mode (``--device cuda``): the full-size random MMDiT in bf16, Q8_0 and Q4_K (quantised on the
GPU, held as GGML layers), seconds per sampling step (one CFG forward, batch 2) at 1024x1024 and
peak GPU memory.  Not run in this repository's CI (no GPU): its numbers are yet to be measured.

    python benchmarks/bench_quant_models.py [--threads 2] [--types Q8_0 Q6_K Q5_K Q4_K mixed ...]
    python benchmarks/bench_quant_models.py --device cuda [--steps 5] [--resolution 1024]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gguf_files import mmdit_file_size  # noqa: E402

from lens_core.mmdit import LensMMDiT, MMDiTConfig  # noqa: E402
from lens_core.random_weights import randomize_  # noqa: E402
from lens_core.safetensors_io import save_file_atomic  # noqa: E402
from quant.convert import CHOICES, choose_type, convert_mmdit  # noqa: E402
from quant.ggml_types import GGMLType  # noqa: E402
from quant.gguf_models import load_mmdit_gguf  # noqa: E402
from quant.layers import GGMLOps, QuantizedWeight  # noqa: E402
from quant.quantize import quantize  # noqa: E402

DEFAULT_TYPES = [t for t in CHOICES if t not in ("F32", "F16")]  # every type the converter writes but fp32/fp16
MID = MMDiTConfig(
    num_layers=4,
    num_attention_heads=8,
    enc_hidden_dim=256,
    mlp_hidden_dim=2048,
    selected_layer_index=(0, 1, 2, 3),
)


def inputs(cfg: MMDiTConfig, h: int, w: int, s: int, batch: int, device, dtype, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(batch, h * w, cfg.in_channels, generator=g).to(device, dtype)
    feats = [
        torch.randn(batch, s, cfg.enc_hidden_dim, generator=g).to(device, dtype)
        for _ in range(cfg.num_text_layers)
    ]
    mask = torch.ones(batch, s, dtype=torch.bool, device=device)
    sigma = torch.full((batch,), 0.6, device=device)
    return x, sigma, feats, mask, (h, w)


def forward(model, args):
    x, sigma, feats, mask, hw = args
    with torch.no_grad():
        return model(x, sigma, feats, mask, hw).float()


_CHILD = r"""
import json, resource, sys, threading, time
import torch
torch.set_num_threads(int(sys.argv[4]))
from quant.convert import convert_mmdit
def anon():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
base = anon(); peak = [base]; done = threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon()); time.sleep(0.001)
t = threading.Thread(target=sample, daemon=True); t.start()
start = time.perf_counter()
rep = convert_mmdit(sys.argv[1], sys.argv[2], sys.argv[3])
done.set(); t.join()
print(json.dumps({"delta": peak[0] - base, "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "bytes_in": rep.bytes_in, "bytes_out": rep.bytes_out, "seconds": time.perf_counter() - start}))
"""


def cpu(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    bf16 = mmdit_file_size("BF16")
    print("1. Full-size MMDiT (4.1 B parameters), default policy: file size relative to bf16")
    print(f"   {'type':6} {'GiB':>7} {'x bf16':>7}")
    for t in args.types:
        n = mmdit_file_size(t)
        print(f"   {t:6} {n / 2**30:7.2f} {n / bf16:7.3f}")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = randomize_(LensMMDiT(MID), 0).eval().requires_grad_(False)
        src = tmp / "mid.safetensors"
        save_file_atomic(model.state_dict(), src)
        n_params = sum(p.numel() for p in model.parameters())
        ins = inputs(MID, 16, 16, 64, 2, "cpu", torch.float32)
        ref = forward(model, ins)
        bf = forward(model.to(torch.bfloat16), inputs(MID, 16, 16, 64, 2, "cpu", torch.bfloat16))
        print(
            f"\n2. One forward of a {n_params / 1e6:.0f} M-parameter random MMDiT (256 image + 64 text tokens, batch 2):"
            " relative error of the velocity vs fp32"
        )
        print(f"   {'bf16 weights+compute':22} {float((bf - ref).norm() / ref.norm()):.5f}")
        for t in args.types:
            out = tmp / f"mid_{t}.gguf"
            start = time.perf_counter()
            rep = convert_mmdit(src, out, t)
            conv = time.perf_counter() - start
            q = load_mmdit_gguf(out, dtype=torch.float32)
            y = forward(q, ins)
            print(
                f"   {t:22} {float((y - ref).norm() / ref.norm()):.5f}   file {rep.bytes_out / rep.bytes_in * 2:.3f} x bf16,"
                f" converted in {conv:.1f} s"
            )

        print("\n3. Converter memory (child process, Q8_0 and Q4_K)")
        for t in ("Q8_0", "Q4_K"):
            r = subprocess.run(
                [sys.executable, "-c", _CHILD, str(src), str(tmp / "rss.gguf"), t, str(args.threads)],
                capture_output=True,
                text=True,
                cwd=REPO,
                check=True,
            )
            s = json.loads(r.stdout.strip().splitlines()[-1])
            print(
                f"   {t}: input {s['bytes_in'] / 2**20:.0f} MiB fp32, anonymous RSS growth {s['delta'] / 2**20:.1f} MiB,"
                f" ru_maxrss {s['maxrss'] / 2**20:.0f} MiB (includes the mapped input and torch), {s['seconds']:.1f} s"
            )


def build_quantised(cfg: MMDiTConfig, dense: LensMMDiT, qtype: str, device) -> LensMMDiT:
    """The GGML model for ``qtype`` built straight from GPU tensors (no file)."""
    with torch.device("meta"):
        model = LensMMDiT(cfg, operations=GGMLOps, dtype=torch.bfloat16)
    state = {}
    for name, t in dense.state_dict().items():
        gtype = choose_type(name, tuple(t.shape), qtype, torch.bfloat16)
        if gtype in (GGMLType.F32, GGMLType.F16, GGMLType.BF16):
            state[name] = t
        else:
            state[name] = QuantizedWeight(quantize(t, gtype), gtype, tuple(t.shape))
    model.load_state_dict(state, assign=True)
    return model.eval().requires_grad_(False).to(device)


def cuda(args: argparse.Namespace) -> None:
    device = torch.device("cuda")
    cfg = MMDiTConfig()
    tokens = args.resolution // 16
    ins = inputs(cfg, tokens, tokens, args.text_tokens, 2, device, torch.bfloat16)
    with torch.device(device):
        dense = randomize_(LensMMDiT(cfg, dtype=torch.bfloat16), 0).eval().requires_grad_(False)
    results = {}
    for qtype in ["bf16", *args.types]:
        if qtype == "bf16":
            model = dense
        else:
            start = time.perf_counter()
            model = build_quantised(cfg, dense, qtype, device)
            torch.cuda.synchronize()
            print(f"   quantised to {qtype} on the GPU in {time.perf_counter() - start:.1f} s")
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()  # both models resident: report the forward's own peak
        torch.cuda.reset_peak_memory_stats()
        forward(model, ins)  # warm-up
        torch.cuda.synchronize()
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            y = forward(model, ins)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        weights = sum(b.numel() * b.element_size() for b in list(model.parameters()) + list(model.buffers()))
        results[qtype] = y
        err = float((y - results["bf16"]).norm() / results["bf16"].norm())
        print(
            f"   {qtype:6} {min(times):.3f} s/step (median {sorted(times)[len(times) // 2]:.3f}), weights {weights / 2**30:.2f} GiB,"
            f" forward peak above resident {(torch.cuda.max_memory_allocated() - base) / 2**30:.2f} GiB, rel. diff vs bf16 {err:.4f}"
        )
        if model is not dense:
            del model
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--types", nargs="+", default=None, choices=[c for c in CHOICES if c != "F32"] + ["BF16"])
    p.add_argument("--steps", type=int, default=5, help="cuda: timed forwards per type")
    p.add_argument("--resolution", type=int, default=1024, help="cuda: square image size")
    p.add_argument("--text-tokens", type=int, default=415, help="cuda: text tokens after the 97-token offset")
    args = p.parse_args(argv)
    if args.device == "cuda":
        args.types = args.types or ["Q8_0", "Q4_K"]
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda needs a CUDA GPU")
        print(
            f"Full-size random MMDiT on {torch.cuda.get_device_name()}, {args.resolution}^2, CFG batch 2, bf16 compute"
        )
        cuda(args)
    else:
        args.types = args.types or DEFAULT_TYPES
        cpu(args)


if __name__ == "__main__":
    main()
