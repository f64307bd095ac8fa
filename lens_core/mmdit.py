"""The Lens denoiser: a 3.8B-parameter dual-stream MMDiT.

Every block keeps separate weights for the image stream and the text stream and mixes them in one
joint attention over the concatenated sequence ``[image tokens, text tokens]``. The module and
parameter names follow the released checkpoints exactly (diffusers folder and the Comfy-Org single
files), so a checkpoint loads with ``load_state_dict(strict=True)`` and no renaming.

Layers are built through an ``operations`` object (see :mod:`lens_core.ops`) so quantised linears
can replace ``nn.Linear`` without touching this file.

Shapes used in the docstrings:
    B batch, N image tokens (h * w latent positions, row-major), S text tokens,
    D inner width (heads * head_dim), H heads, Dh head_dim.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from .layers import RMSNorm
from .ops import DEFAULT_OPS

__all__ = [
    "MMDiTConfig",
    "LensMMDiT",
    "LensMMDiTBlock",
    "apply_rope",
    "build_joint_attention_mask",
    "rope_cos_sin",
    "rope_positions",
    "timestep_features",
]

TIMESTEP_CHANNELS = 256
"""Width of the sinusoidal timestep features fed to ``time_text_embed.timestep_embedder.linear_1``."""

_BLOCK_NORM_EPS = 1e-6  # img/txt norm1/norm2 and the final LayerNorm
_QK_NORM_EPS = 1e-6  # the upstream code hands the block's eps (1e-6) to the per-head q/k norms
_TXT_NORM_EPS = 1e-5  # per-layer RMSNorm on the encoder features


@dataclass
class MMDiTConfig:
    """Sizes of a Lens MMDiT. The defaults are the released model (4,104,225,152 parameters).

    ``out_channels`` counts channels per latent pixel before the 2x2 patchify, so ``proj_out``
    produces ``patch_size**2 * out_channels`` (= 128) values per token.
    ``selected_layer_index`` (which GPT-OSS layers feed the model) is metadata for the text
    encoder; the model itself only needs ``num_text_layers``.
    """

    in_channels: int = 128
    patch_size: int = 2
    out_channels: int = 32
    num_layers: int = 48
    num_attention_heads: int = 24
    attention_head_dim: int = 64
    enc_hidden_dim: int = 2880
    num_text_layers: int = 4
    mlp_hidden_dim: int = 4096
    axes_dims_rope: tuple[int, int, int] = (8, 28, 28)
    rope_theta: float = 10000.0
    selected_layer_index: tuple[int, ...] = (5, 11, 17, 23)

    def __post_init__(self) -> None:
        self.axes_dims_rope = tuple(int(a) for a in self.axes_dims_rope)  # type: ignore[assignment]
        self.selected_layer_index = tuple(int(i) for i in self.selected_layer_index)
        if len(self.axes_dims_rope) != 3 or any(a <= 0 or a % 2 for a in self.axes_dims_rope):
            raise ValueError(f"axes_dims_rope must be three positive even sizes, got {self.axes_dims_rope}")
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"axes_dims_rope {self.axes_dims_rope} must sum to attention_head_dim "
                f"{self.attention_head_dim} (RoPE rotates the whole head)"
            )
        for name in (
            "in_channels",
            "patch_size",
            "out_channels",
            "num_layers",
            "num_attention_heads",
            "enc_hidden_dim",
            "num_text_layers",
            "mlp_hidden_dim",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"MMDiTConfig.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def inner_dim(self) -> int:
        """Transformer width D = heads * head_dim (1536 for the release)."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_dim(self) -> int:
        """Values ``proj_out`` produces per token (128 for the release)."""
        return self.patch_size * self.patch_size * self.out_channels

    @classmethod
    def from_json(cls, d: Mapping) -> MMDiTConfig:
        """Build from a diffusers ``transformer/config.json`` dict.

        Keys starting with ``_`` and keys this class does not know are ignored. The upstream config
        has no MLP width; it is ``int(inner_dim / 3 * 8)`` as in the upstream code. Raises
        ``ValueError`` for architecture switches this implementation does not have
        (``gate_mlp``/``rms_norm``/``multi_layer_encoder_feature`` false) or an ``inner_dim`` that
        contradicts heads * head_dim.
        """
        for flag in ("gate_mlp", "rms_norm", "multi_layer_encoder_feature"):
            if flag in d and not d[flag]:
                raise ValueError(
                    f"transformer config sets {flag}=false; only the released Lens layout is supported"
                )
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if not k.startswith("_") and k in known}
        if kwargs.get("out_channels", 0) is None:  # upstream treats a null out_channels as in_channels
            kwargs["out_channels"] = kwargs.get("in_channels", cls.in_channels)
        for key in ("axes_dims_rope", "selected_layer_index"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        if "num_text_layers" not in kwargs and "selected_layer_index" in kwargs:
            kwargs["num_text_layers"] = len(kwargs["selected_layer_index"])
        heads = int(kwargs.get("num_attention_heads", cls.num_attention_heads))
        head_dim = int(kwargs.get("attention_head_dim", cls.attention_head_dim))
        inner = heads * head_dim
        if "inner_dim" in d and d["inner_dim"] is not None and int(d["inner_dim"]) != inner:
            raise ValueError(
                f"transformer config inner_dim={d['inner_dim']} contradicts "
                f"num_attention_heads*attention_head_dim = {heads}*{head_dim} = {inner}"
            )
        # Same expression as upstream, so widths that are not multiples of 3 round identically.
        kwargs.setdefault("mlp_hidden_dim", int(inner / 3 * 8))
        return cls(**kwargs)

    @classmethod
    def from_state_dict_shapes(cls, shapes: Mapping[str, Sequence[int]]) -> MMDiTConfig:
        """Infer every size from the (logical, unquantised) shapes of checkpoint tensors.

        ``shapes`` maps state-dict names without any prefix to shapes (``torch.Size`` works).
        ``patch_size`` cannot be seen in the weights and is taken as 2 (the only released value);
        ``axes_dims_rope`` stays (8, 28, 28), so head_dim must be 64. ``selected_layer_index``
        keeps the released (5, 11, 17, 23) when there are 4 text layers, else ``range(n)``.
        Raises ``ValueError`` naming the missing or inconsistent tensor when the shapes are not
        a Lens MMDiT.
        """

        def need(name: str) -> tuple[int, ...]:
            if name not in shapes:
                raise ValueError(f"not a Lens MMDiT state dict: tensor '{name}' is missing")
            return tuple(int(s) for s in shapes[name])

        def bad(name: str, shape: tuple[int, ...], expected: str) -> ValueError:
            return ValueError(
                f"not a Lens MMDiT state dict: tensor '{name}' has shape {shape}, expected {expected}"
            )

        img_in = need("img_in.weight")
        if len(img_in) != 2:
            raise bad("img_in.weight", img_in, "[inner_dim, in_channels]")
        inner, in_channels = img_in

        block_ids = {int(m.group(1)) for k in shapes if (m := re.match(r"transformer_blocks\.(\d+)\.", k))}
        if not block_ids:
            need("transformer_blocks.0.attn.img_qkv.weight")
        num_layers = max(block_ids) + 1
        for i in range(num_layers):
            qkv = need(f"transformer_blocks.{i}.attn.img_qkv.weight")
            if qkv != (3 * inner, inner):
                raise bad(f"transformer_blocks.{i}.attn.img_qkv.weight", qkv, f"[{3 * inner}, {inner}]")

        norm_q = need("transformer_blocks.0.attn.norm_q.weight")
        head_dim = norm_q[0]
        if inner % head_dim:
            raise bad(
                "transformer_blocks.0.attn.norm_q.weight", norm_q, f"a head_dim dividing inner_dim {inner}"
            )
        heads = inner // head_dim

        enc_dim = need("txt_norm.0.weight")[0]
        num_text_layers = 0
        while f"txt_norm.{num_text_layers}.weight" in shapes:
            num_text_layers += 1
        txt_in = need("txt_in.weight")
        if txt_in != (inner, enc_dim * num_text_layers):
            raise bad("txt_in.weight", txt_in, f"[{inner}, {enc_dim} * {num_text_layers} text layers]")

        w1 = need("transformer_blocks.0.img_mlp.w1.weight")
        mlp_hidden = w1[0]
        mod = need("transformer_blocks.0.img_mod.1.weight")
        if mod != (6 * inner, inner):
            raise bad("transformer_blocks.0.img_mod.1.weight", mod, f"[{6 * inner}, {inner}]")
        t1 = need("time_text_embed.timestep_embedder.linear_1.weight")
        if t1 != (inner, TIMESTEP_CHANNELS):
            raise bad(
                "time_text_embed.timestep_embedder.linear_1.weight", t1, f"[{inner}, {TIMESTEP_CHANNELS}]"
            )
        need("norm_out.linear.weight")

        patch_size = cls.patch_size
        proj = need("proj_out.weight")
        if len(proj) != 2 or proj[1] != inner or proj[0] % (patch_size * patch_size):
            raise bad("proj_out.weight", proj, f"[{patch_size}**2 * out_channels, {inner}]")

        if sum(cls.axes_dims_rope) != head_dim:
            raise ValueError(
                f"not a Lens MMDiT state dict: head_dim {head_dim} (from transformer_blocks.0.attn.norm_q.weight) "
                f"does not fit the Lens RoPE axes {cls.axes_dims_rope}"
            )
        default_sel = cls.selected_layer_index
        selected = default_sel if num_text_layers == len(default_sel) else tuple(range(num_text_layers))
        return cls(
            in_channels=in_channels,
            patch_size=patch_size,
            out_channels=proj[0] // (patch_size * patch_size),
            num_layers=num_layers,
            num_attention_heads=heads,
            attention_head_dim=head_dim,
            enc_hidden_dim=enc_dim,
            num_text_layers=num_text_layers,
            mlp_hidden_dim=mlp_hidden,
            selected_layer_index=selected,
        )


# ---------------------------------------------------------------------------------------------
# Timestep features and RoPE (pure functions: nothing here lives in the state dict)
# ---------------------------------------------------------------------------------------------


def timestep_features(sigma: torch.Tensor, channels: int = TIMESTEP_CHANNELS) -> torch.Tensor:
    """Sinusoidal features of ``1000 * sigma``, always in fp32.

    Args:
        sigma: ``[B]`` noise level in [0, 1] (any float dtype; upcast before use).
    Returns:
        ``[B, channels]`` fp32, cosines first then sines (``flip_sin_to_cos``), frequency
        ``10000 ** (-i / (channels / 2))``.
    Why fp32: arguments reach 1000 rad; bf16 rounding of ``1000 * sigma`` alone shifts the
    velocity by >10% mid-schedule.
    """
    half = channels // 2
    idx = torch.arange(half, dtype=torch.float32, device=sigma.device)
    freqs = torch.exp(idx * -math.log(10000.0) / half)
    # (sigma * freq) * 1000, in that order, to round exactly like the upstream embedding.
    args = (sigma.float()[:, None] * freqs[None, :]) * 1000.0
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_positions(h: int, w: int, text_len: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Positions ``(frame, row, col)`` of the joint sequence, fp32 ``[h*w + text_len, 3]``.

    Image tokens (row-major) get frame 0 and *centred* row/column indices: rows run
    ``-(h - h//2) .. h//2 - 1`` and columns likewise, so the grid centre sits near 0 whatever the
    aspect ratio. Text token j continues after the largest positive image index: it gets
    ``max(h//2, w//2) + j`` on all three axes.
    """
    rows = torch.arange(h, dtype=torch.float32, device=device) - (h - h // 2)
    cols = torch.arange(w, dtype=torch.float32, device=device) - (w - w // 2)
    img = torch.stack(
        [
            torch.zeros(h, w, dtype=torch.float32, device=device),
            rows[:, None].expand(h, w),
            cols[None, :].expand(h, w),
        ],
        dim=-1,
    ).reshape(h * w, 3)
    start = max(h // 2, w // 2)
    txt = torch.arange(start, start + text_len, dtype=torch.float32, device=device)[:, None].expand(
        text_len, 3
    )
    return torch.cat([img, txt], dim=0)


def rope_cos_sin(
    positions: torch.Tensor, axes_dims: Sequence[int] = (8, 28, 28), theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation tables for :func:`apply_rope`.

    Args:
        positions: ``[L, 3]`` from :func:`rope_positions`.
    Returns:
        ``(cos, sin)``, each fp32 ``[L, sum(axes_dims) // 2]``: axis a contributes ``axes_dims[a] // 2``
        frequencies ``theta ** (-2i / axes_dims[a])``.
    The angles are formed in fp32 as ``position * inv_freq`` (one rounding), which is how the
    released model was trained; fp64 angles would differ by up to ~1e-4 rad at large positions.
    """
    positions = positions.float()
    angles = []
    for axis, dim in enumerate(axes_dims):
        exponent = torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim
        inv_freq = 1.0 / torch.pow(theta, exponent)
        angles.append(positions[:, axis, None] * inv_freq[None, :])
    ang = torch.cat(angles, dim=-1)
    return torch.cos(ang), torch.sin(ang)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs ``(x[2i], x[2i+1])`` by the table angles.

    Args:
        x: ``[B, L, H, Dh]`` queries or keys.
        cos, sin: ``[L, Dh // 2]`` (fp32 from :func:`rope_cos_sin`).
    Returns:
        ``[B, L, H, Dh]`` in x's dtype. The rotation runs in fp32 (as upstream) so bf16 models
        keep exact relative positions.
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs.unbind(-1)
    c = cos[:, None, :]  # broadcast over heads
    s = sin[:, None, :]
    out = torch.stack((even * c - odd * s, even * s + odd * c), dim=-1)
    return out.flatten(-2).to(x.dtype)


def build_joint_attention_mask(txt_mask: torch.Tensor, num_image_tokens: int) -> torch.Tensor:
    """Boolean key mask for SDPA over ``[image, text]``: ``[B, 1, 1, N + S]``, True = attend.

    Image keys are always valid, so even an all-False text mask (empty negative prompt) leaves
    every query at least N keys and the softmax never sees an empty row.
    """
    b = txt_mask.shape[0]
    img = torch.ones(b, num_image_tokens, dtype=torch.bool, device=txt_mask.device)
    return torch.cat([img, txt_mask.to(torch.bool)], dim=1)[:, None, None, :]


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


class TimestepEmbedder(nn.Module):
    """``linear_2(silu(linear_1(features)))``: ``[B, 256] -> [B, D]``."""

    def __init__(self, in_channels: int, dim: int, operations=DEFAULT_OPS, device=None, dtype=None) -> None:
        super().__init__()
        self.linear_1 = operations.Linear(in_channels, dim, device=device, dtype=dtype)
        self.linear_2 = operations.Linear(dim, dim, device=device, dtype=dtype)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(features)))


class TimeTextEmbed(nn.Module):
    """Holds ``timestep_embedder`` so its weights sit at ``time_text_embed.timestep_embedder.*``."""

    def __init__(self, dim: int, operations=DEFAULT_OPS, device=None, dtype=None) -> None:
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(TIMESTEP_CHANNELS, dim, operations, device, dtype)

    def forward(self, sigma: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``sigma [B]`` -> ``temb [B, D]`` in ``dtype``; features built in fp32, then cast."""
        return self.timestep_embedder(timestep_features(sigma).to(dtype))


class SwiGLU(nn.Module):
    """``w2(silu(w1 x) * w3 x)``, no biases: ``[..., D] -> [..., D]``."""

    def __init__(self, dim: int, hidden: int, operations=DEFAULT_OPS, device=None, dtype=None) -> None:
        super().__init__()
        self.w1 = operations.Linear(dim, hidden, bias=False, device=device, dtype=dtype)
        self.w2 = operations.Linear(hidden, dim, bias=False, device=device, dtype=dtype)
        self.w3 = operations.Linear(dim, hidden, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class JointAttention(nn.Module):
    """One softmax attention over the concatenation of both streams, with per-stream weights.

    Each stream has a fused qkv projection (``[q | k | v]``, each ``[H, Dh]``, head-major),
    per-head RMSNorm on q and k, and its own output projection.
    """

    def __init__(
        self, dim: int, heads: int, head_dim: int, operations=DEFAULT_OPS, device=None, dtype=None
    ) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        inner = heads * head_dim
        self.img_qkv = operations.Linear(dim, 3 * inner, device=device, dtype=dtype)
        self.txt_qkv = operations.Linear(dim, 3 * inner, device=device, dtype=dtype)
        self.norm_q = RMSNorm(head_dim, _QK_NORM_EPS, device=device, dtype=dtype)
        self.norm_k = RMSNorm(head_dim, _QK_NORM_EPS, device=device, dtype=dtype)
        self.norm_added_q = RMSNorm(head_dim, _QK_NORM_EPS, device=device, dtype=dtype)
        self.norm_added_k = RMSNorm(head_dim, _QK_NORM_EPS, device=device, dtype=dtype)
        # A one-element ModuleList puts the image output projection at the checkpoint's "to_out.0".
        self.to_out = nn.ModuleList([operations.Linear(inner, dim, device=device, dtype=dtype)])
        self.to_add_out = operations.Linear(inner, dim, device=device, dtype=dtype)

    def forward(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            img: ``[B, N, D]`` modulated image tokens. txt: ``[B, S, D]`` modulated text tokens.
            rope: ``(cos, sin)``, each ``[N + S, Dh // 2]``, image rows first.
            attn_mask: ``None`` (every key valid) or bool ``[B, 1, 1, N + S]``.
        Returns:
            ``(img_out [B, N, D], txt_out [B, S, D])``.
        """
        b, n, _ = img.shape
        s = txt.shape[1]
        iq, ik, iv = self.img_qkv(img).view(b, n, 3, self.heads, self.head_dim).unbind(2)
        tq, tk, tv = self.txt_qkv(txt).view(b, s, 3, self.heads, self.head_dim).unbind(2)
        q = torch.cat([self.norm_q(iq), self.norm_added_q(tq)], dim=1)
        k = torch.cat([self.norm_k(ik), self.norm_added_k(tk)], dim=1)
        v = torch.cat([iv, tv], dim=1)
        cos, sin = rope
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask
        )
        out = out.transpose(1, 2).reshape(b, n + s, self.heads * self.head_dim)
        return self.to_out[0](out[:, :n]), self.to_add_out(out[:, n:])


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class LensMMDiTBlock(nn.Module):
    """Dual-stream block: adaLN-modulated joint attention, then per-stream SwiGLU MLPs.

    Each stream's ``*_mod`` maps ``silu(temb)`` to six ``[D]`` vectors in the order
    ``shift1, scale1, gate1, shift2, scale2, gate2``.
    """

    def __init__(self, cfg: MMDiTConfig, operations=DEFAULT_OPS, device=None, dtype=None) -> None:
        super().__init__()
        dim = cfg.inner_dim
        self.attn = JointAttention(
            dim, cfg.num_attention_heads, cfg.attention_head_dim, operations, device, dtype
        )

        def mod() -> nn.Sequential:
            # Sequential(SiLU, Linear) puts the weights at the checkpoint's "<stream>_mod.1".
            return nn.Sequential(nn.SiLU(), operations.Linear(dim, 6 * dim, device=device, dtype=dtype))

        def norm() -> RMSNorm:
            return RMSNorm(dim, _BLOCK_NORM_EPS, device=device, dtype=dtype)

        self.img_mod = mod()
        self.img_norm1 = norm()
        self.img_norm2 = norm()
        self.img_mlp = SwiGLU(dim, cfg.mlp_hidden_dim, operations, device, dtype)
        self.txt_mod = mod()
        self.txt_norm1 = norm()
        self.txt_norm2 = norm()
        self.txt_mlp = SwiGLU(dim, cfg.mlp_hidden_dim, operations, device, dtype)

    def forward(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        temb: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            img: ``[B, N, D]``; txt: ``[B, S, D]``; temb: ``[B, D]``;
            rope: ``(cos, sin)`` ``[N + S, Dh // 2]``; attn_mask: ``None`` or bool ``[B, 1, 1, N + S]``.
        Returns:
            ``(img [B, N, D], txt [B, S, D])``, image first (upstream returns text first).
        """
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = self.img_mod(temb)[:, None, :].chunk(
            6, dim=-1
        )
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_mod(temb)[:, None, :].chunk(
            6, dim=-1
        )

        img_attn, txt_attn = self.attn(
            _modulate(self.img_norm1(img), i_shift1, i_scale1),
            _modulate(self.txt_norm1(txt), t_shift1, t_scale1),
            rope,
            attn_mask,
        )
        img = img + i_gate1 * img_attn
        txt = txt + t_gate1 * txt_attn
        img = img + i_gate2 * self.img_mlp(_modulate(self.img_norm2(img), i_shift2, i_scale2))
        txt = txt + t_gate2 * self.txt_mlp(_modulate(self.txt_norm2(txt), t_shift2, t_scale2))
        return img, txt


class AdaNormOut(nn.Module):
    """Final adaLN: affine-free LayerNorm modulated by ``linear(silu(temb))``.

    Chunk order is **scale, shift** (the reverse of the blocks').
    """

    def __init__(self, dim: int, operations=DEFAULT_OPS, device=None, dtype=None) -> None:
        super().__init__()
        self.linear = operations.Linear(dim, 2 * dim, device=device, dtype=dtype)
        self.norm = operations.LayerNorm(
            dim, eps=_BLOCK_NORM_EPS, elementwise_affine=False, device=device, dtype=dtype
        )

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """``x [B, N, D]``, ``temb [B, D]`` -> ``[B, N, D]``."""
        scale, shift = self.linear(F.silu(temb))[:, None, :].chunk(2, dim=-1)
        return _modulate(self.norm(x), shift, scale)


class LensMMDiT(nn.Module):
    """The Lens denoiser. ``forward`` predicts the flow-matching velocity ``noise - x0``.

    Args:
        config: sizes (:class:`MMDiTConfig`; defaults = the release).
        operations: layer factory (:mod:`lens_core.ops`); every Linear is built through it.
        device, dtype: where and how to allocate parameters (``device="meta"`` or a
            ``torch.device("meta")`` context allocates nothing; load with ``assign=True``).
    Set ``gradient_checkpointing = True`` to recompute each block in the backward pass while
    training. RoPE tables are cached on the instance (plain dict, never in the state dict).
    """

    _ROPE_CACHE_SIZE = 8

    def __init__(self, config: MMDiTConfig, operations=DEFAULT_OPS, device=None, dtype=None) -> None:
        super().__init__()
        self.config = config
        dim = config.inner_dim
        self.gradient_checkpointing = False

        self.time_text_embed = TimeTextEmbed(dim, operations, device, dtype)
        self.txt_norm = nn.ModuleList(
            [
                RMSNorm(config.enc_hidden_dim, _TXT_NORM_EPS, device=device, dtype=dtype)
                for _ in range(config.num_text_layers)
            ]
        )
        self.txt_in = operations.Linear(
            config.enc_hidden_dim * config.num_text_layers, dim, device=device, dtype=dtype
        )
        self.img_in = operations.Linear(config.in_channels, dim, device=device, dtype=dtype)
        self.transformer_blocks = nn.ModuleList(
            [LensMMDiTBlock(config, operations, device, dtype) for _ in range(config.num_layers)]
        )
        self.norm_out = AdaNormOut(dim, operations, device, dtype)
        self.proj_out = operations.Linear(dim, config.out_dim, device=device, dtype=dtype)

        self._rope_cache: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    @property
    def compute_dtype(self) -> torch.dtype:
        """Activation dtype: that of the (never quantised) text-norm weights."""
        return self.txt_norm[0].weight.dtype

    def rope(
        self, h: int, w: int, text_len: int, device: torch.device, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached ``(cos, sin)``, each ``[h*w + text_len, head_dim // 2]`` in ``dtype``."""
        key = (h, w, text_len, torch.device(device), dtype)
        hit = self._rope_cache.get(key)
        if hit is not None:
            self._rope_cache.move_to_end(key)
            return hit
        pos = rope_positions(h, w, text_len, device=device)
        cos, sin = rope_cos_sin(pos, self.config.axes_dims_rope, self.config.rope_theta)
        tables = (cos.to(dtype), sin.to(dtype))
        self._rope_cache[key] = tables
        while len(self._rope_cache) > self._ROPE_CACHE_SIZE:
            self._rope_cache.popitem(last=False)
        return tables

    @staticmethod
    def _attention_mask(txt_mask: torch.Tensor, num_image_tokens: int) -> torch.Tensor | None:
        # Fast path: with no padding SDPA may pick a mask-free kernel (flash attention on GPU).
        if bool(txt_mask.all()):
            return None
        return build_joint_attention_mask(txt_mask, num_image_tokens)

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        txt_feats: Sequence[torch.Tensor],
        txt_mask: torch.Tensor,
        grid_hw: tuple[int, int],
    ) -> torch.Tensor:
        """Predict the velocity for the latent tokens ``x``.

        Args:
            x: ``[B, N, in_channels]`` patchified latents, row-major over the ``h x w`` grid.
            sigma: ``[B]`` noise level in [0, 1] (kept fp32 for the timestep features).
            txt_feats: ``num_text_layers`` tensors ``[B, S, enc_hidden_dim]`` (encoder layer outputs).
            txt_mask: bool ``[B, S]``, True = real token; rows may be all False.
            grid_hw: ``(h, w)`` with ``h * w == N``.
        Returns:
            ``[B, N, patch_size**2 * out_channels]`` velocity in ``x.dtype``.
        """
        cfg = self.config
        b, n, _ = x.shape
        h, w = int(grid_hw[0]), int(grid_hw[1])
        if h * w != n:
            raise ValueError(f"grid_hw {grid_hw} has {h * w} positions but x has {n} tokens")
        if len(txt_feats) != cfg.num_text_layers:
            raise ValueError(f"expected {cfg.num_text_layers} text feature tensors, got {len(txt_feats)}")
        s = txt_feats[0].shape[1]
        for i, f in enumerate(txt_feats):
            if tuple(f.shape) != (b, s, cfg.enc_hidden_dim):
                raise ValueError(
                    f"txt_feats[{i}] has shape {tuple(f.shape)}, expected {(b, s, cfg.enc_hidden_dim)}"
                )
        if tuple(txt_mask.shape) != (b, s):
            raise ValueError(f"txt_mask has shape {tuple(txt_mask.shape)}, expected {(b, s)}")
        if tuple(sigma.shape) != (b,):
            raise ValueError(f"sigma has shape {tuple(sigma.shape)}, expected {(b,)}")

        dtype = self.compute_dtype
        img = self.img_in(x.to(dtype))
        txt = torch.cat([norm(f.to(dtype)) for norm, f in zip(self.txt_norm, txt_feats, strict=True)], dim=-1)
        txt = self.txt_in(txt)
        temb = self.time_text_embed(sigma, dtype)
        rope = self.rope(h, w, s, img.device)
        attn_mask = self._attention_mask(txt_mask, n)

        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.transformer_blocks:
            if checkpointing:
                img, txt = torch.utils.checkpoint.checkpoint(
                    block, img, txt, temb, rope, attn_mask, use_reentrant=False
                )
            else:
                img, txt = block(img, txt, temb, rope, attn_mask)

        return self.proj_out(self.norm_out(img, temb)).to(x.dtype)
