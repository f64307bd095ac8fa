"""Conversions between ComfyUI's data layout and lens_core's. Imports no ComfyUI module.

CONDITIONING (one entry ``[context, extras]``):
    ``context`` ``[B, S, L*H]``: the L selected GPT-OSS layer outputs (97-token prefix dropped)
    concatenated on the last axis, layer after layer; ``extras["attention_mask"]`` ``[B, S]``
    int64, 1 on real tokens. An empty prompt has S = 0. This is also the layout ComfyUI's own
    Lens text encoder emits, so the two can be mixed.
LORA PATCHES:
    one per LoRA module on ComfyUI's state-dict name ``diffusion_model.<lens_core module>.weight``;
    a LoRA on a split q/k/v projection patches its third of the fused ``img_qkv``/``txt_qkv``
    weight through ComfyUI's patch offset ``(dim 0, start row, rows)``.
LATENT:
    ``[B, 128, H/16, W/16]``: the normalised, 2x2-patchified FLUX.2 latent. Channel c at grid
    position (i, j) is channel c of MMDiT token ``i * W/16 + j`` (``lens_core.vae.pack_latents``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from lens_core.layers import RMSNorm
from lens_core.lora import LoraModule
from lens_core.pipeline import TextConditioning
from lens_core.prompt import empty_features, pad_to_length
from lens_core.sampling import LATENT_CHANNELS, PATCH, initial_noise
from lens_core.vae import pack_latents, unpack_latents

__all__ = [
    "DeviceSafeRMSNorm",
    "LATENT_CHANNELS",
    "LoraPatch",
    "MODEL_PREFIX",
    "PATCH",
    "TextConditioning",
    "conditioning_from_text",
    "context_to_features",
    "empty_like_conditioning",
    "lens_noise",
    "lora_patches",
    "pack_latents",
    "repeat_to_batch",
    "text_batch",
    "text_from_conditioning",
    "unpack_latents",
]


def context_to_features(context: torch.Tensor, num_layers: int) -> list[torch.Tensor]:
    """``[B, S, L*H]`` -> L tensors ``[B, S, H]``."""
    if context.ndim != 3 or context.shape[-1] % num_layers:
        raise ValueError(
            f"Lens conditioning must be [batch, tokens, {num_layers} x encoder width], got {tuple(context.shape)}: "
            "was it made by a Lens text encoder?"
        )
    return list(context.chunk(num_layers, dim=-1))


def _mask(mask: torch.Tensor | None, context: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
    if tuple(mask.shape) != tuple(context.shape[:2]):
        raise ValueError(f"attention_mask {tuple(mask.shape)} does not match conditioning {tuple(context.shape)}")
    return mask.to(context.device) != 0


def conditioning_from_text(feats: Sequence[torch.Tensor], mask: torch.Tensor, layers: Sequence[int]) -> list:
    """A ComfyUI CONDITIONING list holding one Lens text batch."""
    context = torch.cat(list(feats), dim=-1)
    extras = {
        "pooled_output": None,
        "attention_mask": mask.to(torch.long),
        "num_layers_stacked": len(feats),
        "lens_layers": tuple(int(i) for i in layers),
    }
    return [[context, extras]]


def text_from_conditioning(conditioning: list, num_layers: int) -> TextConditioning:
    """The first entry of a CONDITIONING list as lens_core text features (bool mask)."""
    if not conditioning:
        raise ValueError("empty conditioning: connect the output of a Lens Text Encode or CLIP Text Encode node")
    context, extras = conditioning[0][0], conditioning[0][1]
    return TextConditioning(context_to_features(context, num_layers), _mask(extras.get("attention_mask"), context))


def empty_like_conditioning(conditioning: list) -> list:
    """The empty prompt (no tokens) in the shape family of ``conditioning``."""
    context = conditioning[0][0]
    b, _, width = context.shape
    extras = {k: v for k, v in conditioning[0][1].items() if k in ("num_layers_stacked", "lens_layers")}
    extras["pooled_output"] = None
    extras["attention_mask"] = torch.zeros((b, 0), dtype=torch.long, device=context.device)
    return [[context.new_zeros((b, 0, width)), extras]]


def repeat_to_batch(text: TextConditioning, batch: int) -> TextConditioning:
    """Repeat text rows to ``batch`` images: each prompt for ``batch // B`` consecutive images."""
    b = text.mask.shape[0]
    if b == batch:
        return text
    if batch % b:
        raise ValueError(f"{b} prompts cannot be spread over a batch of {batch} images")
    n = batch // b
    return TextConditioning([f.repeat_interleave(n, 0) for f in text.feats], text.mask.repeat_interleave(n, 0))


def text_batch(
    cond: TextConditioning, uncond: TextConditioning | None, cfg: float
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The text batch lens_core's sampler expects: ``cond`` alone when ``cfg == 1``, else
    ``[cond; uncond]`` padded to one length. No ``uncond`` means the empty prompt (zero features,
    all-False mask), as the ``lens`` CLI does for an empty negative prompt."""
    if cfg == 1.0:
        return list(cond.feats), cond.mask
    if uncond is None:
        uncond = TextConditioning(*empty_features(cond.feats, cond.mask))
    length = max(cond.mask.shape[1], uncond.mask.shape[1])
    c_feats, c_mask = pad_to_length(cond.feats, cond.mask, length)
    u_feats, u_mask = pad_to_length([f.to(c.dtype) for f, c in zip(uncond.feats, c_feats, strict=True)],
                                    uncond.mask, length)
    return [torch.cat([c, u]) for c, u in zip(c_feats, u_feats, strict=True)], torch.cat([c_mask, u_mask])


MODEL_PREFIX = "diffusion_model."
"""Where a ComfyUI BaseModel keeps the network: state-dict names are ``diffusion_model.<lens_core name>``."""


@dataclass
class LoraPatch:
    """One ComfyUI LoRA weight patch: ``W[offset] += strength * alpha / rank * up @ down``.

    ``alpha`` None means scaling 1 (as in ComfyUI). ``bias`` is the LoRA's bias delta, already
    multiplied by its scaling (a ComfyUI ``diff`` patch on ``bias_key``).
    """

    key: str
    offset: tuple[int, int, int] | None
    up: torch.Tensor
    down: torch.Tensor
    alpha: float | None
    bias_key: str
    bias: torch.Tensor | None = None


def lora_patches(
    modules: Mapping[tuple[str, int | None], LoraModule],
    shapes: Mapping[str, Sequence[int]],
    prefix: str = MODEL_PREFIX,
) -> list[LoraPatch]:
    """ComfyUI weight patches for LoRA modules parsed by :func:`lens_core.lora.read_lora`."""
    out = []
    for (name, part), m in modules.items():
        offset = None
        if part is not None:
            rows = int(shapes[name][0]) // 3
            offset = (0, part * rows, rows)
        bias = None if m.up_bias is None else m.up_bias.float() * m.scaling
        alpha = None if m.alpha is None else float(m.alpha)
        out.append(LoraPatch(f"{prefix}{name}.weight", offset, m.up, m.down, alpha, f"{prefix}{name}.bias", bias))
    return out


def lens_noise(seed: int, batch: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """``lens_core.sampling.initial_noise`` for seed ``seed`` in the LATENT layout ``[B, 128, h, w]``.

    The same seed therefore gives the same starting point as the ``lens`` CLI.
    """
    tokens = initial_noise(batch, grid_h * PATCH, grid_w * PATCH, int(seed))
    return unpack_latents(tokens, grid_h, grid_w)


class DeviceSafeRMSNorm(RMSNorm):
    """lens_core's RMSNorm that brings its scale to the input's device when they differ.

    ComfyUI's low-VRAM mode keeps the layers it cannot cast on the fly (anything not built from
    ``comfy.ops``) in host memory when the GPU is full; the tiny norm scales then must follow the
    activations. Same arithmetic as :class:`lens_core.layers.RMSNorm`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.weight.device == x.device else self.weight.to(x.device)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * weight.float()).to(x.dtype)


def make_norms_device_safe(module: torch.nn.Module) -> torch.nn.Module:
    """Turn every lens_core RMSNorm inside ``module`` into a DeviceSafeRMSNorm (same state)."""
    for m in module.modules():
        if type(m) is RMSNorm:
            m.__class__ = DeviceSafeRMSNorm
    return module
