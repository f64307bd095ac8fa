"""GGML layers (quant.layers): quantised Linear/Embedding equal dense layers holding the decoded
weights, bit for bit; state-dict round trips; shared decode buffers; LoRA patches on top of the
decoded weight equal LoRAs merged into a dense model."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from quant import BLOCK_INFO, GGMLType, dequantize
from quant.layers import (
    GGMLEmbedding,
    GGMLLinear,
    GGMLOps,
    LoraPatch,
    QuantizedWeight,
    apply_lora_patches,
    clear_lora_patches,
    ggml_linear_names,
    ggml_linear_shapes,
    release_buffers,
    set_buffer_reuse,
)
from quant.quantize import quantize
from quant.synthetic import random_blocks

BLOCK_TYPES = [
    GGMLType(t).name for t in BLOCK_INFO if GGMLType(t) not in (GGMLType.F32, GGMLType.F16, GGMLType.BF16)
]


def random_weight(type_name: str, out_f: int, in_f: int, seed: int = 0) -> QuantizedWeight:
    """Random but valid blocks of every type (K-quants and IQ types included)."""
    raw = torch.from_numpy(
        random_blocks(GGMLType[type_name], (out_f, in_f), seed=seed, scale=0.05).reshape(-1).copy()
    )
    return QuantizedWeight(raw, GGMLType[type_name], (out_f, in_f))


def ggml_linear(q: QuantizedWeight, bias: torch.Tensor | None, dtype=torch.float32) -> GGMLLinear:
    with torch.device("meta"):
        layer = GGMLLinear(q.shape[1], q.shape[0], bias=bias is not None, dtype=dtype)
    state = {"weight": q}
    if bias is not None:
        state["bias"] = bias.to(dtype)
    layer.load_state_dict(state, assign=True)
    return layer


@pytest.mark.parametrize("type_name", BLOCK_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_equals_dense_linear(type_name, dtype):
    out_f, in_f = 48, 512
    q = random_weight(type_name, out_f, in_f)
    bias = torch.randn(out_f)
    layer = ggml_linear(q, bias, dtype)
    assert layer.is_quantized and layer.weight is None and layer.qweight.ggml_type == GGMLType[type_name]
    x = torch.randn(3, 5, in_f).to(dtype)
    dense_w = dequantize(q.raw, q.ggml_type, q.shape, dtype)
    expected = F.linear(x, dense_w, bias.to(dtype))
    with torch.no_grad():
        assert torch.equal(layer(x), expected)
    assert torch.equal(layer(x), expected)  # grad mode, x needs no grad: same result


def test_linear_float_types_become_dense_parameters():
    w = torch.randn(16, 64)
    for gtype, stored in (
        (GGMLType.F32, torch.float32),
        (GGMLType.F16, torch.float16),
        (GGMLType.BF16, torch.bfloat16),
    ):
        raw = w.to(stored).contiguous().view(torch.uint8).reshape(-1)
        layer = ggml_linear(QuantizedWeight(raw, gtype, w.shape), None)
        assert not layer.is_quantized and isinstance(layer.weight, nn.Parameter)
        assert torch.equal(layer.weight, w.to(stored).float())
        x = torch.randn(2, 64)
        assert torch.equal(layer(x), F.linear(x, w.to(stored).float()))


def test_state_dict_round_trip_and_back_to_dense():
    q = random_weight("Q4_K", 32, 256)
    layer = ggml_linear(q, torch.zeros(32))
    sd = layer.state_dict()
    assert isinstance(sd["weight"], QuantizedWeight) and sd["weight"].raw is q.raw
    with torch.device("meta"):
        other = GGMLLinear(256, 32)
    other.load_state_dict(sd, assign=True)
    x = torch.randn(4, 256)
    assert torch.equal(other(x), layer(x))
    # A plain tensor turns the layer back into an ordinary dense one.
    dense = torch.randn(32, 256)
    other.load_state_dict({"weight": dense, "bias": torch.zeros(32)})
    assert not other.is_quantized and torch.equal(other.weight, dense)
    assert torch.equal(other(x), F.linear(x, dense, torch.zeros(32)))


def test_wrong_shape_and_unsupported_type_are_refused():
    with torch.device("meta"):
        layer = GGMLLinear(256, 32)
    with pytest.raises(RuntimeError, match="shape"):
        layer.load_state_dict(
            {"weight": random_weight("Q8_0", 16, 256), "bias": torch.zeros(32)}, assign=True
        )
    raw = torch.zeros(32 * 66, dtype=torch.uint8)  # IQ2_XXS: a valid size, but no kernel
    with pytest.raises(RuntimeError, match="IQ2_XXS"):
        layer.load_state_dict(
            {"weight": QuantizedWeight(raw, GGMLType.IQ2_XXS, (32, 256)), "bias": torch.zeros(32)},
            assign=True,
        )
    with pytest.raises(ValueError, match="bytes"):
        QuantizedWeight(torch.zeros(10, dtype=torch.uint8), GGMLType.Q8_0, (32, 256))


def test_shared_buffers_are_reused_and_never_leak_between_layers():
    release_buffers()
    a = ggml_linear(random_weight("Q8_0", 64, 256, seed=1), None)
    b = ggml_linear(random_weight("Q8_0", 64, 256, seed=2), None)
    x = torch.randn(2, 256)
    wa = dequantize(a.qweight.raw, GGMLType.Q8_0, (64, 256))
    wb = dequantize(b.qweight.raw, GGMLType.Q8_0, (64, 256))
    with torch.no_grad():
        ya, yb = a(x), b(x)
        ya2 = a(x)
    assert torch.equal(ya, F.linear(x, wa)) and torch.equal(yb, F.linear(x, wb)) and torch.equal(ya2, ya)
    # Autograd holds the weight for backward: no shared buffer then, gradients stay right.
    xg = x.clone().requires_grad_(True)
    ya = a(xg)
    b(xg)  # would overwrite a shared buffer
    ya.sum().backward()
    assert torch.allclose(xg.grad, wa.sum(0).expand_as(x))
    set_buffer_reuse(False)
    try:
        with torch.no_grad():
            assert torch.equal(a(x), F.linear(x, wa))
    finally:
        set_buffer_reuse(True)


def test_small_weights_are_cached_per_dtype():
    layer = ggml_linear(random_weight("Q8_0", 4, 64), None)
    x = torch.randn(1, 64)
    layer(x)
    assert layer._cache is not None and layer._cache[0] == torch.float32
    y16 = layer(x.bfloat16())
    assert y16.dtype == torch.bfloat16 and layer._cache[0] == torch.bfloat16


def test_embedding_decodes_only_the_rows_it_needs():
    vocab, dim = 300, 64
    q = random_weight("Q8_0", vocab, dim)
    with torch.device("meta"):
        emb = GGMLEmbedding(vocab, dim, padding_idx=0, dtype=torch.float32)
    emb.load_state_dict({"weight": q}, assign=True)
    ids = torch.tensor([[5, 299, 5], [0, 17, 42]])
    table = dequantize(q.raw, q.ggml_type, q.shape)
    assert torch.equal(emb(ids), F.embedding(ids, table))
    emb = emb.to(torch.bfloat16)  # compute dtype follows module.to like a parameter would
    out = emb(ids)
    assert out.dtype == torch.bfloat16 and torch.equal(out, F.embedding(ids, table).bfloat16())


def test_ops_factory_is_a_drop_in_for_lens_models():
    from lens_core.mmdit import LensMMDiT
    from lens_core.random_weights import tiny_configs

    cfg = tiny_configs()[0]
    with torch.device("meta"):
        model = LensMMDiT(cfg, operations=GGMLOps)
    names = ggml_linear_names(model)
    assert "transformer_blocks.0.attn.img_qkv" in names and "proj_out" in names
    assert ggml_linear_shapes(model)["transformer_blocks.0.img_mod.1"] == (6 * cfg.inner_dim, cfg.inner_dim)


# ------------------------------------------------------------------------------------------
# LoRA
# ------------------------------------------------------------------------------------------


def test_lora_patch_equals_merged_weight():
    q = random_weight("Q5_K", 96, 256)
    bias = torch.randn(96)
    layer = ggml_linear(q, bias)
    down, up = torch.randn(4, 256), torch.randn(32, 4)
    up_bias = torch.randn(32)
    layer.add_lora(down, up, 0.5, rows=(32, 64), up_bias=up_bias)  # the "k" third of a fused qkv
    layer.lora_patches.append((torch.randn(2, 256), torch.randn(96, 2), -0.25))  # plain tuple form
    w = dequantize(q.raw, q.ggml_type, q.shape).clone()
    w[32:64] += (up @ down) * 0.5
    d2, u2, s2 = layer.lora_patches[1]
    w += (u2 @ d2) * s2
    b = bias.clone()
    b[32:64] += up_bias * 0.5
    x = torch.randn(3, 256)
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, w, b))
    assert isinstance(LoraPatch(down, up), LoraPatch)
    with pytest.raises(ValueError, match="do not fit"):
        layer.add_lora(torch.randn(4, 128), up)
    clear_lora_patches(layer)
    assert not layer.lora_patches


def test_lora_file_on_a_gguf_model_equals_merged_dense_model(tmp_path):
    """A parsed LoRA file patched onto a quantised model == the same LoRA merged (lens_core.lora)
    into a dense model holding the decoded weights."""
    from lens_core.lora import LoraModule, merge_lora_
    from lens_core.mmdit import LensMMDiT
    from lens_core.random_weights import randomize_, tiny_configs

    cfg = tiny_configs()[0]
    dense = randomize_(LensMMDiT(cfg), 0).eval().requires_grad_(False)  # frozen, like loaded models
    with torch.device("meta"):
        model = LensMMDiT(cfg, operations=GGMLOps)
    state = {}
    for k, v in dense.state_dict().items():
        if v.ndim == 2 and v.shape[1] % 32 == 0 and "txt_norm" not in k:
            state[k] = QuantizedWeight(quantize(v, GGMLType.Q8_0), GGMLType.Q8_0, v.shape)
        else:
            state[k] = v
    model.load_state_dict(state, assign=True)
    model.eval()
    decoded = {k: (v.dequantize() if isinstance(v, QuantizedWeight) else v) for k, v in state.items()}
    dense.load_state_dict(decoded)

    g = torch.Generator().manual_seed(0)
    inner = cfg.inner_dim
    modules = {
        ("transformer_blocks.0.attn.img_qkv", 1): LoraModule(
            "transformer_blocks.0.attn.img_qkv",
            torch.randn(4, inner, generator=g),
            torch.randn(inner, 4, generator=g) * 0.1,
            alpha=2.0,
            part=1,
        ),
        ("transformer_blocks.1.img_mlp.w1", None): LoraModule(
            "transformer_blocks.1.img_mlp.w1",
            torch.randn(8, inner, generator=g),
            torch.randn(cfg.mlp_hidden_dim, 8, generator=g) * 0.1,
        ),
    }
    apply_lora_patches(model, modules, strength=0.7)
    merge_lora_(dense, modules, scale=0.7)
    x = torch.randn(1, 12, 128, generator=g)
    feats = [torch.randn(1, 5, cfg.enc_hidden_dim, generator=g) for _ in range(cfg.num_text_layers)]
    mask = torch.ones(1, 5, dtype=torch.bool)
    with torch.no_grad():
        a = model(x, torch.tensor([0.4]), feats, mask, (3, 4))
        b = dense(x, torch.tensor([0.4]), feats, mask, (3, 4))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="not a GGML linear|does not have"):
        apply_lora_patches(model, {("txt_norm.0", None): modules[("transformer_blocks.1.img_mlp.w1", None)]})
