"""Training throughput of the Lens trainer.

Default (CPU, seconds): the tiny random-weight pipeline, trained through ``training.Trainer`` on
tiny generated images, in four settings -- online (VAE + encoder every step) vs cached latents and
features, each with and without gradient checkpointing. Images/s come from the trainer's own
per-step wall times (``loss_log.csv``, warm-up steps dropped) and are printed as ratios to the
online, no-checkpointing baseline measured in the same run::

    python benchmarks/bench_training.py [--steps 20] [--rounds 3] [--mode lora|full] [--threads 1]

``--toy-precision --threads 2``: median step time of full training steps of the Lens-Toy MMDiT at
128^2 (batch 32, 30-token captions) in fp32, bf16 autocast and bf16 autocast + ``torch.compile``,
as ratios to fp32. bf16 pays on CPUs with bf16 matrix units (Intel AMX, AVX512-BF16).

``--full-size --device cuda``: peak GPU memory and median step time of LoRA training steps
(rank 16, bf16 base + autocast, AdamW) on the full-size random-weight MMDiT (48 blocks, 4.1 B
parameters) at 1024x1024 (4096 image tokens) with a 256-token caption, with and without gradient
checkpointing. Needs a CUDA GPU; NOT YET RUN (no GPU in CI). ``--full-size --device cpu --layers 1
--size 256 --steps 1`` runs the same code path as a CPU smoke test.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def bench_tiny(steps: int, mode: str, warmup: int, rounds: int) -> None:
    from lens_core.random_weights import tiny_configs, write_random_pipeline
    from training.testing import tiny_config, write_tiny_folder
    from training.trainer import Trainer

    logging.getLogger("training").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pipe = write_random_pipeline(root / "pipe", tiny_configs(), tokenizer_json=False)
        data = write_tiny_folder(root / "data", n=48)
        cache = root / "cache"
        Trainer(tiny_config(pipe, data, root / "warm", cache={"dir": str(cache)})).prepare_data()
        settings = [(cached, gc) for cached in (False, True) for gc in (False, True)]
        per_step: dict[str, list[float]] = {}
        for r in range(rounds):  # settings interleaved, so machine load hits them alike
            for cached, gc in settings:
                name = f"{'cached' if cached else 'online'}{' + grad ckpt' if gc else ''}"
                out = root / f"{name.replace(' ', '_')}_{r}"
                cfg = tiny_config(
                    pipe,
                    data,
                    out,
                    cache={"enabled": cached, "dir": str(cache)},
                    train={"max_steps": warmup + steps, "mode": mode, "gradient_checkpointing": gc},
                    lora={"save_kohya": False},
                )
                Trainer(cfg).train(resume=None)
                rows = _rows(out / "loss_log.csv")[warmup:]
                per_step.setdefault(name, []).extend(int(x["images"]) / float(x["seconds"]) for x in rows)
        # median over steps: robust to bursts of load from other processes
        results = {name: statistics.median(v) for name, v in per_step.items()}
        base = results["online"]
        print(
            f"\ntiny Lens ({mode}), CPU, {torch.get_num_threads()} threads, {rounds} x {steps} timed steps each"
        )
        print(f"{'setting':<26}{'images/s':>10}{'vs online':>11}")
        for name, ips in results.items():
            print(f"{name:<26}{ips:>10.1f}{ips / base:>10.2f}x")


def _rows(path: Path) -> list[dict]:
    import csv

    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def timed_steps(model, params, opt, x0, feats, mask, grid_hw, steps, autocast, sync, warmup: int = 2) -> list[float]:
    """Seconds of each of ``steps`` training steps (noise, forward, flow-matching loss, backward, clip,
    AdamW) after ``warmup`` untimed ones (optimizer state, kernel warm-up, compilation)."""
    from training.objective import TimestepConfig, batch_generator, flow_matching_loss, noise_batch

    times = []
    for i in range(steps + warmup):
        sync()
        t0 = time.perf_counter()
        noised = noise_batch(x0, TimestepConfig(), batch_generator(0, i))
        with autocast:
            pred = model(noised.x_t, noised.sigmas, feats, mask, grid_hw)
        loss = flow_matching_loss(pred, noised.target)
        loss.backward()
        del pred, loss
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def bench_toy_precision(steps: int, batch: int, text_len: int) -> None:
    """Full training steps of the Lens-Toy MMDiT at 128^2 on the CPU: fp32 (the baseline), bf16 autocast,
    and bf16 autocast + ``torch.compile`` (the recipe's setting), in the same run."""
    from lens_core.mmdit import LensMMDiT
    from training.lens_toy import AREA, fast_cpu_bf16, toy_configs

    cfg = toy_configs()[0]
    h = w = AREA // 16
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, h * w, cfg.in_channels, generator=gen)
    feats = [torch.randn(batch, text_len, cfg.enc_hidden_dim, generator=gen) for _ in range(cfg.num_text_layers)]
    mask = torch.ones(batch, text_len, dtype=torch.bool)
    mask[: batch // 2, text_len // 2 :] = False  # padded captions, as in real batches
    print(
        f"Lens-Toy MMDiT ({sum(p.numel() for p in LensMMDiT(cfg).parameters()) / 1e6:.1f} M parameters), CPU, "
        f"{torch.get_num_threads()} threads, batch {batch} x {AREA}^2 ({h * w} tokens), caption {text_len} tokens, "
        f"bf16 matrix units: {'yes' if fast_cpu_bf16() else 'no'}"
    )
    print(f"{'setting':<24}{'step ms (median)':>17}{'vs fp32':>9}")
    base = None
    for name, bf16, compiled in (("fp32", False, False), ("bf16 autocast", True, False),
                                 ("bf16 + torch.compile", True, True)):
        torch.manual_seed(0)
        model = LensMMDiT(cfg).train()
        if compiled:
            model.compile()
        params = list(model.parameters())
        opt = torch.optim.AdamW(params, lr=1e-4)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
        ms = 1000 * statistics.median(
            timed_steps(model, params, opt, x0, feats, mask, (h, w), steps, autocast, lambda: None, warmup=3)
        )
        base = base or ms
        print(f"{name:<24}{ms:>17.0f}{base / ms:>8.2f}x")


def bench_full_size(
    device: str, steps: int, batch: int, text_len: int, rank: int, layers: int, size: int
) -> None:
    """LoRA steps on the full-size MMDiT (random weights) at ``size``^2: median step time and peak memory.

    UNRUN in CI (needs a CUDA GPU). ``--device cpu --layers 1 --size 256`` runs the same code path
    as a smoke test (times meaningless there, no memory numbers).
    """
    from lens_core.mmdit import LensMMDiT, MMDiTConfig
    from training.lora import add_lora

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA GPU is available")
    if not cuda:
        print("CPU smoke run of the full-size code path: timings are not meaningful, no memory numbers")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    cfg = MMDiTConfig(num_layers=layers)
    with torch.device("meta"):
        model = LensMMDiT(cfg, dtype=torch.bfloat16 if cuda else torch.float32)
    model = model.to_empty(device=dev)
    with torch.no_grad():  # random weights scaled like a trained net: unit-variance activations
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, p.shape[1] ** -0.5)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    add_lora(model, rank=rank)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    h = w = size // 16
    x0 = torch.randn(batch, h * w, 128, device=dev)
    feats = [
        torch.randn(batch, text_len, cfg.enc_hidden_dim, device=dev, dtype=model.compute_dtype)
        for _ in range(4)
    ]
    mask = torch.ones(batch, text_len, dtype=torch.bool, device=dev)
    n_params = sum(p.numel() for p in model.parameters())
    where = torch.cuda.get_device_name(dev) if cuda else "CPU"
    print(
        f"Lens MMDiT, {layers} blocks: {n_params / 1e9:.2f} B parameters "
        f"({sum(p.numel() for p in params) / 1e6:.1f} M LoRA, rank {rank}), {where}, "
        f"batch {batch} x {size}^2 ({h * w} tokens), caption {text_len} tokens"
    )
    print(f"{'setting':<24}{'step s (median)':>16}{'peak GiB':>10}")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    for gc in (True, False):
        name = "LoRA + grad ckpt" if gc else "LoRA, no ckpt"
        model.gradient_checkpointing = gc
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        try:
            times = timed_steps(model, params, opt, x0, feats, mask, (h, w), steps, autocast, sync)
        except torch.OutOfMemoryError:
            print(f"{name:<24}{'out of memory':>26}")
            continue
        peak = f"{torch.cuda.max_memory_allocated(dev) / 2**30:>10.1f}" if cuda else f"{'-':>10}"
        print(f"{name:<24}{statistics.median(times):>16.3f}{peak}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps per setting")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    p.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of the four settings")
    p.add_argument("--mode", choices=("lora", "full"), default="lora")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (0 = torch's default). 1 by default: the tiny model's ops are too small to gain "
        "from more, and multi-threaded ops slow down ~10x when other processes compete for the cores",
    )
    p.add_argument("--full-size", action="store_true", help="full-size MMDiT LoRA step on a GPU")
    p.add_argument("--toy-precision", action="store_true",
                   help="Lens-Toy MMDiT steps on the CPU: fp32 vs bf16 vs bf16 + torch.compile (use --threads 2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=None, help="default 1 (--full-size), 32 (--toy-precision)")
    p.add_argument("--text-len", type=int, default=None, help="default 256 (--full-size), 30 (--toy-precision)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--layers", type=int, default=48, help="MMDiT blocks (--full-size; 48 = the release)")
    p.add_argument("--size", type=int, default=1024, help="image side in pixels (--full-size)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.toy_precision:
        bench_toy_precision(args.steps, args.batch or 32, args.text_len or 30)
    elif args.full_size:
        bench_full_size(args.device, args.steps, args.batch or 1, args.text_len or 256, args.rank, args.layers, args.size)
    else:
        bench_tiny(args.steps, args.mode, args.warmup, args.rounds)


if __name__ == "__main__":
    main()
