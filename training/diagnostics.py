"""Where a Lens model's flow-matching loss sits, whether it uses the text, and where it was trained.

A per-noise-level report for a trained (or training) model on a set of image-caption pairs:

* ``cond``: the loss with each image's own caption;
* ``other``: with another image's caption (the captions rolled by one), so ``other - cond`` is
  what the text is worth at that noise level -- near 0 means the model ignores its prompt there;
* ``none``: with the empty prompt that the CFG branch uses;
* ``train``: the share of training timesteps (:class:`training.objective.TimestepConfig`) that
  fall in the level's bin, and ``steps``: how many sampler steps (``lens_core.schedule``) land
  there. A bin the sampler visits often but training rarely reaches is where generations go wrong.

Lens-Toy is the case that motivated it: at 64 tokens the paper's interpolated training shift
(mu ~0.47) puts under 1% of the draws above sigma 0.95, while 20 sampler steps at the empirical
mu (~1.83) put 6 of them there.

    python -m training.diagnostics --model runs/lens-toy/model --data runs/lens-toy/data --limit 64
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

from lens_core.prompt import empty_features
from lens_core.schedule import lens_sigmas
from lens_core.vae import pack_latents

from .buckets import resize_and_crop
from .data import FolderDataset, decode_image, image_to_tensor
from .objective import TimestepConfig, add_noise, flow_matching_loss, sample_sigmas

DEFAULT_LEVELS = (0.1, 0.3, 0.5, 0.7, 0.85, 0.95, 1.0)


def level_bins(levels: Sequence[float]) -> list[tuple[float, float]]:
    """Half-open ``[lo, hi)`` bins of (0, 1] around sorted ``levels``, split half-way between
    neighbours; the last bin is closed at 1 so that sigma 1 counts."""
    levels = sorted(levels)
    if not levels or levels[0] <= 0 or levels[-1] > 1:
        raise ValueError(f"noise levels must lie in (0, 1], got {levels}")
    edges = [0.0] + [(a + b) / 2 for a, b in zip(levels, levels[1:], strict=False)] + [1.0 + 1e-9]
    return list(zip(edges[:-1], edges[1:], strict=True))


def timestep_coverage(
    levels: Sequence[float], num_tokens: int, timesteps: TimestepConfig, steps: int, draws: int = 200_000
) -> tuple[list[float], list[int]]:
    """Per bin of :func:`level_bins`: the share of training draws, and the number of sampler steps
    (the sigmas the Euler sampler evaluates the model at, the final 0 excluded)."""
    bins = level_bins(levels)
    train = sample_sigmas(draws, num_tokens, timesteps, torch.Generator().manual_seed(0)).double()
    sampler = lens_sigmas(steps, num_tokens)[:-1].double()
    share = [float(((train >= lo) & (train < hi)).double().mean()) for lo, hi in bins]
    visits = [int(((sampler >= lo) & (sampler < hi)).sum()) for lo, hi in bins]
    return share, visits


@torch.no_grad()
def loss_profile(
    transformer: nn.Module,
    x0: torch.Tensor,
    grid_hw: tuple[int, int],
    feats: Sequence[torch.Tensor],
    mask: torch.Tensor,
    levels: Sequence[float] = DEFAULT_LEVELS,
    seed: int = 0,
) -> list[dict[str, float]]:
    """The loss at each noise level with the own caption, another caption and no caption.

    Args:
        transformer: a Lens MMDiT.
        x0: clean latent tokens ``[B, N, C]`` (``pack_latents`` of the VAE's normalised latents).
        grid_hw: the latent token grid ``(h, w)``, ``h * w == N``.
        feats, mask: the captions' encoder features (``[B, S, D]`` per layer) and ``[B, S]`` mask.
        levels: noise levels (sigma) to test; the same noise draw is used at every level.

    Returns:
        One ``{"sigma", "cond", "other", "none"}`` per level, in the order given.
    """
    device = x0.device
    dtype = next(transformer.parameters()).dtype
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    target = noise - x0.float()
    feats = [f.to(device=device, dtype=dtype) for f in feats]
    mask = mask.to(device)
    order = torch.roll(torch.arange(x0.shape[0], device=device), 1)
    texts = {
        "cond": (feats, mask),
        "other": ([f[order] for f in feats], mask[order]),
        "none": empty_features(feats, mask),
    }
    rows = []
    for sigma in levels:
        s = torch.full((x0.shape[0],), float(sigma), device=device)
        x_t = add_noise(x0.float(), noise, s).to(dtype)
        row = {"sigma": float(sigma)}
        for name, (f, m) in texts.items():
            row[name] = float(flow_matching_loss(transformer(x_t, s, f, m, grid_hw), target))
        rows.append(row)
    return rows


def format_report(rows: Sequence[dict]) -> str:
    """The report as a fixed-width table (``gain`` = ``other - cond``)."""
    lines = ["sigma    cond   other    none    gain   train  steps"]
    for r in rows:
        lines.append(
            f"{r['sigma']:5.2f} {r['cond']:7.4f} {r['other']:7.4f} {r['none']:7.4f} {r['other'] - r['cond']:7.4f}"
            f" {r['train']:7.2%} {r['steps']:6d}"
        )
    return "\n".join(lines)


def diagnose(
    model: str | Path,
    data: str | Path,
    width: int | None = None,
    height: int | None = None,
    limit: int = 64,
    levels: Sequence[float] = DEFAULT_LEVELS,
    steps: int = 20,
    timesteps: TimestepConfig | None = None,
    device: str | None = None,
) -> list[dict]:
    """:func:`loss_profile` plus :func:`timestep_coverage` for a pipeline folder and an image folder.

    Images are resized and centre-cropped to ``width x height`` (default: the model's own
    square ``default_resolution``); the first ``limit`` pairs of the folder are used.
    """
    from lens_core.pipeline import LensPipeline

    pipe = LensPipeline.from_pretrained(model, device=device, offload=False, dtype=torch.float32)
    width, height = width or pipe.default_resolution, height or pipe.default_resolution
    if width % 16 or height % 16:
        raise ValueError(f"image size {width}x{height} must be a multiple of 16 on both sides")
    records = FolderDataset(data).records[:limit]
    if len(records) < 2:
        raise ValueError(f"{data}: the report needs at least 2 image-caption pairs, found {len(records)}")
    images = torch.stack([image_to_tensor(resize_and_crop(decode_image(r.path), height, width)) for r in records])
    with pipe.use("vae") as vae:
        x0 = torch.cat([pack_latents(vae.encode(images[i:i + 16].to(pipe.device))) for i in range(0, len(records), 16)])
    cond = pipe.encode_prompt([r.caption for r in records])
    grid = (height // 16, width // 16)
    with pipe.use("transformer") as mmdit:
        rows = loss_profile(mmdit, x0, grid, cond.feats, cond.mask, levels)
    share, visits = timestep_coverage(levels, grid[0] * grid[1], timesteps or TimestepConfig(), steps)
    for row, sh, v in zip(rows, share, visits, strict=True):
        row.update(train=sh, steps=v)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="pipeline folder (transformer/ text_encoder/ vae/)")
    p.add_argument("--data", required=True, help="folder of images with same-name .txt captions")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--limit", type=int, default=64, help="use the first this-many pairs")
    p.add_argument("--levels", type=float, nargs="+", default=list(DEFAULT_LEVELS))
    p.add_argument("--steps", type=int, default=20, help="sampler steps for the 'steps' column")
    p.add_argument("--shift", choices=["interpolate", "sampler"], default="interpolate",
                   help="training shift to compare with: the paper's token-count interpolation, or the "
                   "sampler's mu at --steps (a run with [timesteps] shift = \"sampler\")")
    p.add_argument("--mu", type=float, default=None, help="compare with a fixed training mu instead of --shift")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    if args.mu is not None:
        timesteps = TimestepConfig(shift="fixed", mu=args.mu)
    else:
        timesteps = TimestepConfig(shift=args.shift, sampler_steps=args.steps)
    rows = diagnose(args.model, args.data, args.width, args.height, args.limit, args.levels, args.steps,
                    timesteps, args.device)
    print(format_report(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
