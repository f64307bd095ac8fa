"""GPT-OSS feature encoder and MXFP4 packing, checked against transformers' GptOss implementation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import GptOssConfig as HFGptOssConfig  # noqa: E402
from transformers import GptOssForCausalLM  # noqa: E402
from transformers.integrations.mxfp4 import convert_moe_packed_tensors  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

import lens_core.text_encoder as te  # noqa: E402
from lens_core.mxfp4 import (  # noqa: E402
    dequantize_expert_weight,
    dequantize_mxfp4,
    e2m1_table,
    quantize_expert_weight,
    quantize_mxfp4,
)
from lens_core.text_encoder import GptOssConfig, GptOssEncoder  # noqa: E402

CONFIG_JSON = Path(__file__).resolve().parents[1] / "lens_core" / "configs" / "text_encoder_config.json"
SELECTED = (1, 3, 5)  # 5 is the last layer of the tiny model
VOCAB = 320
PAD = 0


def tiny_hf_config() -> HFGptOssConfig:
    return HFGptOssConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=32,  # MXFP4 packs the contracted axis: H for gate_up, I for down
        num_local_experts=8,
        num_experts_per_tok=2,
        sliding_window=8,
        pad_token_id=PAD,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 150000.0,
            "factor": 32.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
        },
        attn_implementation="eager",
        experts_implementation="eager",
    )


@pytest.fixture(scope="module")
def hf_model() -> GptOssForCausalLM:
    torch.manual_seed(1234)
    model = GptOssForCausalLM(tiny_hf_config()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate_up_proj_bias"):
                p.normal_(0.0, 5.0)  # large enough for the +-7 SwiGLU clamps to bite
            elif name.endswith(("bias", "sinks")):
                p.normal_(0.0, 0.5)  # non-zero sinks and biases
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("embed_tokens.weight") or name.endswith("router.weight"):
                p.normal_(0.0, 1.0)
            elif name.endswith("gate_up_proj"):
                p.normal_(0.0, 0.05)
            elif name.endswith("down_proj"):
                p.normal_(0.0, 0.01)
            elif name.endswith("o_proj.weight"):
                p.normal_(0.0, 0.05)
            else:
                p.normal_(0.0, 0.15)
    return model


def hf_features(
    model: GptOssForCausalLM, ids: torch.Tensor, mask: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """HF outputs of decoder layers SELECTED (raw, via a hook on each) and ``hidden_states[-1]``."""
    captured: dict[int, torch.Tensor] = {}
    hooks = [
        model.model.layers[i].register_forward_hook(lambda _m, _a, out, i=i: captured.__setitem__(i, out))
        for i in SELECTED
    ]
    try:
        with torch.no_grad():
            out = model(ids, attention_mask=mask, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    return [captured[i] for i in SELECTED], out.hidden_states[-1]


def build_encoder(sd: dict[str, torch.Tensor], expert_format: str = "dense") -> GptOssEncoder:
    cfg = GptOssConfig.from_json(tiny_hf_config().to_dict())
    enc = GptOssEncoder(cfg, SELECTED, expert_format=expert_format, device="meta")
    enc.load_state_dict(enc.filter_state_dict(sd), strict=True, assign=True)
    return enc.eval()


@pytest.fixture(scope="module")
def encoder(hf_model) -> GptOssEncoder:
    return build_encoder(hf_model.state_dict())


def random_ids(batch: int, seq: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, seq), generator=g)


# ---------------------------------------------------------------------------------------------


def test_hf_state_dict_minus_unused_loads_strictly(hf_model, encoder):
    sd = hf_model.state_dict()
    dropped = set(sd) - set(encoder.state_dict())
    assert "model.norm.weight" in dropped and "lm_head.weight" in dropped
    assert not any(k.startswith(("model.layers.6.",)) for k in encoder.state_dict())
    assert len(encoder.model.layers) == max(SELECTED) + 1
    # Everything else is an HF name, unchanged.
    assert set(encoder.state_dict()) <= set(sd)


def test_matches_transformers_per_layer(hf_model, encoder, monkeypatch):
    ids = random_ids(2, 40, seed=0)  # 40 tokens > sliding window 8
    mask = torch.ones_like(ids)
    expected, final_normed = hf_features(hf_model, ids, mask)

    gate_max, up_min = [], []
    real_swiglu = te.expert_swiglu

    def spy(x, gate_up, gate_up_bias, down, down_bias, limit, alpha):
        h = x @ gate_up + gate_up_bias
        gate_max.append(h[:, 0::2].max().item())
        up_min.append(h[:, 1::2].min().item())
        return real_swiglu(x, gate_up, gate_up_bias, down, down_bias, limit, alpha)

    monkeypatch.setattr(te, "expert_swiglu", spy)
    with torch.no_grad():
        feats = encoder(ids, mask)
    assert max(gate_max) > 7 and min(up_min) < -7, "test weights should exercise the SwiGLU clamps"

    assert len(feats) == len(SELECTED)
    for got, want in zip(feats, expected, strict=True):
        assert got.shape == (2, 40, 64) and got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # The layer-23 trap: HF's last hidden state is after the final norm, the feature is not.
    assert (final_normed - expected[-1]).abs().max() > 1e-2
    torch.testing.assert_close(feats[-1], expected[-1], atol=1e-5, rtol=1e-5)


def test_right_padded_batch_matches_single_runs(hf_model, encoder):
    lengths = (40, 23)
    prompts = [random_ids(1, n, seed=10 + n) for n in lengths]
    ids = torch.full((2, max(lengths)), PAD, dtype=torch.long)
    mask = torch.zeros(2, max(lengths), dtype=torch.bool)
    for row, (p, n) in enumerate(zip(prompts, lengths, strict=True)):
        ids[row, :n] = p[0]
        mask[row, :n] = True
    with torch.no_grad():
        batched = encoder(ids, mask)
        singles = [encoder(p, torch.ones_like(p)) for p in prompts]
    for layer, feat in enumerate(batched):
        for row, n in enumerate(lengths):
            torch.testing.assert_close(feat[row, :n], singles[row][layer][0], atol=1e-5, rtol=1e-5)
    # The padded batch also matches transformers with the same padding mask (int mask this time).
    expected, _ = hf_features(hf_model, ids, mask.long())
    for got, want in zip(encoder(ids, mask.long()), expected, strict=True):
        torch.testing.assert_close(got[mask], want[mask], atol=1e-5, rtol=1e-5)


def test_all_padding_row_stays_finite(encoder):
    ids = torch.full((1, 5), PAD, dtype=torch.long)
    with torch.no_grad():
        feats = encoder(ids, torch.zeros(1, 5, dtype=torch.bool))
    assert all(torch.isfinite(f).all() for f in feats)  # the sink keeps the softmax defined


def test_yarn_frequencies_match_transformers():
    for truncate in (False, True):
        hf_cfg = HFGptOssConfig.from_dict(json.loads(CONFIG_JSON.read_text()))
        hf_cfg.rope_parameters["truncate"] = truncate
        want_freq, want_gain = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg)
        cfg = GptOssConfig.from_json(CONFIG_JSON)
        cfg.rope_scaling["truncate"] = truncate
        got_freq, got_gain = te.rope_inverse_frequencies(cfg)
        assert torch.equal(got_freq, want_freq.float())
        assert got_gain == pytest.approx(want_gain, abs=0, rel=1e-15)


# ---------------------------------------------------------------------------------------------
# MXFP4


def test_mxfp4_nibble_order_and_scale():
    blocks = torch.zeros(1, 16, dtype=torch.uint8)
    blocks[0, 0] = 0x72  # low nibble 2 (+1.0) is element 0, high nibble 7 (+6.0) element 1
    blocks[0, 1] = 0x9F  # element 2: code 15 (-6.0), element 3: code 9 (-0.5)
    scales = torch.tensor([127 + 3], dtype=torch.uint8)  # 2 ** 3
    out = dequantize_mxfp4(blocks, scales, torch.float32)
    assert out.shape == (32,)
    assert out[:4].tolist() == [8.0, 48.0, -48.0, -4.0]
    assert torch.all(out[4:] == 0)
    assert e2m1_table().tolist()[:8] == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def test_quantizer_is_round_to_nearest():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 96, generator=g) * torch.logspace(-4, 4, 6)[:, None]
    x[0, :32] = 0.0  # an all-zero group
    blocks, scales = quantize_mxfp4(x)
    assert blocks.shape == (6, 3, 16) and scales.shape == (6, 3)
    assert blocks.dtype == scales.dtype == torch.uint8
    deq = dequantize_mxfp4(blocks, scales, torch.float32)
    groups, deq_groups = x.view(6, 3, 32), deq.view(6, 3, 32)
    step = torch.ldexp(torch.ones(scales.shape), scales.int() - 127)  # [6, 3]
    amax = groups.abs().amax(-1)
    nonzero = amax > 0
    # Smallest power-of-two scale that fits the group's largest value into +-6.
    assert torch.all(amax[nonzero] <= 6 * step[nonzero])
    assert torch.all(amax[nonzero] > 3 * step[nonzero])
    # Every value is the nearest representable one for its group's scale.
    candidates = e2m1_table()[None, None, None, :] * step[..., None, None]  # [6, 3, 1, 16]
    best = (groups[..., None] - candidates).abs().amin(-1)
    assert torch.allclose((groups - deq_groups).abs(), best, rtol=0, atol=1e-30)
    assert torch.equal(deq_groups[0, 0], torch.zeros(32))
    # Representable values round-trip exactly.
    again = dequantize_mxfp4(*quantize_mxfp4(deq), torch.float32)
    assert torch.equal(again, deq)


def quantized_state_dict(hf_model) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(mxfp4 state dict in the HF checkpoint layout, dense state dict holding the dequantised experts)."""
    mx, dense = {}, {}
    for name, value in hf_model.state_dict().items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = quantize_expert_weight(value)
            mx[name + "_blocks"], mx[name + "_scales"] = blocks, scales
            # transformers' own dequantiser is the reference for the layout.
            reference = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
            assert reference.shape == value.shape
            assert torch.equal(dequantize_expert_weight(blocks, scales, torch.float32), reference)
            dense[name] = reference
        else:
            mx[name] = dense[name] = value
    return mx, dense


def test_mxfp4_dequant_is_bit_exact_with_transformers():
    g = torch.Generator().manual_seed(5)
    blocks = torch.randint(0, 256, (3, 10, 4, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(0, 256, (3, 10, 4), dtype=torch.uint8, generator=g)  # the whole E8M0 range
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        want = convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # [3, 128, 10]
        got = dequantize_expert_weight(blocks, scales, dtype)
        assert got.dtype == dtype and torch.equal(got, want)


def test_mxfp4_encoder_equals_dense_on_dequantised_weights(hf_model, monkeypatch):
    mx_sd, dense_sd = quantized_state_dict(hf_model)
    mx_enc = build_encoder(mx_sd, "mxfp4")
    dense_enc = build_encoder(dense_sd, "dense")
    experts = mx_enc.model.layers[0].mlp.experts
    assert experts.gate_up_proj_blocks.dtype == torch.uint8
    assert experts.gate_up_proj_blocks.shape == (8, 64, 2, 16)
    assert experts.down_proj_blocks.shape == (8, 64, 1, 16) and not hasattr(experts, "gate_up_proj")

    ids = random_ids(2, 24, seed=7)
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0
    with torch.no_grad():
        got, want = mx_enc(ids, mask), dense_enc(ids, mask)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_mxfp4_dequantises_only_routed_experts(hf_model, monkeypatch):
    mx_sd, _ = quantized_state_dict(hf_model)
    enc = build_encoder(mx_sd, "mxfp4")
    ids = random_ids(1, 2, seed=11)  # 2 tokens x top-2: at most 4 of the 8 experts per layer

    routed: dict[int, set[int]] = {}
    hooks = []
    for i, layer in enumerate(enc.model.layers):
        k = layer.mlp.top_k

        def record(_m, _a, logits, i=i, k=k):
            routed[i] = set(torch.topk(logits, k, dim=-1).indices.flatten().tolist())

        hooks.append(layer.mlp.router.register_forward_hook(record))

    calls: list[tuple[int, ...]] = []
    real = te.dequantize_mxfp4

    def counting(blocks, scales, dtype):
        calls.append(tuple(blocks.shape))
        return real(blocks, scales, dtype)

    seen: dict[int, list[int]] = {}
    for i, layer in enumerate(enc.model.layers):
        real_weights = layer.mlp.experts.expert_weights

        def spy(expert, device, dtype, i=i, real_weights=real_weights):
            seen.setdefault(i, []).append(expert)
            return real_weights(expert, device, dtype)

        monkeypatch.setattr(layer.mlp.experts, "expert_weights", spy)
    monkeypatch.setattr(te, "dequantize_mxfp4", counting)
    with torch.no_grad():
        enc(ids, torch.ones_like(ids))
    for h in hooks:
        h.remove()

    assert set(seen) == set(routed) == set(range(len(enc.model.layers)))
    for i in routed:
        assert sorted(seen[i]) == sorted(routed[i])  # each routed expert once, nothing else
        assert len(routed[i]) < 8
    # Two matrices per routed expert, each a single expert's blocks (never the whole [E, ...] tensor).
    assert len(calls) == 2 * sum(len(r) for r in routed.values())
    assert all(len(shape) == 3 for shape in calls)


# ---------------------------------------------------------------------------------------------
# Configs


def expected_parameter_count(d: dict, layers: int, expert_format: str) -> int:
    h, v = d["hidden_size"], d["vocab_size"]
    nh, nkv, hd = d["num_attention_heads"], d["num_key_value_heads"], d["head_dim"]
    e, i = d["num_local_experts"], d["intermediate_size"]
    attn = (h * nh * hd + nh * hd) + 2 * (h * nkv * hd + nkv * hd) + (nh * hd * h + h) + nh
    norms = 2 * h
    router = e * h + e
    if expert_format == "dense":
        expert_weights = e * (h * 2 * i + i * h)
    else:  # 32 values -> 16 block bytes + 1 scale byte
        expert_weights = e * (2 * i * (h // 32) * 17 + h * (i // 32) * 17)
    expert_bias = e * (2 * i + h)
    return v * h + layers * (attn + norms + router + expert_weights + expert_bias)


def test_released_config_builds_on_meta_with_expected_size():
    d = json.loads(CONFIG_JSON.read_text())
    cfg = GptOssConfig.from_json(d)
    assert cfg == GptOssConfig()  # the dataclass defaults are the released config
    assert cfg.layer_types[:2] == ("sliding_attention", "full_attention") and len(cfg.layer_types) == 24
    enc = GptOssEncoder(cfg, device="meta", dtype=torch.bfloat16)
    assert len(enc.model.layers) == 24
    count = sum(p.numel() for p in enc.parameters())
    assert count == expected_parameter_count(d, 24, "dense")
    assert 20.0e9 < count < 21.0e9  # gpt-oss-20b minus lm_head and final norm
    mx = GptOssEncoder(
        cfg, selected_layers=(5, 11), expert_format="mxfp4", device="meta", dtype=torch.bfloat16
    )
    assert len(mx.model.layers) == 12  # early exit: later layers are never built
    assert sum(p.numel() for p in mx.parameters()) == expected_parameter_count(d, 12, "mxfp4")


def test_from_json_older_rope_spelling():
    d = json.loads(CONFIG_JSON.read_text())
    rope = d.pop("rope_parameters")
    d["rope_theta"] = rope.pop("rope_theta")
    d["rope_scaling"] = rope
    del d["layer_types"]
    assert GptOssConfig.from_json(d) == GptOssConfig()


INFERRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "num_local_experts",
)


def test_config_from_state_dict_shapes():
    cfg = GptOssConfig.from_json(tiny_hf_config().to_dict())
    for fmt in ("dense", "mxfp4"):
        enc = GptOssEncoder(cfg, selected_layers=(5,), expert_format=fmt, device="meta")
        shapes = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
        unprefixed = {k.removeprefix("model."): v for k, v in shapes.items()}
        for variant in (shapes, unprefixed):
            inferred = GptOssConfig.from_state_dict_shapes(variant)
            for name in INFERRED_FIELDS:
                assert getattr(inferred, name) == getattr(cfg, name), name
            assert inferred.layer_types == cfg.layer_types  # alternating by default
    released = GptOssEncoder(GptOssConfig(), expert_format="mxfp4", device="meta").state_dict()
    assert GptOssConfig.from_state_dict_shapes(released) == GptOssConfig()

    del shapes["model.layers.0.self_attn.sinks"]
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.sinks"):
        GptOssConfig.from_state_dict_shapes(shapes)
    with pytest.raises(ValueError, match="embed_tokens"):
        GptOssConfig.from_state_dict_shapes({"transformer_blocks.0.attn.img_qkv.weight": (3, 3)})


def test_bad_arguments():
    cfg = GptOssConfig.from_json(tiny_hf_config().to_dict())
    with pytest.raises(ValueError):
        GptOssEncoder(cfg, selected_layers=(6,), device="meta")
    with pytest.raises(ValueError):
        GptOssEncoder(cfg, selected_layers=(), device="meta")
    with pytest.raises(ValueError):
        GptOssEncoder(cfg, expert_format="nvfp4", device="meta")
