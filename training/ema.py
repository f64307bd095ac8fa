"""Exponential moving average of the trainable weights.

Diffusion models sample noticeably better from an EMA of their weights than from the last
iterate, because the flow-matching loss is very noisy (one random timestep per image). The EMA
holds fp32 copies of the *trainable* parameters only (the LoRA matrices, or the whole model when
fine-tuning), keyed by parameter name so it survives checkpoints and DDP wrapping.

Decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so early, badly
initialised weights do not dominate the average of a short run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn


class EMA:
    """EMA of named parameters; ``update`` after every optimizer step."""

    def __init__(self, named_params: Sequence[tuple[str, nn.Parameter]], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.params = list(named_params)
        self.shadow = {n: p.detach().float().clone() for n, p in self.params}
        self.updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        d = self.current_decay()
        for n, p in self.params:
            self.shadow[n].lerp_(p.detach().float(), 1.0 - d)
        self.updates += 1

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped(self) -> Iterator[None]:
        """Temporarily put the EMA weights into the model (for previews), then restore."""
        backup = {n: p.detach().clone() for n, p in self.params}
        for n, p in self.params:
            p.copy_(self.shadow[n].to(p.dtype))
        try:
            yield
        finally:
            for n, p in self.params:
                p.copy_(backup[n])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.cpu() for n, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise ValueError(f"EMA checkpoint lacks {len(missing)} parameter(s), e.g. {sorted(missing)[:3]}")
        for n in self.shadow:
            self.shadow[n].copy_(state[n])
        self.updates = updates
