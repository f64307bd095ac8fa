"""The Lens noise schedule: evenly spaced sigmas bent by a resolution- and step-dependent shift.

Lens does not use FLUX's shift. Its ``mu`` comes from an empirical fit over image token count
and step count (two lines, for 10 and 200 steps, interpolated linearly in the step count; above
4300 tokens the 200-step line is used for every step count). The result equals diffusers'
FlowMatchEulerDiscreteScheduler with exponential dynamic shifting fed ``mu`` and
``sigmas=linspace(1, 1/N, N)``, without needing diffusers.
"""

from __future__ import annotations

import math

import torch

# mu = slope * image_seq_len + intercept, fitted for 10 steps (_MU_10) and 200 steps (_MU_200).
_MU_10 = (8.73809524e-05, 1.89833333)
_MU_200 = (0.00016927, 0.45666666)
_LONG_SEQUENCE = 4300


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """Shift parameter ``mu`` for ``image_seq_len`` latent tokens ((H/16)*(W/16)) and ``num_steps``."""
    if image_seq_len < 1 or num_steps < 1:
        raise ValueError(f"image_seq_len and num_steps must be positive, got {image_seq_len}, {num_steps}")
    mu_200 = _MU_200[0] * image_seq_len + _MU_200[1]
    if image_seq_len > _LONG_SEQUENCE:
        return float(mu_200)
    mu_10 = _MU_10[0] * image_seq_len + _MU_10[1]
    slope = (mu_200 - mu_10) / 190.0
    return float(mu_200 + slope * (num_steps - 200))


def lens_sigmas(num_steps: int, image_seq_len: int) -> torch.Tensor:
    """Sigmas for ``num_steps`` Euler steps: float32 ``[num_steps + 1]``, from 1 down to a final 0.

    ``linspace(1, 1/N, N)`` shifted by s' = e^mu / (e^mu + 1/s - 1), then 0 appended so the last
    step lands on the clean image. Computed in float64, rounded once to float32.
    """
    mu = empirical_mu(image_seq_len, num_steps)
    s = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    shifted = math.exp(mu) / (math.exp(mu) + (1.0 / s - 1.0))
    return torch.cat([shifted, shifted.new_zeros(1)]).to(torch.float32)
