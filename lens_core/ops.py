"""The layer factory handed to every model constructor as ``operations``.

Models build their layers as ``operations.Linear(...)`` etc. instead of ``nn.Linear``, the way
ComfyUI's ``comfy/ldm`` models do, so quantised layers (``quant/``) or ComfyUI's own
``comfy.ops`` classes swap in without touching the model code. Any object exposing these
attributes works; this default is plain torch.
"""

from __future__ import annotations

import torch.nn as nn


class TorchOps:
    """Plain ``torch.nn`` layers."""

    Linear = nn.Linear
    Conv2d = nn.Conv2d
    GroupNorm = nn.GroupNorm
    LayerNorm = nn.LayerNorm
    Embedding = nn.Embedding


DEFAULT_OPS = TorchOps
