"""GPT-OSS-20B as the Lens multi-layer text-feature encoder.

Only the part of the decoder Lens needs is built: the token embedding and decoder layers
``0 .. max(selected_layers)``. The features are the raw outputs of the selected decoder layers
(residual stream *before* any final norm; the model's final norm and LM head are never built).

Parameter names are the Hugging Face ``GptOssForCausalLM`` names (``model.embed_tokens.weight``,
``model.layers.N.self_attn.q_proj.weight`` ...), so an HF state dict, minus the unused layers,
``model.norm`` and ``lm_head``, loads with ``strict=True`` (see :meth:`GptOssEncoder.filter_state_dict`).
The MoE experts exist in two storage formats:

* ``"dense"``: ``gate_up_proj`` ``[E, H, 2I]`` (gate/up columns interleaved), ``gate_up_proj_bias``
  ``[E, 2I]``, ``down_proj`` ``[E, I, H]``, ``down_proj_bias`` ``[E, H]`` (the bf16 re-uploads);
* ``"mxfp4"``: ``gate_up_proj_blocks`` / ``_scales`` and ``down_proj_blocks`` / ``_scales`` as uint8
  in the openai checkpoint layout (see :mod:`lens_core.mxfp4`) plus the same biases. Only the
  experts the router picked are dequantised, one at a time, on every call.

Shapes: ``B`` batch, ``S`` tokens, ``H`` hidden (2880), ``nH``/``nKV`` query/key-value heads,
``D`` head dim, ``E`` experts, ``I`` expert width, ``k`` experts per token.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .errors import CheckpointError
from .layers import RMSNorm
from .mxfp4 import GROUP_SIZE, dequantize_mxfp4
from .ops import DEFAULT_OPS

SLIDING = "sliding_attention"
FULL = "full_attention"
EXPERT_FORMATS = ("dense", "mxfp4")
DEFAULT_SELECTED_LAYERS = (5, 11, 17, 23)

_ATTENTION_CHUNK_ELEMENTS = 1 << 25
"""Batch rows per attention step are chosen so one fp32 ``[b, nH, S, S+1]`` logit tensor stays under
this many elements (128 MiB; two such tensors are alive at once)."""


def _alternating_layer_types(n: int) -> tuple[str, ...]:
    return tuple(SLIDING if i % 2 == 0 else FULL for i in range(n))


def released_rope_scaling() -> dict[str, Any]:
    return {
        "rope_type": "yarn",
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "truncate": False,
    }


@dataclass
class GptOssConfig:
    """Architecture of a GPT-OSS decoder; the defaults are openai/gpt-oss-20b's.

    ``layer_types`` left as ``None`` becomes alternating sliding/full attention, sliding first.
    ``rope_scaling`` follows the HF ``rope_parameters`` keys (``rope_type`` "yarn" or "default",
    ``factor``, ``original_max_position_embeddings``, ``beta_fast``, ``beta_slow``, ``truncate``,
    optional ``attention_factor`` / ``mscale`` / ``mscale_all_dim``).
    """

    vocab_size: int = 201088
    hidden_size: int = 2880
    num_hidden_layers: int = 24
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    head_dim: int = 64
    intermediate_size: int = 2880
    num_local_experts: int = 32
    num_experts_per_tok: int = 4
    sliding_window: int | None = 128
    layer_types: tuple[str, ...] | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 150000.0
    rope_scaling: dict[str, Any] | None = field(default_factory=released_rope_scaling)
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    pad_token_id: int | None = 199999
    attention_bias: bool = True

    def __post_init__(self) -> None:
        if self.layer_types is None:
            self.layer_types = _alternating_layer_types(self.num_hidden_layers)
        self.layer_types = tuple(self.layer_types)
        if len(self.layer_types) < self.num_hidden_layers:
            raise ValueError(
                f"layer_types lists {len(self.layer_types)} layers, config has {self.num_hidden_layers}"
            )
        unknown = set(self.layer_types) - {SLIDING, FULL}
        if unknown:
            raise ValueError(f"unknown GPT-OSS layer types {sorted(unknown)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"{self.num_attention_heads} query heads are not a multiple of {self.num_key_value_heads} KV heads"
            )

    @classmethod
    def from_json(cls, d: Mapping[str, Any] | str | Path) -> GptOssConfig:
        """Build from an HF ``config.json`` (a dict, or a path to the file).

        Reads the rope settings from ``rope_parameters`` (transformers 5) or ``rope_scaling`` with a
        top-level ``rope_theta`` (older files); unknown keys are ignored.
        """
        if not isinstance(d, Mapping):
            with open(d, encoding="utf-8") as f:
                d = json.load(f)
        defaults = cls()
        rope = d.get("rope_parameters") or d.get("rope_scaling")
        if rope is None:
            rope_scaling: dict[str, Any] | None = released_rope_scaling()
            theta = d.get("rope_theta", defaults.rope_theta)
        else:
            rope = dict(rope)
            theta = rope.pop("rope_theta", None) or d.get("rope_theta", defaults.rope_theta)
            if "rope_type" not in rope and "type" in rope:
                rope["rope_type"] = rope.pop("type")
            rope_scaling = rope
        num_layers = int(d.get("num_hidden_layers", defaults.num_hidden_layers))
        experts_per_tok = d.get(
            "num_experts_per_tok", d.get("experts_per_token", defaults.num_experts_per_tok)
        )
        num_experts = d.get("num_local_experts", d.get("num_experts", defaults.num_local_experts))
        num_heads = int(d.get("num_attention_heads", defaults.num_attention_heads))
        hidden = int(d.get("hidden_size", defaults.hidden_size))
        layer_types = d.get("layer_types")
        return cls(
            vocab_size=int(d.get("vocab_size", defaults.vocab_size)),
            hidden_size=hidden,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or num_heads),
            head_dim=int(d.get("head_dim") or hidden // num_heads),
            intermediate_size=int(d.get("intermediate_size", defaults.intermediate_size)),
            num_local_experts=int(num_experts),
            num_experts_per_tok=int(experts_per_tok),
            sliding_window=d.get("sliding_window", defaults.sliding_window),
            layer_types=tuple(layer_types) if layer_types else None,
            rms_norm_eps=float(d.get("rms_norm_eps", defaults.rms_norm_eps)),
            rope_theta=float(theta),
            rope_scaling=rope_scaling,
            swiglu_limit=float(d.get("swiglu_limit", defaults.swiglu_limit)),
            swiglu_alpha=float(d.get("swiglu_alpha", defaults.swiglu_alpha)),
            pad_token_id=d.get("pad_token_id", defaults.pad_token_id),
            attention_bias=bool(d.get("attention_bias", True)),
        )

    @classmethod
    def from_state_dict_shapes(cls, shapes: Mapping[str, Any]) -> GptOssConfig:
        """Infer the sizes from HF tensor names and shapes (``model.``-prefixed or not).

        Args:
            shapes: tensor name -> shape (a ``torch.Size``/sequence, or anything with ``.shape``).
                Dense (``gate_up_proj``) and MXFP4 (``gate_up_proj_blocks``) experts are both understood.

        Not in the shapes, and taken from the released model: experts per token, sliding window,
        layer types (alternating), rope, eps, swiglu constants, pad id.

        Raises:
            ValueError (:class:`~lens_core.errors.CheckpointError`): a tensor GPT-OSS must have is missing;
                the message names it.
        """

        def shape_of(v: Any) -> tuple[int, ...]:
            return tuple(int(s) for s in (v.shape if hasattr(v, "shape") else v))

        prefix = _find_prefix(shapes.keys())
        if prefix is None:
            raise CheckpointError(None, "not a GPT-OSS checkpoint: no tensor 'model.embed_tokens.weight'")

        def need(name: str) -> tuple[int, ...]:
            key = prefix + name
            if key not in shapes:
                raise CheckpointError(None, f"not a GPT-OSS checkpoint: missing tensor '{key}'")
            return shape_of(shapes[key])

        vocab, hidden = need("embed_tokens.weight")
        layer_re = re.compile(re.escape(prefix) + r"layers\.(\d+)\.")
        indices = [int(m.group(1)) for k in shapes if (m := layer_re.match(k))]
        if not indices:
            raise CheckpointError(
                None, f"not a GPT-OSS checkpoint: missing tensor '{prefix}layers.0.self_attn.sinks'"
            )
        num_layers = max(indices) + 1
        (num_heads,) = need("layers.0.self_attn.sinks")
        q_rows = need("layers.0.self_attn.q_proj.weight")[0]
        k_rows = need("layers.0.self_attn.k_proj.weight")[0]
        head_dim = q_rows // num_heads
        num_experts = need("layers.0.mlp.router.weight")[0]
        experts = prefix + "layers.0.mlp.experts."
        if experts + "gate_up_proj" in shapes:
            intermediate = shape_of(shapes[experts + "gate_up_proj"])[-1] // 2
        elif experts + "gate_up_proj_blocks" in shapes:
            intermediate = shape_of(shapes[experts + "gate_up_proj_blocks"])[-3] // 2
        else:
            raise CheckpointError(None, f"not a GPT-OSS checkpoint: missing tensor '{experts}gate_up_proj'")
        return cls(
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=k_rows // head_dim,
            head_dim=head_dim,
            intermediate_size=intermediate,
            num_local_experts=num_experts,
            num_experts_per_tok=min(cls.num_experts_per_tok, num_experts),
        )


def _find_prefix(keys: Iterable[str]) -> str | None:
    """The text before ``embed_tokens.weight`` (``"model."`` for HF files), or None."""
    found = None
    for k in keys:
        if k.endswith("embed_tokens.weight"):
            p = k[: -len("embed_tokens.weight")]
            if found is None or len(p) < len(found):
                found = p
    return found


def expert_format_of(keys: Iterable[str]) -> str:
    """``"mxfp4"`` if the keys hold ``*_blocks`` expert tensors, else ``"dense"``."""
    return "mxfp4" if any(k.endswith("mlp.experts.gate_up_proj_blocks") for k in keys) else "dense"


# ----------------------------------------------------------------------------------------------
# Rotary embedding (YaRN), in the HF "rotate half" convention


def rope_inverse_frequencies(config: GptOssConfig) -> tuple[torch.Tensor, float]:
    """Per-pair rotation frequencies and the cos/sin gain for ``config.rope_scaling``.

    Returns:
        ``(inv_freq, attention_scaling)``: fp32 ``[D/2]`` (on CPU) and a float that multiplies
        both cos and sin (YaRN's attention temperature; 1.0 without scaling).
    """
    dim = config.head_dim
    base = float(config.rope_theta)
    # Explicit CPU: models are built under ``torch.device("meta")``, and these are real numbers.
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim
    base_powers = base**exponents  # [D/2]
    rope = config.rope_scaling or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type in (None, "default"):
        return 1.0 / base_powers, 1.0
    if rope_type != "yarn":
        raise ValueError(f"unsupported rope_type {rope_type!r} for GPT-OSS (expected 'yarn' or 'default')")

    factor = float(rope["factor"])
    original_context = float(rope["original_max_position_embeddings"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    gain = rope.get("attention_factor")
    if gain is None:
        m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
        gain = mscale(factor, m) / mscale(factor, m_all) if (m and m_all) else mscale(factor)
    beta_fast = rope.get("beta_fast") or 32.0
    beta_slow = rope.get("beta_slow") or 1.0

    def dim_for_rotations(rotations: float) -> float:
        # The pair index whose wavelength fits `rotations` times into the original context.
        return dim * math.log(original_context / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_for_rotations(beta_fast), dim_for_rotations(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    keep_original = 1 - ramp  # 1: high-frequency pairs keep the trained frequency
    extrapolated = 1.0 / base_powers
    interpolated = 1.0 / (factor * base_powers)
    inv_freq = interpolated * (1 - keep_original) + extrapolated * keep_original
    return inv_freq, float(gain)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, S, heads, D]`` by ``cos``/``sin`` ``[B, S, 1, D/2]``; pairs are (i, i + D/2)."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)


# ----------------------------------------------------------------------------------------------
# Attention


class GptOssAttention(nn.Module):
    """GQA self-attention with q/k/v/o bias, YaRN RoPE and one learned sink logit per head.

    The sink joins every softmax as an extra key column with no value, so heads can attend to
    "nothing". Sliding layers see the last ``sliding_window`` positions (the query's own included).
    """

    def __init__(self, config: GptOssConfig, layer_idx: int, operations=DEFAULT_OPS, device=None, dtype=None):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.layer_type = config.layer_types[layer_idx]
        h, bias = config.hidden_size, config.attention_bias
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = operations.Linear(h, q, bias=bias, device=device, dtype=dtype)
        self.k_proj = operations.Linear(h, kv, bias=bias, device=device, dtype=dtype)
        self.v_proj = operations.Linear(h, kv, bias=bias, device=device, dtype=dtype)
        self.o_proj = operations.Linear(q, h, bias=bias, device=device, dtype=dtype)
        self.sinks = nn.Parameter(torch.empty(self.num_heads, device=device, dtype=dtype))

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, allowed: torch.Tensor
    ) -> torch.Tensor:
        """
        Args:
            x: ``[B, S, H]``.
            cos, sin: ``[B, S, 1, D/2]`` in ``x``'s dtype (gain already applied).
            allowed: bool ``[B, S_q, S_k]``, True where the query may see the key.

        Returns:
            ``[B, S, H]``.
        """
        bsz, seq, _ = x.shape
        groups = self.num_heads // self.num_kv_heads
        q = _rotate(self.q_proj(x).view(bsz, seq, self.num_heads, self.head_dim), cos, sin)
        k = _rotate(self.k_proj(x).view(bsz, seq, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(bsz, seq, self.num_kv_heads, self.head_dim)
        q = q.transpose(1, 2)  # [B, nH, S, D]
        # Query head h reads KV head h // groups.
        k = k.transpose(1, 2).repeat_interleave(groups, dim=1)  # [B, nH, S, D]
        v = v.transpose(1, 2).repeat_interleave(groups, dim=1)
        sinks = self.sinks.to(device=x.device, dtype=torch.float32).view(1, self.num_heads, 1, 1)

        outs = []
        step = max(1, _ATTENTION_CHUNK_ELEMENTS // (self.num_heads * seq * (seq + 1)))
        for b0 in range(0, bsz, step):
            b1 = min(bsz, b0 + step)
            scores = torch.matmul(q[b0:b1].float(), k[b0:b1].float().transpose(-1, -2)).mul_(self.scale)
            scores.masked_fill_(~allowed[b0:b1, None], float("-inf"))  # [b, nH, S, S]
            # The sink is one more logit per (head, query); its probability mass is dropped.
            logits = torch.cat((scores, sinks.expand(b1 - b0, -1, seq, 1)), dim=-1)
            del scores
            probs = torch.softmax(logits, dim=-1)[..., :seq]
            del logits
            outs.append(torch.matmul(probs, v[b0:b1].float()))  # [b, nH, S, D]
            del probs
        out = torch.cat(outs) if len(outs) > 1 else outs[0]
        out = out.to(x.dtype).transpose(1, 2).reshape(bsz, seq, self.num_heads * self.head_dim)
        return self.o_proj(out)


# ----------------------------------------------------------------------------------------------
# Mixture of experts


def expert_swiglu(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    gate_up_bias: torch.Tensor,
    down: torch.Tensor,
    down_bias: torch.Tensor,
    limit: float = 7.0,
    alpha: float = 1.702,
) -> torch.Tensor:
    """One expert's clamped SwiGLU on the tokens routed to it.

    Args:
        x: ``[T, H]``.
        gate_up: ``[H, 2I]``, columns interleaved (even = gate, odd = up); ``gate_up_bias`` ``[2I]``.
        down: ``[I, H]``; ``down_bias`` ``[H]``.
        limit: gate clamped to ``<= limit``, up to ``[-limit, limit]``.
        alpha: sigmoid gain.

    Returns:
        ``[T, H]``: ``((up + 1) * gate * sigmoid(alpha * gate)) @ down + down_bias``.
    """
    h = x @ gate_up + gate_up_bias
    gate = h[..., 0::2].clamp(max=limit)
    up = h[..., 1::2].clamp(min=-limit, max=limit)
    act = (up + 1) * (gate * torch.sigmoid(gate * alpha))
    return act @ down + down_bias


class GptOssExperts(nn.Module):
    """The ``E`` experts of one MoE layer, stored dense or MXFP4 (see the module docstring).

    :meth:`expert_weights` returns one expert's weights in the dense layout whatever the storage,
    so both formats run :func:`expert_swiglu`. Weights are moved/cast per expert to the
    activations' device and dtype, so only the experts in use are touched.
    """

    def __init__(self, config: GptOssConfig, expert_format: str = "dense", device=None, dtype=None):
        super().__init__()
        if expert_format not in EXPERT_FORMATS:
            raise ValueError(f"expert_format must be one of {EXPERT_FORMATS}, got {expert_format!r}")
        e, h, i = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.expert_format = expert_format
        self.num_experts = e
        self.limit = config.swiglu_limit
        self.alpha = config.swiglu_alpha
        if expert_format == "dense":
            self.gate_up_proj = nn.Parameter(torch.empty(e, h, 2 * i, device=device, dtype=dtype))
            self.down_proj = nn.Parameter(torch.empty(e, i, h, device=device, dtype=dtype))
        else:
            if h % GROUP_SIZE or i % GROUP_SIZE:
                raise ValueError(
                    f"MXFP4 experts need hidden ({h}) and intermediate ({i}) sizes divisible by 32"
                )

            def packed(*shape: int) -> nn.Parameter:
                return nn.Parameter(
                    torch.empty(*shape, device=device, dtype=torch.uint8), requires_grad=False
                )

            self.gate_up_proj_blocks = packed(e, 2 * i, h // GROUP_SIZE, GROUP_SIZE // 2)
            self.gate_up_proj_scales = packed(e, 2 * i, h // GROUP_SIZE)
            self.down_proj_blocks = packed(e, h, i // GROUP_SIZE, GROUP_SIZE // 2)
            self.down_proj_scales = packed(e, h, i // GROUP_SIZE)
        self.gate_up_proj_bias = nn.Parameter(torch.empty(e, 2 * i, device=device, dtype=dtype))
        self.down_proj_bias = nn.Parameter(torch.empty(e, h, device=device, dtype=dtype))

    def expert_weights(
        self, expert: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Expert ``expert``'s ``(gate_up [H, 2I], gate_up_bias [2I], down [I, H], down_bias [H])``.

        MXFP4 storage is dequantised here (into ``dtype``), only for this expert.
        """

        def dense(p: torch.Tensor) -> torch.Tensor:
            return p[expert].to(device=device, dtype=dtype)

        def unpack(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
            # Checkpoint layout [out, in/32, 16] -> [out, in] -> the dense [in, out]; contiguous, so
            # both formats hit the same matmul kernel and agree bit for bit.
            weight = dequantize_mxfp4(blocks[expert].to(device), scales[expert].to(device), dtype)
            return weight.t().contiguous()

        if self.expert_format == "dense":
            gate_up, down = dense(self.gate_up_proj), dense(self.down_proj)
        else:
            gate_up = unpack(self.gate_up_proj_blocks, self.gate_up_proj_scales)
            down = unpack(self.down_proj_blocks, self.down_proj_scales)
        return gate_up, dense(self.gate_up_proj_bias), down, dense(self.down_proj_bias)

    def forward(
        self, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor
    ) -> torch.Tensor:
        """
        Args:
            x: ``[N, H]`` tokens.
            expert_ids: long ``[N, k]``, the experts chosen for each token.
            expert_weights: ``[N, k]``, their mixing weights.

        Returns:
            ``[N, H]`` in ``x``'s dtype: the weighted sum of each token's experts.
        """
        top_k = expert_ids.shape[-1]
        flat_ids = expert_ids.reshape(-1)
        order = torch.argsort(flat_ids, stable=True)  # slots (token * k + j) grouped by expert
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()
        flat_weights = expert_weights.reshape(-1)
        out = torch.zeros_like(x)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            slots = order[start : start + count]
            start += count
            tokens = torch.div(slots, top_k, rounding_mode="floor")
            y = expert_swiglu(
                x.index_select(0, tokens),
                *self.expert_weights(expert, x.device, x.dtype),
                self.limit,
                self.alpha,
            )
            out.index_add_(0, tokens, (y * flat_weights[slots, None]).to(x.dtype))
        return out


class GptOssMLP(nn.Module):
    """Router (``Linear(H -> E)`` with bias, top-k, softmax over the k chosen logits) + experts."""

    def __init__(
        self,
        config: GptOssConfig,
        expert_format: str = "dense",
        operations=DEFAULT_OPS,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.router = operations.Linear(
            config.hidden_size, config.num_local_experts, bias=True, device=device, dtype=dtype
        )
        self.experts = GptOssExperts(config, expert_format, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, S, H]`` -> ``[B, S, H]``."""
        flat = x.reshape(-1, x.shape[-1])
        logits = self.router(flat)  # [N, E]
        top_logits, top_ids = torch.topk(logits, self.top_k, dim=-1)
        weights = torch.softmax(top_logits, dim=-1)
        return self.experts(flat, top_ids, weights).view_as(x)


class GptOssDecoderLayer(nn.Module):
    """Pre-norm block: ``x += attn(norm(x)); x += moe(norm(x))``."""

    def __init__(
        self,
        config: GptOssConfig,
        layer_idx: int,
        expert_format: str = "dense",
        operations=DEFAULT_OPS,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, device=device, dtype=dtype)
        self.self_attn = GptOssAttention(config, layer_idx, operations, device=device, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(
            config.hidden_size, config.rms_norm_eps, device=device, dtype=dtype
        )
        self.mlp = GptOssMLP(config, expert_format, operations, device=device, dtype=dtype)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, allowed: torch.Tensor
    ) -> torch.Tensor:
        """``x`` ``[B, S, H]`` -> ``[B, S, H]``; see :meth:`GptOssAttention.forward` for the rest."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, allowed)
        return x + self.mlp(self.post_attention_layernorm(x))


class _GptOssTrunk(nn.Module):
    """Holds the HF ``model.`` submodules that are built: ``embed_tokens`` and ``layers``."""

    def __init__(
        self, config: GptOssConfig, num_layers: int, expert_format: str, operations, device=None, dtype=None
    ):
        super().__init__()
        pad = config.pad_token_id
        pad = pad if pad is not None and 0 <= pad < config.vocab_size else None
        self.embed_tokens = operations.Embedding(
            config.vocab_size, config.hidden_size, padding_idx=pad, device=device, dtype=dtype
        )
        self.layers = nn.ModuleList(
            GptOssDecoderLayer(config, i, expert_format, operations, device=device, dtype=dtype)
            for i in range(num_layers)
        )


class GptOssEncoder(nn.Module):
    """GPT-OSS decoder truncated after the last selected layer; returns the selected layers' outputs.

    Args:
        config: architecture (:class:`GptOssConfig`).
        selected_layers: 0-based decoder layers whose outputs are returned, in this order.
        expert_format: ``"dense"`` or ``"mxfp4"`` expert storage.
        operations: layer factory (``Linear``, ``Embedding``), e.g. ``comfy.ops`` classes.
        device, dtype: where/how parameters are created (``"meta"`` works; then load with ``assign=True``).
            MXFP4 blocks/scales are always uint8.
    """

    def __init__(
        self,
        config: GptOssConfig,
        selected_layers: Sequence[int] = DEFAULT_SELECTED_LAYERS,
        expert_format: str = "dense",
        operations=DEFAULT_OPS,
        device=None,
        dtype=None,
    ):
        super().__init__()
        selected = tuple(int(i) for i in selected_layers)
        if not selected:
            raise ValueError("selected_layers must not be empty")
        if len(set(selected)) != len(selected):
            raise ValueError(f"selected_layers has repeats: {selected}")
        if min(selected) < 0 or max(selected) >= config.num_hidden_layers:
            raise ValueError(f"selected_layers {selected} outside 0..{config.num_hidden_layers - 1}")
        if expert_format not in EXPERT_FORMATS:
            raise ValueError(f"expert_format must be one of {EXPERT_FORMATS}, got {expert_format!r}")
        self.config = config
        self.selected_layers = selected
        self.expert_format = expert_format
        self.model = _GptOssTrunk(
            config, max(selected) + 1, expert_format, operations, device=device, dtype=dtype
        )
        inv_freq, gain = rope_inverse_frequencies(config)
        self._inv_freq = inv_freq  # plain attribute: not in the state dict, survives meta construction
        self._rope_gain = gain

    def filter_state_dict(self, state_dict: Mapping[str, Any]) -> dict[str, Any]:
        """Keep only the entries this encoder holds (drops later layers, ``model.norm``, ``lm_head``...)."""
        wanted = set(self.state_dict(keep_vars=True).keys())
        return {k: v for k, v in state_dict.items() if k in wanted}

    def _masks(self, valid: torch.Tensor, seq: int) -> dict[str, torch.Tensor]:
        """bool ``[B, S, S]`` masks per layer type from the key-validity mask ``valid`` ``[B, S]``."""
        pos = torch.arange(seq, device=valid.device)
        offset = pos[:, None] - pos[None, :]  # query - key
        causal = offset >= 0
        masks = {FULL: causal[None] & valid[:, None, :]}
        window = self.config.sliding_window
        if window is not None:
            masks[SLIDING] = (causal & (offset < window))[None] & valid[:, None, :]
        else:
            masks[SLIDING] = masks[FULL]
        return masks

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """
        Args:
            input_ids: long ``[B, S]``.
            attention_mask: ``[B, S]`` bool or 0/1 (True/1 = real token); padded keys are hidden from
                every query. ``None`` means no padding. Positions are ``0..S-1`` for every row, so pad on
                the right.

        Returns:
            One ``[B, S, H]`` tensor per selected layer (the raw decoder-layer output, no final norm), in
            the embedding's dtype. Padded positions hold values too; mask them downstream.
        """
        bsz, seq = input_ids.shape
        x = self.model.embed_tokens(input_ids)
        device = x.device
        if attention_mask is None:
            valid = torch.ones(bsz, seq, dtype=torch.bool, device=device)
        else:
            valid = attention_mask.to(device=device).bool()
        masks = self._masks(valid, seq)

        angles = (
            torch.arange(seq, device=device, dtype=torch.float32)[:, None] * self._inv_freq.to(device)[None]
        )
        cos = (angles.cos() * self._rope_gain).to(x.dtype)[None, :, None, :].expand(bsz, -1, -1, -1)
        sin = (angles.sin() * self._rope_gain).to(x.dtype)[None, :, None, :].expand(bsz, -1, -1, -1)

        wanted = {layer: n for n, layer in enumerate(self.selected_layers)}
        features: list[torch.Tensor | None] = [None] * len(self.selected_layers)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, masks[layer.layer_type])
            if i in wanted:
                features[wanted[i]] = x
        return features  # type: ignore[return-value]
