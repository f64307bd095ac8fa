"""Train a small FLUX.2-architecture VAE (for Lens-Toy; the real FLUX.2 VAE is never retrained).

The loss is the usual KL-regularised autoencoder objective: L1 + MSE reconstruction of a sampled
posterior latent plus a small KL term. After training, the ``bn`` running statistics that Lens
uses to normalise latents are measured on the training distribution (patchified posterior means),
exactly what the FLUX.2 VAE's BatchNorm holds, so the saved VAE is a drop-in for ``lens_core``.

    python -m training.vae_trainer --out runs/toy-vae --steps 3000
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lens_core.random_weights import vae_config_json
from lens_core.safetensors_io import save_file_atomic
from lens_core.vae import Flux2VAE, VAEConfig, patchify_latents

ImageBatches = Callable[[torch.Generator], torch.Tensor]


def posterior(vae: Flux2VAE, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder moments: ``(mean, logvar)`` each ``[B, latent_channels, H/8, W/8]``."""
    moments = vae.quant_conv(vae.encoder(images))
    mean, logvar = moments.chunk(2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)


def vae_loss(
    vae: Flux2VAE, images: torch.Tensor, kl_weight: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Reconstruction (L1 + MSE) of a sampled latent plus ``kl_weight`` x KL to N(0, I)."""
    mean, logvar = posterior(vae, images)
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    z = mean + torch.exp(0.5 * logvar) * noise
    recon = vae.decoder(vae.post_quant_conv(z))
    l1 = (recon - images).abs().mean()
    mse = F.mse_loss(recon, images)
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
    loss = l1 + mse + kl_weight * kl
    return loss, {"loss": loss.item(), "l1": l1.item(), "mse": mse.item(), "kl": kl.item()}


@torch.no_grad()
def fit_latent_stats(vae: Flux2VAE, batches: Iterator[torch.Tensor]) -> None:
    """Set ``vae.bn`` to the per-channel mean/variance of patchified posterior means over ``batches``."""
    total = total_sq = None
    count = 0
    for images in batches:
        mean, _ = posterior(vae, images)
        z = patchify_latents(mean.float(), vae.config.patch_size[0]).double()
        s, sq = z.sum(dim=(0, 2, 3)), z.pow(2).sum(dim=(0, 2, 3))
        total = s if total is None else total + s
        total_sq = sq if total_sq is None else total_sq + sq
        count += z.shape[0] * z.shape[2] * z.shape[3]
    if not count:
        raise ValueError("fit_latent_stats needs at least one batch")
    mu = total / count
    var = (total_sq / count - mu.pow(2)).clamp_min(1e-8)
    vae.bn.running_mean.copy_(mu.to(vae.bn.running_mean.dtype))
    vae.bn.running_var.copy_(var.to(vae.bn.running_var.dtype))


def toy_image_batches(batch: int, size: int, seed: int, crop: int | None = None) -> Iterator[torch.Tensor]:
    """Endless batches ``[batch, 3, crop or size, crop or size]`` in [-1, 1] of Lens-Toy scenes.

    Scenes are rendered at ``size``; a ``crop`` takes a random square window of each, which keeps
    the object scale of ``size`` at a fraction of the cost (a convolutional VAE sees local detail).
    """
    from .toy_scenes import render_scene, sample_scene

    rng = np.random.default_rng(seed)
    side = crop or size
    while True:
        imgs = []
        for _ in range(batch):
            img = np.asarray(render_scene(sample_scene(rng), size, size), dtype=np.float32)
            y, x = rng.integers(0, size - side + 1, size=2)
            imgs.append(img[y:y + side, x:x + side])
        yield torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2) / 127.5 - 1.0


def save_vae(vae: Flux2VAE, folder: str | Path) -> Path:
    """Write ``folder/config.json`` + ``diffusion_pytorch_model.safetensors`` (diffusers layout)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in vae.state_dict().items()}
    save_file_atomic(state, folder / "diffusion_pytorch_model.safetensors")
    tmp = folder / ".config.json.tmp"
    tmp.write_text(json.dumps(vae_config_json(vae.config), indent=2))
    tmp.replace(folder / "config.json")
    return folder


def train_vae(
    config: VAEConfig,
    batches: Iterator[torch.Tensor],
    steps: int,
    lr: float = 2e-4,
    kl_weight: float = 1e-6,
    seed: int = 0,
    stats_batches: int = 16,
    log: Callable[[int, dict[str, float]], None] | None = None,
    stats_images: Iterator[torch.Tensor] | None = None,
    warmup: int = 100,
) -> Flux2VAE:
    """Train a VAE from scratch on ``batches``; returns it with fitted latent statistics.

    The learning rate warms up linearly over ``warmup`` steps, then follows a cosine to 2% of
    ``lr``: the late low-LR steps are what pin exact colours, which ToyEval reads. Latent
    statistics come from ``stats_images`` (full frames, as the MMDiT will see) or else ``batches``.
    """
    torch.manual_seed(seed)
    vae = Flux2VAE(config)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    gen = torch.Generator().manual_seed(seed)
    vae.train()
    bar = tqdm(range(steps), desc="vae", unit="step")
    for step in bar:
        loss, stats = vae_loss(vae, next(batches), kl_weight, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(l1=f"{stats['l1']:.4f}")
        if log is not None:
            log(step, stats)
    vae.eval()
    source = stats_images if stats_images is not None else batches
    fit_latent_stats(vae, (next(source) for _ in range(stats_batches)))
    return vae


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train a small FLUX.2-architecture VAE on Lens-Toy scenes.")
    p.add_argument("--out", required=True, help="output folder (diffusers vae/ layout)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=128, help="scene render size (multiple of 16)")
    p.add_argument("--crop", type=int, default=None, help="train on random square crops of this side")
    p.add_argument("--channels", type=int, nargs=4, default=(32, 64, 64, 64), help="block_out_channels")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    config = VAEConfig(block_out_channels=tuple(args.channels), layers_per_block=1, norm_num_groups=16)
    t0 = time.time()
    batches = toy_image_batches(args.batch, args.size, args.seed, crop=args.crop)
    stats = toy_image_batches(args.batch, args.size, args.seed + 1)
    vae = train_vae(config, batches, args.steps, args.lr, seed=args.seed, stats_images=stats)
    print(f"trained in {time.time() - t0:.0f} s -> {save_vae(vae, args.out)}")


if __name__ == "__main__":
    main()
