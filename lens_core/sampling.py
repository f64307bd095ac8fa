"""Flow-matching Euler sampling with Lens's norm-preserving classifier-free guidance.

The model predicts the velocity v = noise - image; x moves from noise (sigma 1) to the image
(sigma 0) by x <- x + (sigma_next - sigma) * v. Guidance runs cond and uncond in one batched
model call per step, and rescales the guided velocity back to the conditional one's norm per
token, which keeps high guidance scales from over-saturating.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

LATENT_CHANNELS = 128
PATCH = 16  # pixels per latent token side: VAE /8, then 2x2 patchify

VelocityFn = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]
StepCallback = Callable[[int, int, torch.Tensor], None]


@dataclass(frozen=True)
class Preset:
    """Default step count and guidance scale of one released Lens model."""

    steps: int
    cfg: float


PRESETS: dict[str, Preset] = {
    "lens": Preset(steps=20, cfg=5.0),
    "base": Preset(steps=50, cfg=4.0),
    "turbo": Preset(steps=4, cfg=1.0),  # distilled: no unconditional pass
}


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Guided velocity ``u + scale * (c - u)``, rescaled per token to the norm of ``c``.

    ``cond``/``uncond``: ``[B, N, C]`` (any leading shape; the norm is over the last, channel
    axis). Tokens whose guided velocity is exactly zero are left at zero. Computed in float32,
    returned in ``cond``'s dtype.
    """
    c, u = cond.float(), uncond.float()
    comb = u + scale * (c - u)
    cond_norm = torch.linalg.vector_norm(c, dim=-1, keepdim=True)
    comb_norm = torch.linalg.vector_norm(comb, dim=-1, keepdim=True)
    nonzero = comb_norm > 0
    ratio = torch.where(nonzero, cond_norm / torch.where(nonzero, comb_norm, 1.0), 1.0)
    return (comb * ratio).to(cond.dtype)


def euler_sample(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    cfg: float,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Integrate from ``noise`` (``[B, N, C]``) along ``sigmas`` (``[K+1]``, ending at 0): K steps.

    ``velocity_fn(x, sigma, uncond)`` runs the model. With ``cfg != 1`` it is called once per step
    with ``uncond=True`` on ``x`` = ``[x; x]`` (``[2B, N, C]``) and ``sigma`` ``[2B]``, and must
    return the velocities ``[cond; uncond]`` (its text batch being ``[cond; uncond]``). With
    ``cfg == 1`` the guidance is a no-op, so it is called with ``uncond=False`` on ``[B, N, C]``
    and returns the conditional velocity only. Inputs are float32; ``velocity_fn`` casts to the
    model's dtype. The state stays float32 across steps so bf16 models do not accumulate rounding.

    ``callback(step, total_steps, x)`` runs after each step (progress bars, interruption).
    Returns the final ``x``, float32 ``[B, N, C]``.
    """
    x = noise.float()
    sigmas = sigmas.to(device=x.device, dtype=torch.float32)
    guided = cfg != 1.0
    total = sigmas.numel() - 1
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if guided:
            both = velocity_fn(torch.cat([x, x]), sigma.repeat(2 * x.shape[0]), True)
            _check_shape(both, (2 * x.shape[0], *x.shape[1:]))
            v_cond, v_uncond = both.float().chunk(2)
            v = cfg_combine(v_cond, v_uncond, cfg)
        else:
            v = velocity_fn(x, sigma.repeat(x.shape[0]), False).float()
            _check_shape(v, tuple(x.shape))
        x = x + (sigma_next - sigma) * v
        if callback is not None:
            callback(i, total, x)
    return x


def _check_shape(v: torch.Tensor, expected: tuple[int, ...]) -> None:
    """A wrongly batched velocity would otherwise be split or broadcast silently."""
    if tuple(v.shape) != expected:
        raise ValueError(f"velocity_fn returned shape {tuple(v.shape)}, expected {expected}")


def initial_noise(
    batch: int, height: int, width: int, seed: int, channels: int = LATENT_CHANNELS
) -> torch.Tensor:
    """Starting noise ``[batch, (height//16)*(width//16), channels]``, float32 on the CPU.

    Drawn from a CPU generator seeded with ``seed`` so a seed gives the same image on any device
    (the reference convention).
    """
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn((batch, (height // PATCH) * (width // PATCH), channels), generator=generator)
