"""Sampling with a Lens MODEL: the all-in-one loop and the pieces for SamplerCustomAdvanced."""

from __future__ import annotations

import logging

import comfy.model_management
import comfy.samplers
import comfy.utils
import torch

from lens_core.sampling import PRESETS, euler_sample
from lens_core.schedule import lens_sigmas

from .lens_bridge import (
    LATENT_CHANNELS,
    empty_like_conditioning,
    lens_noise,
    pack_latents,
    repeat_to_batch,
    text_batch,
    text_from_conditioning,
    unpack_latents,
)
from .model import check_layers, lens_cfg_function, lens_diffusion_model

log = logging.getLogger("ComfyUI-Lens")


def latent_grid(samples: torch.Tensor) -> tuple[int, int, int]:
    """``(batch, h, w)`` of a Lens LATENT, or a clear error for other latents."""
    if samples.ndim != 4 or samples.shape[1] != LATENT_CHANNELS:
        raise ValueError(
            f"Lens needs a {LATENT_CHANNELS}-channel latent at 1/16 of the image size "
            f"(Lens Resolution or Empty Flux 2 Latent), got shape {tuple(samples.shape)}"
        )
    return samples.shape[0], samples.shape[2], samples.shape[3]


def schedule(steps: int, grid_hw: tuple[int, int], denoise: float = 1.0) -> torch.Tensor:
    """Lens' empirical-mu sigmas for the latent's token count; ``denoise < 1`` keeps the tail."""
    if denoise <= 0.0:
        return torch.zeros(0)
    total = steps if denoise >= 1.0 else int(steps / denoise)
    return lens_sigmas(total, grid_hw[0] * grid_hw[1])[-(steps + 1):]


def resolve_preset(preset: str, steps: int, cfg: float) -> tuple[int, float]:
    """Steps/cfg of 0 mean the preset's value."""
    p = PRESETS[preset]
    return (int(steps) if steps > 0 else p.steps), (float(cfg) if cfg > 0 else p.cfg)


def _warn_extra_entries(conditioning, which: str) -> None:
    if conditioning is not None and len(conditioning) > 1:
        log.warning("Lens Sampler uses only the first of %d %s conditioning entries (use "
                    "SamplerCustomAdvanced with Lens Guider for combined/area conditioning)", len(conditioning), which)


def sample(model, positive, negative, latent: dict, steps: int, cfg: float, seed: int) -> dict:
    """Text to image exactly as ``lens_core.LensPipeline.denoise`` does it, on ComfyUI's model.

    The noise is ``lens_core.sampling.initial_noise(seed)`` and the loop is lens_core's Euler
    sampler with the norm-rescaled guidance, so a seed gives the same image as the ``lens`` CLI.
    Only the size and batch of ``latent`` are used.
    """
    dm = lens_diffusion_model(model)
    samples = latent["samples"]
    batch, h, w = latent_grid(samples)
    layers = dm.config.num_text_layers
    _warn_extra_entries(positive, "positive")
    _warn_extra_entries(negative, "negative")
    for c in (positive, negative):
        if c:
            check_layers(c[0][1].get("lens_layers"), dm.config)
    cond = repeat_to_batch(text_from_conditioning(positive, layers), batch)
    uncond = None
    if negative is not None and cfg != 1.0:
        uncond = repeat_to_batch(text_from_conditioning(negative, layers), batch)
    feats, mask = text_batch(cond, uncond, cfg)

    sigmas = lens_sigmas(steps, h * w)
    noise = pack_latents(lens_noise(seed, batch, h, w))

    mm = comfy.model_management
    mm.throw_exception_if_processing_interrupted()
    rows = feats[0].shape[0]
    memory = model.model.memory_required([rows, LATENT_CHANNELS, h, w])
    mm.load_models_gpu([model], memory_required=memory)
    device = model.load_device
    feats = [f.to(device) for f in feats]
    mask = mask.to(device)
    pbar = comfy.utils.ProgressBar(steps)

    def velocity(x: torch.Tensor, sigma: torch.Tensor, _uncond: bool) -> torch.Tensor:
        return dm.velocity(x, sigma, feats, mask, (h, w))

    def callback(i: int, total: int, _x: torch.Tensor) -> None:
        mm.throw_exception_if_processing_interrupted()
        pbar.update_absolute(i + 1, total)

    with torch.inference_mode():
        x = euler_sample(velocity, noise.to(device), sigmas, cfg, callback)
    out = latent.copy()
    out["samples"] = unpack_latents(x, h, w).to(mm.intermediate_device())
    out.pop("noise_mask", None)
    return out


class LensNoise:
    """A ComfyUI NOISE whose draw equals ``lens_core.sampling.initial_noise`` for the seed."""

    def __init__(self, seed: int):
        self.seed = int(seed)

    def generate_noise(self, input_latent: dict) -> torch.Tensor:
        batch, h, w = latent_grid(input_latent["samples"])
        return lens_noise(self.seed, batch, h, w)


class LensGuider(comfy.samplers.CFGGuider):
    """CFG with Lens' per-token norm rescale; cond and uncond run as one batch.

    A missing negative is the empty prompt (no text), as in the ``lens`` CLI.
    """

    def set_conds(self, positive, negative=None):
        if negative is None:
            negative = empty_like_conditioning(positive)
        super().set_conds(positive, negative)

    def predict_noise(self, x, timestep, model_options=None, seed=None):
        options = dict(model_options or {})
        options["sampler_cfg_function"] = lens_cfg_function
        return super().predict_noise(x, timestep, model_options=options, seed=seed)
