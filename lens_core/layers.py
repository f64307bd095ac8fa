"""Small layers shared by the Lens models."""

from __future__ import annotations

import torch
import torch.nn as nn


class RMSNorm(nn.Module):
    """RMSNorm with a learned scale, statistics computed in fp32 whatever the input dtype.

    Args:
        dim: size of the last axis.
        eps: added to the mean square before the reciprocal square root.
    Shapes: ``x`` ``[..., dim]`` -> ``[..., dim]`` (same dtype as ``x``).
    """

    def __init__(self, dim: int, eps: float, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)
