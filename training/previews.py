"""Preview images during training, through the same pieces as ``lens_core.pipeline``.

The model being trained is in memory (maybe wrapped, maybe with LoRA layers), so the pipeline's
loaders cannot be used; instead the previews call what the pipeline calls: ``lens_sigmas``
(empirical-mu schedule), ``initial_noise`` (CPU generator, so a seed gives the same picture on
any device), ``euler_sample`` with Lens' norm-rescaled CFG, the VAE decoder and ``save_png`` with
the settings embedded. Fixed prompts and seeds make successive previews directly comparable.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from lens_core.image_io import save_png, to_pil
from lens_core.prompt import empty_features, pad_to_length
from lens_core.resolution import validate_size
from lens_core.sampling import euler_sample, initial_noise
from lens_core.schedule import lens_sigmas
from lens_core.vae import unpack_latents


@dataclass
class PromptFeatures:
    """Encoder features of one prompt: ``feats`` num_layers x ``[1, S, D]``, ``mask`` ``[1, S]``."""

    feats: list[torch.Tensor]
    mask: torch.Tensor


@torch.no_grad()
def render_previews(
    model: nn.Module,
    vae: nn.Module,
    prompts: Sequence[str],
    features: dict[str, PromptFeatures],
    seeds: Sequence[int],
    out_dir: str | Path,
    step: int,
    width: int,
    height: int,
    steps: int,
    cfg: float,
    negative: PromptFeatures | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> list[Path]:
    """One PNG per (prompt, seed) in ``out_dir`` (``<i>_seed<s>.png``); returns the paths.

    ``negative`` None = Lens' empty negative prompt (zero features, all-False mask).
    """
    validate_size(width, height)
    device = next(model.parameters()).device
    dtype = model.compute_dtype if hasattr(model, "compute_dtype") else torch.float32
    grid_hw = (height // 16, width // 16)
    sigmas = lens_sigmas(steps, grid_hw[0] * grid_hw[1])
    was_training = model.training
    model.eval()
    paths = []
    try:
        for i, prompt in enumerate(prompts):
            cond = features[prompt]
            c_feats = [f.to(device) for f in cond.feats]
            c_mask = cond.mask.to(device)
            if cfg != 1.0:
                if negative is None:
                    u_feats, u_mask = empty_features(c_feats, c_mask)
                else:
                    u_feats, u_mask = [f.to(device) for f in negative.feats], negative.mask.to(device)
                length = max(c_mask.shape[1], u_mask.shape[1])
                c_feats, c_mask = pad_to_length(c_feats, c_mask, length)
                u_feats, u_mask = pad_to_length(u_feats, u_mask, length)
                feats = [torch.cat([c, u]) for c, u in zip(c_feats, u_feats, strict=True)]
                mask = torch.cat([c_mask, u_mask])
            else:
                feats, mask = c_feats, c_mask

            def velocity(
                x: torch.Tensor, sigma: torch.Tensor, _uncond: bool, feats=feats, mask=mask
            ) -> torch.Tensor:
                with autocast():
                    return model(x.to(dtype), sigma, feats, mask, grid_hw).float()

            for seed in seeds:
                noise = initial_noise(1, height, width, int(seed)).to(device)
                x = euler_sample(velocity, noise, sigmas, cfg)
                image = vae.decode(unpack_latents(x, *grid_hw))
                path = Path(out_dir) / f"{i:02d}_seed{seed}.png"
                settings = {
                    "prompt": prompt,
                    "seed": int(seed),
                    "step": step,
                    "steps": steps,
                    "cfg": cfg,
                    "width": width,
                    "height": height,
                    "sampler": "euler (flow matching, empirical-mu schedule)",
                }
                paths.append(save_png(to_pil(image)[0], path, settings))
    finally:
        model.train(was_training)
    return paths
