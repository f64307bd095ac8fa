"""Seconds per 1024^2 image for full-size Lens with random weights (no download needed).

Measures, in one run and on one device, the text encoder (MXFP4 experts), 20-step CFG 5 and
Turbo 4-step CFG 1 sampling, VAE decoding and peak memory with every component resident: first
driven the plain way (eager PyTorch SDPA), then, with ``--compile``, with the MMDiT under
``torch.compile``, and prints the ratio plain / compiled. ``--tiny`` runs the same code on CPU with
tiny configs (a smoke test; its timings mean nothing).

    python benchmarks/bench_pipeline.py --device cuda [--compile]
    python benchmarks/bench_pipeline.py --tiny
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from lens_core.mmdit import LensMMDiT, MMDiTConfig
from lens_core.random_weights import randomize_, tiny_configs
from lens_core.sampling import PRESETS, euler_sample, initial_noise
from lens_core.schedule import lens_sigmas
from lens_core.text_encoder import GptOssConfig, GptOssEncoder
from lens_core.vae import Flux2VAE, VAEConfig, unpack_latents


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def build_models(tiny: bool, device: torch.device, dtype: torch.dtype):
    """Random-weight MMDiT, MXFP4 GPT-OSS encoder (layers 0-23) and FLUX.2 VAE on ``device``."""
    if tiny:
        mmdit_cfg, enc_cfg, vae_cfg = tiny_configs()
    else:
        mmdit_cfg, enc_cfg, vae_cfg = MMDiTConfig(), GptOssConfig(), VAEConfig()
    with torch.device(device):
        mmdit = randomize_(LensMMDiT(mmdit_cfg, dtype=dtype), seed=0).eval()
        encoder = GptOssEncoder(
            enc_cfg, selected_layers=mmdit_cfg.selected_layer_index, expert_format="mxfp4", dtype=dtype
        )
        randomize_(encoder, seed=1)
        for name, t in encoder.named_parameters():
            if t.dtype == torch.uint8:  # random MXFP4 codes; scales near 2^0 keep activations sane
                t.data = (torch.randint(0, 256, t.shape, dtype=torch.uint8) if name.endswith("_blocks")
                          else torch.randint(119, 124, t.shape, dtype=torch.uint8))
        vae = randomize_(Flux2VAE(vae_cfg, dtype=dtype), seed=2).eval()
    return mmdit, encoder.eval(), vae


def run(args: argparse.Namespace) -> None:
    device = torch.device("cpu" if args.tiny else args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    size = 64 if args.tiny else 1024
    grid = (size // 16, size // 16)
    mmdit, encoder, vae = build_models(args.tiny, device, dtype)
    n_layers = len(mmdit.config.selected_layer_index)
    ids = torch.randint(0, 200000, (1, 97 + 160), device=device)
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.inference_mode():
        feats = [f[:, 97:] for f in encoder(ids, mask)][:n_layers]
    txt_mask = mask[:, 97:]
    zeros = [torch.zeros_like(f) for f in feats]

    def sample(model: torch.nn.Module, preset: str) -> torch.Tensor:
        steps, cfg = PRESETS[preset].steps, PRESETS[preset].cfg
        if cfg != 1.0:
            f = [torch.cat([a, b]) for a, b in zip(feats, zeros, strict=True)]
            m = torch.cat([txt_mask, torch.zeros_like(txt_mask)])
        else:
            f, m = feats, txt_mask
        noise = initial_noise(1, size, size, seed=0).to(device)
        with torch.inference_mode():
            return euler_sample(lambda x, s, _u: model(x.to(dtype), s, f, m, grid), noise,
                                lens_sigmas(steps, grid[0] * grid[1]), cfg)

    latents = sample(mmdit, "turbo")
    results: dict[str, dict[str, float]] = {}
    variants = {"plain (eager)": mmdit}
    if args.compile:
        variants["lens_core (+compile)"] = torch.compile(mmdit, dynamic=False)
    for label, model in variants.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        r = {
            "encoder s": timed(lambda: encoder(ids, mask), device, args.repeats),
            "lens 20-step CFG5 s": timed(lambda m=model: sample(m, "lens"), device, args.repeats),
            "turbo 4-step s": timed(lambda m=model: sample(m, "turbo"), device, args.repeats),
            "vae decode s": timed(lambda: vae.decode(unpack_latents(latents, *grid).to(dtype)), device, args.repeats),
        }
        if device.type == "cuda":
            r["peak GiB"] = torch.cuda.max_memory_allocated() / 2**30
        results[label] = r
    base = next(iter(results.values()))
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
          f"{size}x{size}, dtype {dtype}, torch {torch.__version__}")
    print(f"{'metric':<22}" + "".join(f"{label:>24}" for label in results) + f"{'ratio':>10}")
    for metric in base:
        row = [results[label][metric] for label in results]
        print(f"{metric:<22}" + "".join(f"{v:>24.3f}" for v in row) + f"{base[metric] / row[-1]:>10.2f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny configs on CPU (smoke test)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the MMDiT")
    p.add_argument("--repeats", type=int, default=3)
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
