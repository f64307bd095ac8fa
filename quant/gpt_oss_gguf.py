"""GPT-OSS in llama.cpp's GGUF layout: tensor names, config, tokenizer, and a writer.

llama.cpp's ``convert_hf_to_gguf.py`` (``GptOssModel``, ``MODEL_ARCH.GPT_OSS`` = ``"gpt-oss"``)
renames the Hugging Face tensors and changes the layout of the experts only:

================================================  ==================================================
Hugging Face (``model.`` prefix)                   llama.cpp GGUF (torch-order shape)
================================================  ==================================================
``embed_tokens.weight`` [V, H]                     ``token_embd.weight``
``layers.N.input_layernorm.weight``                ``blk.N.attn_norm.weight``
``layers.N.self_attn.{q,k,v}_proj.{weight,bias}``  ``blk.N.attn_{q,k,v}.{weight,bias}`` (no permutation:
                                                   gpt-oss uses NeoX rope, like HF's rotate-half)
``layers.N.self_attn.o_proj.{weight,bias}``        ``blk.N.attn_output.{weight,bias}``
``layers.N.self_attn.sinks`` [nH]                  ``blk.N.attn_sinks.weight``
``layers.N.post_attention_layernorm.weight``       ``blk.N.post_attention_norm.weight``
``layers.N.mlp.router.{weight,bias}`` [E, H]       ``blk.N.ffn_gate_inp.{weight,bias}``
``layers.N.mlp.experts.gate_up_proj`` [E, H, 2I]   ``blk.N.ffn_gate_exps.weight`` [E, I, H] = the even
(interleaved: even columns gate, odd up)           columns, transposed; ``ffn_up_exps`` the odd ones;
                                                   or fused ``ffn_gate_up_exps`` [E, 2I, H] = gate
                                                   rows then up rows
``...gate_up_proj_bias`` [E, 2I]                   ``ffn_{gate,up}_exps.bias`` [E, I] (fused: [E, 2I])
``layers.N.mlp.experts.down_proj`` [E, I, H]       ``blk.N.ffn_down_exps.weight`` [E, H, I] (transposed)
``...down_proj_bias`` [E, H]                       ``blk.N.ffn_down_exps.bias``
``norm.weight``, ``lm_head.weight``                ``output_norm.weight``, ``output.weight``
================================================  ==================================================

MXFP4 experts (``*_blocks`` [E, out, in/32, 16] + ``*_scales`` [E, out, in/32]) are repacked, not
re-quantised: a ggml MXFP4 block is the scale byte followed by 16 code bytes whose low nibbles are
values 0-15 and high nibbles values 16-31 (HF packs value pairs 2k, 2k+1 into byte k); the E8M0
exponent byte is the same in both.  Hidden and expert width are both 2880 in the real model, so a
transposed expert has the right shape: only a forward pass against the HF layout catches it.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lens_core.errors import CheckpointError, TokenizerError
from lens_core.text_encoder import GptOssConfig, released_rope_scaling

from .ggml_types import GGMLType
from .gguf_reader import GGUFFile

__all__ = [
    "ARCH",
    "gguf_tensor_names",
    "gpt_oss_config_from_gguf",
    "hf_mxfp4_to_ggml",
    "load_gguf_tokenizer",
    "write_gpt_oss_gguf",
]

ARCH = "gpt-oss"
TOKEN_TYPE_NORMAL, TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED, TOKEN_TYPE_UNUSED = 1, 3, 4, 5

# Per-layer non-expert tensors: HF suffix (after ``model.layers.N.``) -> GGUF suffix (after ``blk.N.``).
LAYER_NAMES: dict[str, str] = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.o_proj.bias": "attn_output.bias",
    "self_attn.sinks": "attn_sinks.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "mlp.router.weight": "ffn_gate_inp.weight",
    "mlp.router.bias": "ffn_gate_inp.bias",
}


def gguf_tensor_names(num_layers: int) -> dict[str, str]:
    """HF name -> llama.cpp GGUF name for every non-expert tensor of layers ``0..num_layers-1``."""
    names = {"model.embed_tokens.weight": "token_embd.weight"}
    for i in range(num_layers):
        for hf, gg in LAYER_NAMES.items():
            names[f"model.layers.{i}.{hf}"] = f"blk.{i}.{gg}"
    return names


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def _shape(f: GGUFFile, name: str) -> tuple[int, ...] | None:
    info = f.tensors.get(name)
    return None if info is None else info.shape


def gpt_oss_config_from_gguf(f: GGUFFile) -> GptOssConfig:
    """The encoder config from a llama.cpp gpt-oss GGUF: metadata first, tensor shapes as fallback.

    RoPE keeps the released model's YaRN settings (with HF's untruncated ramp, which the Lens
    reference used) except the theta, factor and original context the file declares.
    """
    md = f.metadata
    arch = md.get("general.architecture", ARCH)

    def meta(key: str, default: Any = None) -> Any:
        value = md.get(f"{arch}.{key}", default)
        if isinstance(value, float):  # GGUF stores float32: 1e-5 reads back as 9.9999997e-06
            value = float(str(np.float32(value)))
        return value

    def need(name: str) -> tuple[int, ...]:
        shape = _shape(f, name)
        if shape is None:
            raise CheckpointError(f.path, f"not a llama.cpp GPT-OSS GGUF: tensor {name!r} is missing")
        return shape

    vocab, hidden = need("token_embd.weight")
    layer_ids = {int(m.group(1)) for n in f.tensors if (m := re.match(r"blk\.(\d+)\.", n))}
    num_layers = int(meta("block_count", max(layer_ids) + 1 if layer_ids else 0))
    if num_layers <= 0:
        raise CheckpointError(f.path, "not a llama.cpp GPT-OSS GGUF: no 'blk.N.*' tensors")
    sinks = _shape(f, "blk.0.attn_sinks.weight") or _shape(f, "blk.0.attn_sinks")
    heads = int(meta("attention.head_count", sinks[0] if sinks else 0) or 0)
    if heads <= 0:
        raise CheckpointError(
            f.path, "not a llama.cpp GPT-OSS GGUF: no head count and no 'blk.0.attn_sinks.weight'"
        )
    q_rows = need("blk.0.attn_q.weight")[0]
    k_rows = need("blk.0.attn_k.weight")[0]
    head_dim = int(meta("attention.key_length", q_rows // heads))
    kv_heads = int(meta("attention.head_count_kv", k_rows // head_dim))
    num_experts = int(meta("expert_count", need("blk.0.ffn_gate_inp.weight")[0]))
    gate = _shape(f, "blk.0.ffn_gate_exps.weight")
    fused = _shape(f, "blk.0.ffn_gate_up_exps.weight")
    if gate is not None:
        inter_from_shape = gate[1]
    elif fused is not None:
        inter_from_shape = fused[1] // 2
    else:
        raise CheckpointError(
            f.path, "not a llama.cpp GPT-OSS GGUF: tensor 'blk.0.ffn_gate_exps.weight' is missing"
        )
    intermediate = int(meta("expert_feed_forward_length", inter_from_shape))

    rope = released_rope_scaling()
    scaling_type = meta("rope.scaling.type")
    if scaling_type == "none":
        rope_scaling: dict[str, Any] | None = None
    elif scaling_type not in (None, "yarn"):
        raise CheckpointError(f.path, f"GPT-OSS uses YaRN rope scaling; this GGUF declares {scaling_type!r}")
    else:
        rope_scaling = rope
        if meta("rope.scaling.factor") is not None:
            rope["factor"] = float(meta("rope.scaling.factor"))
        if meta("rope.scaling.original_context_length") is not None:
            rope["original_max_position_embeddings"] = int(meta("rope.scaling.original_context_length"))
        if meta("rope.scaling.yarn_beta_fast") is not None:
            rope["beta_fast"] = float(meta("rope.scaling.yarn_beta_fast"))
        if meta("rope.scaling.yarn_beta_slow") is not None:
            rope["beta_slow"] = float(meta("rope.scaling.yarn_beta_slow"))
    pattern = meta("attention.sliding_window_pattern")
    layer_types = None
    if isinstance(pattern, np.ndarray) and pattern.dtype == np.bool_ and len(pattern) >= num_layers:
        layer_types = tuple(
            "sliding_attention" if bool(p) else "full_attention" for p in pattern[:num_layers]
        )
    pad = md.get("tokenizer.ggml.padding_token_id", 199999)
    defaults = GptOssConfig()
    return GptOssConfig(
        vocab_size=int(vocab),
        hidden_size=int(meta("embedding_length", hidden)),
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate,
        num_local_experts=num_experts,
        num_experts_per_tok=int(meta("expert_used_count", min(defaults.num_experts_per_tok, num_experts))),
        sliding_window=int(meta("attention.sliding_window", defaults.sliding_window)),
        layer_types=layer_types,
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon", defaults.rms_norm_eps)),
        rope_theta=float(meta("rope.freq_base", defaults.rope_theta)),
        rope_scaling=rope_scaling,
        pad_token_id=int(pad) if pad is not None and 0 <= int(pad) < vocab else None,
    )


# ---------------------------------------------------------------------------------------------
# MXFP4 repacking (HF blocks/scales -> ggml blocks)
# ---------------------------------------------------------------------------------------------


def hf_mxfp4_to_ggml(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """HF MXFP4 ``blocks`` uint8 ``[..., G, 16]`` + ``scales`` ``[..., G]`` -> ggml MXFP4 bytes ``[..., G * 17]``.

    HF byte k of a group holds values 2k (low nibble) and 2k + 1; ggml byte k holds values k (low)
    and k + 16 (high), after the shared exponent byte (the same E8M0 byte in both).
    """
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).flatten(-2)  # [..., G, 32] in value order
    ggml_codes = codes[..., :16] | (codes[..., 16:] << 4)
    packed = torch.cat((scales.unsqueeze(-1), ggml_codes), dim=-1)  # [..., G, 17]
    return packed.flatten(-2).contiguous()


# ---------------------------------------------------------------------------------------------
# Tokenizer from GGUF metadata
# ---------------------------------------------------------------------------------------------


def load_gguf_tokenizer(source: str | os.PathLike[str] | GGUFFile, fallback: bool = True):
    """The o200k_harmony tokenizer stored in a GGUF's ``tokenizer.ggml.*`` metadata.

    Returns a :class:`lens_core.tokenizer.JsonTokenizer`, validated like every Lens tokenizer
    (special ids and a probe).  A file without tokenizer metadata gives the bundled tokenizer
    (quicktok) when ``fallback``, else a TokenizerError.
    """
    from lens_core.tokenizer import load_tokenizer, validate_tokenizer

    path = source.path if isinstance(source, GGUFFile) else Path(source).expanduser()
    path = path.resolve()
    try:
        stat = path.stat()
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read GGUF file ({e})") from e
    tok = _gguf_tokenizer(path, stat.st_size, stat.st_mtime_ns)
    if tok is None:
        if not fallback:
            raise TokenizerError(
                f"{path}: this GGUF holds no tokenizer (no 'tokenizer.ggml.tokens' metadata)"
            )
        return load_tokenizer(None)
    validate_tokenizer(tok)
    return tok


@functools.lru_cache(maxsize=2)
def _gguf_tokenizer(path: Path, size: int, mtime_ns: int):
    import tokenizers
    from tokenizers import AddedToken, decoders, models, pre_tokenizers

    from lens_core.tokenizer import O200K_PATTERN, JsonTokenizer

    with GGUFFile(path) as f:
        md = f.metadata
        tokens = md.get("tokenizer.ggml.tokens")
        if tokens is None:
            return None
        kind = md.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise TokenizerError(
                f"{path}: GGUF tokenizer model is {kind!r}; GPT-OSS uses a byte-level BPE ('gpt2')"
            )
        token_list = tokens.tolist() if hasattr(tokens, "tolist") else list(tokens)
        types = md.get("tokenizer.ggml.token_type")
        types = np.asarray(types) if types is not None else np.ones(len(token_list), dtype=np.int32)
        merges_raw = md.get("tokenizer.ggml.merges")
        merge_list = merges_raw.tolist() if merges_raw is not None else []
    if len(types) != len(token_list):
        raise TokenizerError(f"{path}: {len(token_list)} tokens but {len(types)} token types")
    vocab: dict[str, int] = {}
    for i, t in enumerate(token_list):
        vocab.setdefault(t, i)
    merges = []
    for m in merge_list:
        left, sep, right = m.partition(" ")
        if not sep:
            raise TokenizerError(f"{path}: malformed BPE merge {m!r} in 'tokenizer.ggml.merges'")
        merges.append((left, right))
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(tokenizers.Regex(O200K_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # CONTROL tokens are special; USER_DEFINED ones are added tokens matched whole but not special.
    added = np.flatnonzero((types == TOKEN_TYPE_CONTROL) | (types == TOKEN_TYPE_USER_DEFINED)).tolist()
    added = [i for i in added if vocab.get(token_list[i]) == i]
    tok.add_special_tokens(
        [
            AddedToken(token_list[i], special=True, normalized=False)
            for i in added
            if types[i] == TOKEN_TYPE_CONTROL
        ]
    )
    tok.add_tokens(
        [
            AddedToken(token_list[i], special=False, normalized=False)
            for i in added
            if types[i] == TOKEN_TYPE_USER_DEFINED
        ]
    )
    return JsonTokenizer(tok, f"{path} (GGUF tokenizer metadata)")


def tokenizer_arrays_from_json(path: str | os.PathLike[str]) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a HF ``tokenizer.json``, the way llama.cpp writes them to GGUF.

    Ids without a token become ``[PAD{id}]`` (type UNUSED); added special tokens are CONTROL.
    """
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    vocab: dict[str, int] = data["model"]["vocab"]
    added = {a["id"]: a for a in data.get("added_tokens", [])}
    size = max([*vocab.values(), *added.keys()]) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [TOKEN_TYPE_UNUSED] * size
    for t, i in vocab.items():
        tokens[i], types[i] = t, TOKEN_TYPE_NORMAL
    for i, a in added.items():
        tokens[i] = a["content"]
        types[i] = TOKEN_TYPE_CONTROL if a.get("special", True) else TOKEN_TYPE_USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return tokens, types, merges


# ---------------------------------------------------------------------------------------------
# Writer: HF state dict -> llama.cpp-layout GGUF
# ---------------------------------------------------------------------------------------------


def _expert_halves(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, Any]:
    """The experts of one layer split the llama.cpp way: dict of gate/up/down as dense
    ``[E, out, in]`` fp32 tensors or ggml MXFP4 byte arrays, plus the biases."""
    out: dict[str, Any] = {}
    if prefix + "gate_up_proj_blocks" in state:
        gu_b, gu_s = state[prefix + "gate_up_proj_blocks"], state[prefix + "gate_up_proj_scales"]
        out["gate"] = (
            "mxfp4",
            hf_mxfp4_to_ggml(gu_b[:, 0::2], gu_s[:, 0::2]),
            (gu_b.shape[0], gu_b.shape[1] // 2, gu_b.shape[2] * 32),
        )
        out["up"] = (
            "mxfp4",
            hf_mxfp4_to_ggml(gu_b[:, 1::2], gu_s[:, 1::2]),
            (gu_b.shape[0], gu_b.shape[1] // 2, gu_b.shape[2] * 32),
        )
        d_b, d_s = state[prefix + "down_proj_blocks"], state[prefix + "down_proj_scales"]
        out["down"] = ("mxfp4", hf_mxfp4_to_ggml(d_b, d_s), (d_b.shape[0], d_b.shape[1], d_b.shape[2] * 32))
    else:
        gu = state[prefix + "gate_up_proj"].float().transpose(1, 2)  # [E, 2I, H]
        out["gate"] = ("dense", gu[:, 0::2].contiguous(), None)
        out["up"] = ("dense", gu[:, 1::2].contiguous(), None)
        out["down"] = ("dense", state[prefix + "down_proj"].float().transpose(1, 2).contiguous(), None)
    bias = state[prefix + "gate_up_proj_bias"].float()
    out["gate_bias"] = bias[:, 0::2].contiguous()
    out["up_bias"] = bias[:, 1::2].contiguous()
    out["down_bias"] = state[prefix + "down_proj_bias"].float().contiguous()
    return out


def _encode(t: torch.Tensor, ggml_type: GGMLType) -> tuple[np.ndarray, GGMLType | None]:
    """A dense tensor in ``ggml_type`` as (numpy array, raw_dtype for GGUFWriter)."""
    from .quantize import QUANTIZERS, quantize, to_numpy_bytes

    t = t.float().contiguous()
    if ggml_type == GGMLType.F32:
        return t.numpy(), None
    if ggml_type == GGMLType.F16:
        return t.to(torch.float16).numpy(), None
    if ggml_type == GGMLType.MXFP4:
        import gguf

        data = gguf.quants.quantize(t.numpy(), gguf.GGMLQuantizationType.MXFP4)
        return data, ggml_type
    if ggml_type in QUANTIZERS:
        return to_numpy_bytes(quantize(t, ggml_type), tuple(t.shape), ggml_type), ggml_type
    raise ValueError(f"cannot write tensors as {ggml_type.name}")


def write_gpt_oss_gguf(
    state: Mapping[str, torch.Tensor],
    config: GptOssConfig,
    path: str | os.PathLike[str],
    expert_type: str = "auto",
    weight_type: str = "F32",
    fuse_gate_up: bool = False,
    tokenizer_json: str | os.PathLike[str] | None = None,
    tokenizer_arrays: tuple[Iterable[str], Iterable[int], Iterable[str]] | None = None,
) -> Path:
    """Write a HF-named GPT-OSS state dict as llama.cpp would (names, expert layout, metadata).

    Args:
        state: ``model.``-prefixed HF tensors; experts dense (``gate_up_proj`` ...) or MXFP4
            (``*_blocks``/``*_scales``, repacked bit for bit).
        expert_type: ``"auto"`` (MXFP4 repack for MXFP4 input, else F32), or a ggml type name for
            dense experts (``"F32"``, ``"MXFP4"`` via ``gguf.quants``, ``"Q8_0"``, ``"Q4_K"`` ...).
        weight_type: ggml type of the 2-D non-expert weights (1-D tensors always F32).
        fuse_gate_up: write ``ffn_gate_up_exps`` instead of separate gate/up tensors.
        tokenizer_json / tokenizer_arrays: a HF tokenizer.json, or ``(tokens, types, merges)``, to
            embed as ``tokenizer.ggml.*`` metadata.
    The file is written atomically (temp file + rename).
    """
    import gguf

    path = Path(path)
    writer_tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    w = gguf.GGUFWriter(str(writer_tmp), ARCH)
    n = config.num_hidden_layers
    w.add_block_count(n)
    w.add_context_length(131072)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(config.rope_theta)
    w.add_expert_count(config.num_local_experts)
    w.add_expert_used_count(config.num_experts_per_tok)
    w.add_expert_feed_forward_length(config.intermediate_size)
    if config.sliding_window is not None:
        w.add_sliding_window(config.sliding_window)
    rope = config.rope_scaling or {}
    if rope.get("rope_type", rope.get("type")) == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    if tokenizer_json is not None:
        tokenizer_arrays = tokenizer_arrays_from_json(tokenizer_json)
    if tokenizer_arrays is not None:
        tokens, types, merges = (list(a) for a in tokenizer_arrays)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-4o")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        if config.pad_token_id is not None:
            w.add_pad_token_id(config.pad_token_id)
        w.add_eos_token_id(200002)

    wtype = GGMLType[weight_type]

    def put(name: str, t: torch.Tensor, gtype: GGMLType = GGMLType.F32) -> None:
        if t.dim() < 2:
            gtype = GGMLType.F32
        data, raw = _encode(t, gtype)
        w.add_tensor(name, data, raw_dtype=raw)

    names = gguf_tensor_names(n)
    for hf, gg in names.items():
        put(gg, state[hf], wtype)
    for hf, gg in (("model.norm.weight", "output_norm.weight"), ("lm_head.weight", "output.weight")):
        if hf in state:
            put(gg, state[hf], wtype)
    for i in range(n):
        ex = _expert_halves(state, f"model.layers.{i}.mlp.experts.")
        parts = ("gate", "up", "down")
        for part in parts:
            kind, data, shape = ex[part]
            if kind == "mxfp4":
                if expert_type not in ("auto", "MXFP4"):
                    raise ValueError("MXFP4 experts can only be repacked (expert_type 'auto' or 'MXFP4')")
                ex[part] = ("raw", data.reshape(shape[0], shape[1], -1).numpy(), GGMLType.MXFP4)
            else:
                gtype = GGMLType.F32 if expert_type == "auto" else GGMLType[expert_type]
                arr, raw = _encode(data, gtype)
                ex[part] = ("raw", arr, raw)
        if fuse_gate_up:
            g, u = ex["gate"], ex["up"]
            w.add_tensor(
                f"blk.{i}.ffn_gate_up_exps.weight", np.concatenate((g[1], u[1]), axis=1), raw_dtype=g[2]
            )
            w.add_tensor(
                f"blk.{i}.ffn_gate_up_exps.bias",
                torch.cat((ex["gate_bias"], ex["up_bias"]), dim=-1).numpy(),
            )
        else:
            w.add_tensor(f"blk.{i}.ffn_gate_exps.weight", ex["gate"][1], raw_dtype=ex["gate"][2])
            w.add_tensor(f"blk.{i}.ffn_up_exps.weight", ex["up"][1], raw_dtype=ex["up"][2])
            w.add_tensor(f"blk.{i}.ffn_gate_exps.bias", ex["gate_bias"].numpy())
            w.add_tensor(f"blk.{i}.ffn_up_exps.bias", ex["up_bias"].numpy())
        w.add_tensor(f"blk.{i}.ffn_down_exps.weight", ex["down"][1], raw_dtype=ex["down"][2])
        w.add_tensor(f"blk.{i}.ffn_down_exps.bias", ex["down_bias"].numpy())
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(writer_tmp, path)
    except BaseException:
        w.close()
        writer_tmp.unlink(missing_ok=True)
        raise
    return path
