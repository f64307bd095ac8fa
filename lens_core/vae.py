"""The FLUX.2 VAE used by Lens: encoder/decoder, latent normalisation and checkpoint naming.

Architecture (released config: ``block_out_channels=(128, 256, 512, 512)``, 2 resnets per encoder
block, 3 per decoder block, GroupNorm(32, eps 1e-6), one single-head self-attention in each mid
block, 32 latent channels at 1/8 resolution):

* encode: image ``[B, 3, H, W]`` in [-1, 1] -> encoder -> ``quant_conv`` -> posterior mean
  ``[B, 32, H/8, W/8]`` -> 2x2 patchify ``[B, 128, H/16, W/16]`` -> ``(z - running_mean) /
  sqrt(running_var + eps)`` with the ``bn`` running statistics (the latents the MMDiT sees).
* decode: the exact inverse, then ``post_quant_conv`` -> decoder -> clamp to [-1, 1].

Canonical tensor names (what ``Flux2VAE.state_dict()`` holds) follow diffusers'
``AutoencoderKLFlux2`` except that BatchNorm's ``num_batches_tracked`` counter is not kept::

    encoder.conv_in.{weight,bias}
    encoder.down_blocks.{i}.resnets.{j}.{norm1,conv1,norm2,conv2,conv_shortcut}.{weight,bias}
    encoder.down_blocks.{i}.downsamplers.0.conv.{weight,bias}        (all but the last block)
    {encoder,decoder}.mid_block.resnets.{0,1}.*
    {encoder,decoder}.mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}.{weight,bias}
                                                                     (to_* weights are 2-D [C, C])
    {encoder,decoder}.{conv_norm_out,conv_out}.{weight,bias}
    decoder.conv_in.{weight,bias}
    decoder.up_blocks.{i}.resnets.{j}.*   (i = 0 is the lowest resolution; j < layers_per_block + 1)
    decoder.up_blocks.{i}.upsamplers.0.conv.{weight,bias}            (all but the last block)
    quant_conv.{weight,bias}, post_quant_conv.{weight,bias}
    bn.running_mean, bn.running_var                                  (buffers, [4 * latent_channels])

``convert_vae_state_dict`` / ``vae_key_map`` also accept the Black Forest Labs naming (the
``ae.safetensors`` of FLUX.2 and ComfyUI's ``flux2-vae.safetensors``): ``encoder.down.{i}.block.{j}``,
``nin_shortcut``, ``downsample.conv``, ``mid.block_1/2``, ``mid.attn_1.{norm,q,k,v,proj_out}`` (1x1
convolutions, 4-D weights), ``norm_out``, ``decoder.up.{i}`` numbered from the highest resolution
(the reverse of ``up_blocks``), ``upsample.conv``, and ``quant_conv``/``post_quant_conv`` either at the
top level or inside ``encoder.``/``decoder.``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import CheckpointError
from .ops import DEFAULT_OPS

__all__ = [
    "VAEConfig",
    "Flux2VAE",
    "convert_vae_state_dict",
    "convert_vae_tensor",
    "vae_key_map",
    "check_flux2_vae",
    "pack_latents",
    "unpack_latents",
    "patchify_latents",
    "unpatchify_latents",
]

_RESNET_EPS = 1e-6
_NEEDED_FILE = (
    "Lens needs the FLUX.2 VAE: black-forest-labs FLUX.2 `ae.safetensors`, Comfy-Org "
    "`vae/flux2-vae.safetensors`, or a diffusers `vae/` folder (AutoencoderKLFlux2)."
)


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass
class VAEConfig:
    """Sizes of a FLUX.2 VAE; the defaults are the released FLUX.2 VAE.

    ``decoder_block_out_channels`` is ``None`` when the decoder mirrors the encoder (as released);
    a narrower decoder can be described by setting it (same length as ``block_out_channels``).
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 32
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    batch_norm_eps: float = 1e-4
    patch_size: tuple[int, int] = (2, 2)
    decoder_block_out_channels: tuple[int, ...] | None = field(default=None)

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        self.patch_size = tuple(int(p) for p in self.patch_size)  # type: ignore[assignment]
        if self.decoder_block_out_channels is not None:
            self.decoder_block_out_channels = tuple(int(c) for c in self.decoder_block_out_channels)
            if len(self.decoder_block_out_channels) != len(self.block_out_channels):
                raise ValueError(
                    "decoder_block_out_channels must have as many entries as block_out_channels "
                    f"({self.decoder_block_out_channels} vs {self.block_out_channels})"
                )
        if len(self.patch_size) != 2:
            raise ValueError(f"patch_size must be two integers, got {self.patch_size}")

    @property
    def decoder_channels(self) -> tuple[int, ...]:
        """Block widths of the decoder, listed from the highest resolution (like the encoder's)."""
        return self.decoder_block_out_channels or self.block_out_channels

    @property
    def patched_channels(self) -> int:
        """Channels of the patchified latent (128 for FLUX.2)."""
        return self.latent_channels * self.patch_size[0] * self.patch_size[1]

    @property
    def spatial_compression(self) -> int:
        """Image pixels per patchified-latent pixel along one axis (16 for FLUX.2)."""
        return 2 ** (len(self.block_out_channels) - 1) * self.patch_size[0]

    @classmethod
    def from_json(cls, d: Mapping[str, Any] | str | os.PathLike) -> VAEConfig:
        """Build from a diffusers ``AutoencoderKLFlux2`` config (a dict, or a path to the json).

        Unknown keys (``_class_name``, ``sample_size``, ``force_upcast``...) are ignored; settings
        this implementation does not support raise ValueError.
        """
        if isinstance(d, (str, os.PathLike)):
            d = json.loads(Path(d).read_text())
        d = dict(d)
        unsupported = {
            "act_fn": ("silu",),
            "mid_block_add_attention": (True,),
            "use_quant_conv": (True,),
            "use_post_quant_conv": (True,),
        }
        for key, allowed in unsupported.items():
            if key in d and d[key] not in allowed:
                raise ValueError(f"VAE config {key}={d[key]!r} is not supported (expected {allowed[0]!r})")
        for key, allowed_type in (
            ("down_block_types", "DownEncoderBlock2D"),
            ("up_block_types", "UpDecoderBlock2D"),
        ):
            if key in d and any(t != allowed_type for t in d[key]):
                raise ValueError(f"VAE config {key}={d[key]!r} is not supported (only {allowed_type})")
        kwargs: dict[str, Any] = {}
        for name in (
            "in_channels",
            "out_channels",
            "latent_channels",
            "block_out_channels",
            "layers_per_block",
            "norm_num_groups",
            "batch_norm_eps",
            "patch_size",
            "decoder_block_out_channels",
        ):
            if d.get(name) is not None:
                kwargs[name] = d[name]
        return cls(**kwargs)

    @classmethod
    def from_state_dict_shapes(cls, shapes: Mapping[str, tuple]) -> VAEConfig:
        """Infer the sizes from tensor shapes in canonical names (see ``vae_key_map``).

        ``norm_num_groups`` and ``batch_norm_eps`` cannot be read from shapes and keep the FLUX.2
        values (32, 1e-4). Raises ValueError when a tensor the inference needs is missing.
        """

        def shape(key: str) -> tuple[int, ...]:
            if key not in shapes:
                raise ValueError(f"VAE tensor '{key}' is missing")
            return tuple(int(s) for s in shapes[key])

        n_down = 0
        while f"encoder.down_blocks.{n_down}.resnets.0.conv1.weight" in shapes:
            n_down += 1
        if n_down == 0:
            raise ValueError("VAE tensor 'encoder.down_blocks.0.resnets.0.conv1.weight' is missing")
        block_out = tuple(shape(f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0] for i in range(n_down))
        layers = 0
        while f"encoder.down_blocks.0.resnets.{layers}.conv1.weight" in shapes:
            layers += 1
        dec_rev = []
        for i in range(n_down):
            dec_rev.append(shape(f"decoder.up_blocks.{i}.resnets.0.conv1.weight")[0])
        dec = tuple(reversed(dec_rev))
        latent = shape("decoder.conv_in.weight")[1]
        patch = (2, 2)
        if "bn.running_mean" in shapes:
            ratio = shape("bn.running_mean")[0] // max(latent, 1)
            side = math.isqrt(ratio)
            if side * side == ratio and side > 0:
                patch = (side, side)
        return cls(
            in_channels=shape("encoder.conv_in.weight")[1],
            out_channels=shape("decoder.conv_out.weight")[0],
            latent_channels=latent,
            block_out_channels=block_out,
            layers_per_block=layers,
            patch_size=patch,
            decoder_block_out_channels=None if dec == block_out else dec,
        )


# --------------------------------------------------------------------------------------------
# Checkpoint names
# --------------------------------------------------------------------------------------------

# Prefixes under which merged/pipeline checkpoints store the VAE (longest first).
_PREFIXES = ("model.first_stage_model.", "first_stage_model.", "autoencoder.", "vae.", "ae.")
_ROOTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "bn.")
_IGNORED = {"bn.num_batches_tracked"}

_BFL_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

_RX_NORM_OUT = re.compile(r"^(encoder|decoder)\.norm_out\.(.+)$")
_RX_DOWN_RES = re.compile(r"^encoder\.down\.(\d+)\.block\.(\d+)\.(.+)$")
_RX_DOWN_SAMPLE = re.compile(r"^encoder\.down\.(\d+)\.downsample\.conv\.(.+)$")
_RX_UP_RES = re.compile(r"^decoder\.up\.(\d+)\.block\.(\d+)\.(.+)$")
_RX_UP_SAMPLE = re.compile(r"^decoder\.up\.(\d+)\.upsample\.conv\.(.+)$")
_RX_MID_RES = re.compile(r"^(encoder|decoder)\.mid\.block_(\d+)\.(.+)$")
_RX_MID_ATTN = re.compile(r"^(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(.+)$")
_RX_LEGACY_ATTN = re.compile(
    r"^(encoder|decoder)\.mid_block\.attentions\.0\.(query|key|value|proj_attn)\.(.+)$"
)
_RX_BFL_UP_INDEX = re.compile(r"^decoder\.up\.(\d+)\.")
_RX_ATTN_PROJ = re.compile(
    r"^(encoder|decoder)\.mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$"
)


def _resnet_param(rest: str) -> str:
    return rest.replace("nin_shortcut", "conv_shortcut", 1)


def _canonical_name(key: str, n_up: int) -> str:
    """Canonical name of one prefix-free VAE key; diffusers names come back unchanged."""
    if key.startswith("encoder.quant_conv."):
        return key[len("encoder.") :]
    if key.startswith("decoder.post_quant_conv."):
        return key[len("decoder.") :]
    if m := _RX_NORM_OUT.match(key):
        return f"{m[1]}.conv_norm_out.{m[2]}"
    if m := _RX_DOWN_RES.match(key):
        return f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{_resnet_param(m[3])}"
    if m := _RX_DOWN_SAMPLE.match(key):
        return f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
    if m := _RX_UP_RES.match(key):
        return f"decoder.up_blocks.{n_up - 1 - int(m[1])}.resnets.{m[2]}.{_resnet_param(m[3])}"
    if m := _RX_UP_SAMPLE.match(key):
        return f"decoder.up_blocks.{n_up - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"
    if m := _RX_MID_RES.match(key):
        return f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{_resnet_param(m[3])}"
    if m := _RX_MID_ATTN.match(key):
        return f"{m[1]}.mid_block.attentions.0.{_BFL_ATTN[m[2]]}.{m[3]}"
    if m := _RX_LEGACY_ATTN.match(key):
        return f"{m[1]}.mid_block.attentions.0.{_LEGACY_ATTN[m[2]]}.{m[3]}"
    return key


def vae_key_map(keys: Iterable[str]) -> dict[str, str]:
    """Map the tensor names of a VAE checkpoint (BFL or diffusers naming) to canonical names.

    A known prefix (``first_stage_model.``, ``vae.``, ``ae.``...) is detected and stripped; when one
    is present only the keys under it are kept (the rest of a merged checkpoint is ignored).
    Only keys under ``encoder.``, ``decoder.``, ``quant_conv.``, ``post_quant_conv.`` and ``bn.``
    are returned, so an empty result means "no VAE here"; ``bn.num_batches_tracked`` is left
    out (the model has no such buffer). Keys under those roots that no rule knows are passed
    through unchanged, so a strict load names them.

    Returns ``{source key: canonical key}``. Tensor values may also need ``convert_vae_tensor``
    (BFL attention weights are 4-D 1x1 convs, ours are 2-D).
    """
    keys = list(keys)
    prefix = ""
    for p in _PREFIXES:
        if any(k.startswith(p + "encoder.") or k.startswith(p + "decoder.") for k in keys):
            prefix = p
            break
    stripped = {k: k[len(prefix) :] for k in keys if k.startswith(prefix)}
    up_indices = [int(m[1]) for s in stripped.values() if (m := _RX_BFL_UP_INDEX.match(s))]
    n_up = max(up_indices) + 1 if up_indices else 0
    out: dict[str, str] = {}
    for src, k in stripped.items():
        if not k.startswith(_ROOTS) or k in _IGNORED:
            continue
        out[src] = _canonical_name(k, n_up)
    return out


def convert_vae_tensor(canonical_key: str, tensor: torch.Tensor) -> torch.Tensor:
    """Bring one tensor to the layout the canonical module expects.

    Only the mid-block attention projections change: a 1x1-conv weight ``[C, C, 1, 1]`` (or a
    conv1d ``[C, C, 1]``) becomes the linear weight ``[C, C]`` (a view, no copy). Everything else
    is returned as is.
    """
    if tensor.ndim > 2 and _RX_ATTN_PROJ.match(canonical_key):
        return tensor.reshape(tensor.shape[0], tensor.shape[1])
    return tensor


def convert_vae_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a BFL/ComfyUI or diffusers FLUX.2 VAE state dict to canonical names.

    ``Flux2VAE(cfg).load_state_dict(convert_vae_state_dict(sd))`` loads strictly for both
    layouts. Values are the input tensors (attention projections reshaped to 2-D views).
    """
    mapping = vae_key_map(sd.keys())
    return {new: convert_vae_tensor(new, sd[old]) for old, new in mapping.items()}


def _attn_shape(key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) > 2 and _RX_ATTN_PROJ.match(key):
        return shape[:2]
    return shape


def check_flux2_vae(shapes: Mapping[str, tuple]) -> None:
    """Raise ValueError (a ``CheckpointError`` without path) unless ``shapes`` is a FLUX.2 VAE.

    ``shapes`` maps canonical names (see ``vae_key_map``) to tensor shapes. The message says what
    the file looks like instead (FLUX.1/SD3 VAE, SD/SDXL VAE, a video VAE, missing bn stats...)
    and which file Lens needs.
    """
    s = {k: tuple(int(x) for x in v) for k, v in shapes.items()}

    def fail(what: str) -> None:
        raise CheckpointError(None, f"{what} {_NEEDED_FILE}")

    if not any(k.startswith(("encoder.", "decoder.")) for k in s):
        fail("This is not a VAE (no encoder/decoder tensors).")
    for key in ("decoder.conv_in.weight", "encoder.conv_out.weight", "encoder.conv_in.weight"):
        if key not in s:
            part = key.split(".")[0]
            fail(f"This VAE file is incomplete or of another kind: it has no '{key}' (no {part}).")
    dec_in = s["decoder.conv_in.weight"]
    if len(dec_in) != 4:
        fail(
            f"This looks like a video VAE (decoder.conv_in weight is {len(dec_in)}-D, e.g. Wan or "
            "HunyuanVideo), not the FLUX.2 image VAE."
        )
    latent = dec_in[1]
    has_bn = "bn.running_mean" in s and "bn.running_var" in s
    has_quant = "quant_conv.weight" in s and "post_quant_conv.weight" in s
    if latent == 4:
        fail("This looks like a Stable Diffusion 1.x/2.x/SDXL VAE (4 latent channels), not the FLUX.2 VAE.")
    if latent == 16:
        extra = "" if has_quant or has_bn else ", no quant_conv, no latent batch-norm stats"
        fail(f"This looks like a FLUX.1 or SD3 VAE (16 latent channels{extra}), not the FLUX.2 VAE.")
    if latent != 32:
        fail(f"This VAE has {latent} latent channels; the FLUX.2 VAE has 32.")
    if not has_bn:
        fail(
            "This VAE has 32 latent channels but no 'bn.running_mean'/'bn.running_var' (the FLUX.2 "
            "latent normalisation statistics); the file was probably exported without them."
        )
    if not has_quant:
        fail("This 32-channel VAE has no quant_conv/post_quant_conv, which the FLUX.2 VAE has.")
    patched = s["bn.running_mean"]
    if patched != (4 * latent,) or s["bn.running_var"] != (4 * latent,):
        fail(
            f"The latent batch-norm stats have shape {patched}/{s['bn.running_var']}, expected "
            f"({4 * latent},) for 2x2-patchified 32-channel latents."
        )
    if s["encoder.conv_out.weight"][0] != 2 * latent or s["quant_conv.weight"][:2] != (
        2 * latent,
        2 * latent,
    ):
        fail(
            f"The encoder output ({s['encoder.conv_out.weight'][0]} channels) / quant_conv "
            f"{s['quant_conv.weight']} do not match a 32-channel FLUX.2 VAE (expected 64)."
        )
    for part in ("encoder", "decoder"):
        key = f"{part}.mid_block.attentions.0.to_q.weight"
        if key not in s:
            fail(f"This VAE has no {part} mid-block attention ('{key}'), which the FLUX.2 VAE has.")
        if len(_attn_shape(key, s[key])) != 2:
            fail(f"Unexpected shape {s[key]} for '{key}'.")


# --------------------------------------------------------------------------------------------
# Latent layout helpers
# --------------------------------------------------------------------------------------------


def patchify_latents(z: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, C*p*p, H/p, W/p]``; output channel ``c*p*p + py*p + px``."""
    b, c, h, w = z.shape
    z = z.reshape(b, c, h // patch, patch, w // patch, patch)
    return z.permute(0, 1, 3, 5, 2, 4).reshape(b, c * patch * patch, h // patch, w // patch)


def unpatchify_latents(z: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """Inverse of ``patchify_latents``: ``[B, C*p*p, h, w]`` -> ``[B, C, h*p, w*p]``."""
    b, cp, h, w = z.shape
    c = cp // (patch * patch)
    z = z.reshape(b, c, patch, patch, h, w)
    return z.permute(0, 1, 4, 2, 5, 3).reshape(b, c, h * patch, w * patch)


def pack_latents(z: torch.Tensor) -> torch.Tensor:
    """Patchified latents ``[B, C, h, w]`` -> MMDiT tokens ``[B, h*w, C]`` (row-major tokens).

    Channel ``c*4 + p1*2 + p2`` of a token is latent channel ``c`` at sub-pixel ``(p1, p2)``,
    i.e. the tokens satisfy ``rearrange('b (h w) (c p1 p2) -> b c (h p1) (w p2)')`` = the
    unpatchified 32-channel latent.
    """
    b, c, h, w = z.shape
    return z.reshape(b, c, h * w).transpose(1, 2)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of ``pack_latents``: tokens ``[B, h*w, C]`` -> ``[B, C, h, w]``."""
    b, n, c = tokens.shape
    if n != h * w:
        raise ValueError(f"unpack_latents: {n} tokens cannot be laid out as {h}x{w}")
    return tokens.transpose(1, 2).reshape(b, c, h, w)


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-Conv3x3 twice plus a (1x1-projected when widths differ) skip.

    Shapes: ``[B, in_ch, H, W]`` -> ``[B, out_ch, H, W]``.
    """

    def __init__(self, in_ch: int, out_ch: int, groups: int, operations=DEFAULT_OPS, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.norm1 = operations.GroupNorm(groups, in_ch, eps=_RESNET_EPS, affine=True, **kw)
        self.conv1 = operations.Conv2d(in_ch, out_ch, 3, stride=1, padding=1, **kw)
        self.norm2 = operations.GroupNorm(groups, out_ch, eps=_RESNET_EPS, affine=True, **kw)
        self.conv2 = operations.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, **kw)
        self.conv_shortcut = operations.Conv2d(in_ch, out_ch, 1, **kw) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Downsample(nn.Module):
    """Pad right/bottom by one, then Conv3x3 stride 2: ``[B, C, H, W]`` -> ``[B, C, H/2, W/2]``."""

    def __init__(self, ch: int, operations=DEFAULT_OPS, device=None, dtype=None):
        super().__init__()
        self.conv = operations.Conv2d(ch, ch, 3, stride=2, padding=0, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest 2x upsampling, then Conv3x3: ``[B, C, H, W]`` -> ``[B, C, 2H, 2W]``."""

    def __init__(self, ch: int, operations=DEFAULT_OPS, device=None, dtype=None):
        super().__init__()
        self.conv = operations.Conv2d(ch, ch, 3, stride=1, padding=1, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels with a residual connection.

    Shapes: ``[B, C, H, W]`` -> ``[B, C, H, W]``; attention runs on ``[B, 1, H*W, C]`` through
    ``F.scaled_dot_product_attention`` (no ``(H*W)^2`` matrix on backends with fused kernels).
    """

    def __init__(self, ch: int, groups: int, operations=DEFAULT_OPS, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.group_norm = operations.GroupNorm(groups, ch, eps=_RESNET_EPS, affine=True, **kw)
        self.to_q = operations.Linear(ch, ch, bias=True, **kw)
        self.to_k = operations.Linear(ch, ch, bias=True, **kw)
        self.to_v = operations.Linear(ch, ch, bias=True, **kw)
        self.to_out = nn.ModuleList([operations.Linear(ch, ch, bias=True, **kw)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.group_norm(x).reshape(b, c, h * w).transpose(1, 2)  # [B, HW, C]
        q = self.to_q(y).unsqueeze(1)  # [B, 1, HW, C]
        k = self.to_k(y).unsqueeze(1)
        v = self.to_v(y).unsqueeze(1)
        del y
        o = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # [B, HW, C]
        del q, k, v
        o = self.to_out[0](o)
        return x + o.transpose(1, 2).reshape(b, c, h, w)


class MidBlock(nn.Module):
    """resnet -> attention -> resnet at the lowest resolution, width ``ch``."""

    def __init__(self, ch: int, groups: int, operations=DEFAULT_OPS, device=None, dtype=None):
        super().__init__()
        kw = {"operations": operations, "device": device, "dtype": dtype}
        self.resnets = nn.ModuleList([ResnetBlock(ch, ch, groups, **kw), ResnetBlock(ch, ch, groups, **kw)])
        self.attentions = nn.ModuleList([AttnBlock(ch, groups, **kw)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


class ResnetStage(nn.Module):
    """``n`` resnets then an optional stride-2 ``"down"``sample or nearest-2x ``"up"``sample + conv.

    The resampler sits in ``downsamplers``/``upsamplers`` (diffusers' names, kept in the state dict).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        n: int,
        groups: int,
        resample: str | None,
        operations=DEFAULT_OPS,
        device=None,
        dtype=None,
    ):
        super().__init__()
        kw = {"operations": operations, "device": device, "dtype": dtype}
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_ch if j == 0 else out_ch, out_ch, groups, **kw) for j in range(n)]
        )
        self.resample = {"down": "downsamplers", "up": "upsamplers", None: None}[resample]
        if self.resample is not None:
            layer = Downsample(out_ch, **kw) if resample == "down" else Upsample(out_ch, **kw)
            setattr(self, self.resample, nn.ModuleList([layer]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.resnets:
            x = r(x)
        if self.resample is not None:
            x = getattr(self, self.resample)[0](x)
        return x


class Encoder(nn.Module):
    """Image ``[B, in_ch, H, W]`` -> moments ``[B, 2*latent, H/2^(n-1), W/2^(n-1)]`` (mean, logvar)."""

    def __init__(self, cfg: VAEConfig, operations=DEFAULT_OPS, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        okw = {"operations": operations, **kw}
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = operations.Conv2d(cfg.in_channels, ch[0], 3, stride=1, padding=1, **kw)
        self.down_blocks = nn.ModuleList(
            [
                ResnetStage(
                    ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, "down" if i < len(ch) - 1 else None, **okw
                )
                for i in range(len(ch))
            ]
        )
        self.mid_block = MidBlock(ch[-1], g, **okw)
        self.conv_norm_out = operations.GroupNorm(g, ch[-1], eps=_RESNET_EPS, affine=True, **kw)
        self.conv_out = operations.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, stride=1, padding=1, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for blk in self.down_blocks:
            x = blk(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latent ``[B, latent, h, w]`` -> image ``[B, out_ch, h*2^(n-1), w*2^(n-1)]`` (not clamped)."""

    def __init__(self, cfg: VAEConfig, operations=DEFAULT_OPS, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        okw = {"operations": operations, **kw}
        rev, g = tuple(reversed(cfg.decoder_channels)), cfg.norm_num_groups
        self.conv_in = operations.Conv2d(cfg.latent_channels, rev[0], 3, stride=1, padding=1, **kw)
        self.mid_block = MidBlock(rev[0], g, **okw)
        self.up_blocks = nn.ModuleList(
            [
                ResnetStage(
                    rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1, g, "up" if i < len(rev) - 1 else None, **okw
                )
                for i in range(len(rev))
            ]
        )
        self.conv_norm_out = operations.GroupNorm(g, rev[-1], eps=_RESNET_EPS, affine=True, **kw)
        self.conv_out = operations.Conv2d(rev[-1], cfg.out_channels, 3, stride=1, padding=1, **kw)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for blk in self.up_blocks:
            x = blk(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class LatentNorm(nn.Module):
    """The FLUX.2 latent BatchNorm, inference only: fixed running statistics, no affine.

    Buffers ``running_mean`` / ``running_var`` ``[C]`` (C = 128) are kept in the state dict in
    whatever dtype the model was built with; the arithmetic always runs in fp32.
    """

    def __init__(self, channels: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.register_buffer("running_mean", torch.zeros(channels, device=device, dtype=dtype))
        self.register_buffer("running_var", torch.ones(channels, device=device, dtype=dtype))

    def _stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.running_mean.to(device=z.device, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.sqrt(
            self.running_var.to(device=z.device, dtype=torch.float32).view(1, -1, 1, 1) + self.eps
        )
        return mean, std

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w]`` -> fp32 ``(z - mean) / sqrt(var + eps)``."""
        mean, std = self._stats(z)
        return (z.float() - mean) / std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of ``normalize``: fp32 ``z * sqrt(var + eps) + mean``."""
        mean, std = self._stats(z)
        return z.float() * std + mean


def _module_dtype(module: nn.Module) -> torch.dtype:
    """The first floating parameter dtype of at least 16 bits (fp8/int storage is skipped)."""
    for p in module.parameters():
        if p.is_floating_point() and p.element_size() >= 2:
            return p.dtype
    return torch.float32


class Flux2VAE(nn.Module):
    """The FLUX.2 autoencoder with Lens' latent normalisation built in.

    Build on the meta device and fill with ``load_state_dict(convert_vae_state_dict(sd),
    assign=True)``; both BFL and diffusers checkpoints load strictly. Compute runs in the
    weights' dtype (bf16 or fp32; set ``compute_dtype`` to override, e.g. for quantised
    operations); the latent normalisation always runs in fp32.
    """

    def __init__(self, config: VAEConfig, operations=DEFAULT_OPS, device=None, dtype=None) -> None:
        super().__init__()
        self.config = config
        self.compute_dtype: torch.dtype | None = None
        kw = {"device": device, "dtype": dtype}
        lat = config.latent_channels
        self.encoder = Encoder(config, operations=operations, **kw)
        self.decoder = Decoder(config, operations=operations, **kw)
        self.quant_conv = operations.Conv2d(2 * lat, 2 * lat, 1, **kw)
        self.post_quant_conv = operations.Conv2d(lat, lat, 1, **kw)
        self.bn = LatentNorm(config.patched_channels, config.batch_norm_eps, **kw)

    def _dtype(self, module: nn.Module) -> torch.dtype:
        return self.compute_dtype or _module_dtype(module)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [-1, 1] -> normalised patchified latents, fp32.

        Output ``[B, 4*latent_channels, H/16, W/16]`` (128 channels for FLUX.2): posterior mean,
        2x2 patchify (channel ``c*4 + py*2 + px``), then ``(z - running_mean) / sqrt(running_var
        + eps)``. H and W must be multiples of ``config.spatial_compression`` (16).
        """
        cfg = self.config
        f = cfg.spatial_compression
        if images.ndim != 4 or images.shape[1] != cfg.in_channels:
            raise ValueError(f"encode expects images [B, {cfg.in_channels}, H, W], got {tuple(images.shape)}")
        if images.shape[-2] % f or images.shape[-1] % f:
            raise ValueError(
                f"encode: image size {images.shape[-2]}x{images.shape[-1]} must be a multiple of {f} "
                "on both sides (crop or resize it first)"
            )
        moments = self.encoder(images.to(self._dtype(self.encoder)))
        moments = self.quant_conv(moments.to(self._dtype(self.quant_conv)))
        mean = moments[:, : cfg.latent_channels].float()
        return self.bn.normalize(patchify_latents(mean, cfg.patch_size[0]))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised patchified latents ``[B, 4*latent_channels, h, w]`` -> images, fp32.

        Output ``[B, 3, 16h, 16w]`` clamped to [-1, 1]. Inverse of ``encode``'s normalisation
        (fp32), unpatchify, ``post_quant_conv``, decoder.
        """
        cfg = self.config
        if latents.ndim != 4 or latents.shape[1] != cfg.patched_channels:
            raise ValueError(
                f"decode expects latents [B, {cfg.patched_channels}, h, w], got {tuple(latents.shape)}"
                + (" (tokens? use unpack_latents first)" if latents.ndim == 3 else "")
            )
        z = unpatchify_latents(self.bn.denormalize(latents), cfg.patch_size[0])
        z = self.post_quant_conv(z.to(self._dtype(self.post_quant_conv)))
        out = self.decoder(z.to(self._dtype(self.decoder)))
        return out.float().clamp_(-1.0, 1.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruction: ``decode(encode(images))``, ``[B, 3, H, W]`` -> ``[B, 3, H, W]``."""
        return self.decode(self.encode(images))
