"""Parity of lens_core.mmdit with the upstream Lens transformer, via golden tensors.

The fixture (tests/fixtures/mmdit_golden.safetensors, written by make_mmdit_golden.py) holds a tiny
random model in the real checkpoint layout and the upstream code's fp32 outputs for it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

from lens_core.mmdit import (
    LensMMDiT,
    MMDiTConfig,
    build_joint_attention_mask,
    rope_positions,
)

FIXTURE = Path(__file__).parent / "fixtures" / "mmdit_golden.safetensors"
RELEASED_CONFIG = Path(__file__).parents[1] / "lens_core" / "configs" / "transformer_config.json"
RELEASED_PARAMS = 4_104_225_152
TOL = 1e-5  # max |ours - reference| relative to max |reference|, fp32


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


@pytest.fixture(scope="module")
def golden() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(FIXTURE), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


@pytest.fixture(scope="module")
def ref_state_dict(golden) -> dict[str, torch.Tensor]:
    tensors, meta = golden
    exps = json.loads(meta["weight_scale_log2"])
    # Weights are int8 codes times a power of two: decoding is exact in fp32.
    return {
        k[len("model.") :]: v.float() * 2.0 ** -exps[k[len("model.") :]]
        for k, v in tensors.items()
        if k.startswith("model.")
    }


@pytest.fixture(scope="module")
def model(ref_state_dict) -> LensMMDiT:
    cfg = MMDiTConfig.from_state_dict_shapes({k: v.shape for k, v in ref_state_dict.items()})
    m = LensMMDiT(cfg)
    m.load_state_dict(ref_state_dict, strict=True)
    return m.eval()


def case_inputs(golden, case: str):
    tensors, meta = golden
    p = f"fwd_{case}."
    h, w = json.loads(meta["forward_cases"])[case]["grid"]
    feats = [tensors[f"{p}txt_feats.{i}"] for i in range(4)]
    return tensors[p + "x"], tensors[p + "sigma"], feats, tensors[p + "mask"].bool(), (h, w)


def run(m: LensMMDiT, inputs) -> torch.Tensor:
    with torch.no_grad():
        return m(*inputs)


# --------------------------------------------------------------------------------- parity


def test_config_inferred_from_shapes(model, golden):
    cfg = model.config
    ref_cfg = json.loads(golden[1]["config"])
    assert (cfg.num_layers, cfg.num_attention_heads, cfg.attention_head_dim) == (2, 2, 64)
    assert (cfg.enc_hidden_dim, cfg.num_text_layers, cfg.mlp_hidden_dim) == (32, 4, 341)
    assert (cfg.in_channels, cfg.out_channels, cfg.patch_size) == (128, 32, 2)
    assert cfg == MMDiTConfig.from_json(ref_cfg)


@pytest.mark.parametrize("case", ["h5w3", "h4w7"])
def test_rope_matches_reference(model, golden, case):
    tensors, meta = golden
    h, w, s = json.loads(meta["rope_cases"])[case]
    cos, sin = model.rope(h, w, s, torch.device("cpu"))
    ref = torch.cat([tensors[f"rope.{case}.img"], tensors[f"rope.{case}.txt"]], dim=0)
    assert cos.shape == sin.shape == (h * w + s, 32)
    torch.testing.assert_close(cos, ref[..., 0], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, ref[..., 1], rtol=0, atol=1e-6)


def test_rope_positions_layout():
    pos = rope_positions(5, 3, 2)
    assert pos[:, 0].tolist() == [0] * 15 + [2, 3]
    assert pos[:15, 1].tolist() == [r for r in (-3, -2, -1, 0, 1) for _ in range(3)]
    assert pos[:3, 2].tolist() == [-2, -1, 0]
    assert pos[15:, 1:].tolist() == [[2, 2], [3, 3]]  # text starts at max(5//2, 3//2)


def test_block_matches_reference(model, golden):
    tensors, _ = golden
    img, txt = tensors["block.in.img"], tensors["block.in.txt"]
    mask = build_joint_attention_mask(tensors["block.in.mask"].bool(), img.shape[1])
    rope = model.rope(5, 3, txt.shape[1], torch.device("cpu"))
    with torch.no_grad():
        out_img, out_txt = model.transformer_blocks[1](img, txt, tensors["block.in.temb"], rope, mask)
    assert rel_err(out_img, tensors["block.out.img"]) < TOL
    assert rel_err(out_txt, tensors["block.out.txt"]) < TOL


@pytest.mark.parametrize("case", ["square", "padded"])
def test_forward_matches_reference(model, golden, case):
    inputs = case_inputs(golden, case)
    if case == "padded":
        assert not inputs[3][1].any()  # one row is an empty negative prompt
    out = run(model, inputs)
    ref = golden[0][f"fwd_{case}.out"]
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert rel_err(out, ref) < TOL


def _swap_halves(t: torch.Tensor, a: slice, b: slice) -> None:
    tmp = t[a].clone()
    t[a] = t[b]
    t[b] = tmp


def _perturb_norm_out_order(m: LensMMDiT) -> None:
    d = m.config.inner_dim
    for p in (m.norm_out.linear.weight, m.norm_out.linear.bias):
        _swap_halves(p.data, slice(0, d), slice(d, 2 * d))  # = reading (shift, scale) instead


def _perturb_block_shift_scale(m: LensMMDiT) -> None:
    d = m.config.inner_dim
    lin = m.transformer_blocks[0].img_mod[1]
    for p in (lin.weight, lin.bias):
        _swap_halves(p.data, slice(0, d), slice(d, 2 * d))


def _perturb_drop_qk_norm(m: LensMMDiT) -> None:
    m.transformer_blocks[1].attn.norm_k = nn.Identity()


def _perturb_drop_txt_norm(m: LensMMDiT) -> None:
    m.txt_norm[2] = nn.Identity()


@pytest.mark.parametrize(
    "perturb",
    [_perturb_norm_out_order, _perturb_block_shift_scale, _perturb_drop_qk_norm, _perturb_drop_txt_norm],
)
def test_tolerance_catches_perturbed_variants(model, golden, perturb):
    broken = copy.deepcopy(model)
    perturb(broken)
    err = rel_err(run(broken, case_inputs(golden, "padded")), golden[0]["fwd_padded.out"])
    assert err > 100 * TOL, f"{perturb.__name__} went unnoticed (rel err {err:.2e})"


# --------------------------------------------------------------------------- construction


def test_meta_construction_and_assign_load(ref_state_dict, golden):
    cfg = MMDiTConfig.from_state_dict_shapes({k: v.shape for k, v in ref_state_dict.items()})
    with torch.device("meta"):
        m = LensMMDiT(cfg)
    assert all(t.is_meta for t in m.state_dict().values())
    assert set(m.state_dict()) == set(ref_state_dict)  # no buffers, RoPE tables stay out
    m.load_state_dict(ref_state_dict, strict=True, assign=True)
    m.eval()
    assert not any(t.is_meta for t in m.state_dict().values())
    assert rel_err(run(m, case_inputs(golden, "square")), golden[0]["fwd_square.out"]) < TOL


def test_released_config_from_json_and_param_count():
    cfg = MMDiTConfig.from_json(json.loads(RELEASED_CONFIG.read_text()))
    assert cfg == MMDiTConfig()
    assert (cfg.num_layers, cfg.inner_dim, cfg.mlp_hidden_dim, cfg.out_dim) == (48, 1536, 4096, 128)
    with torch.device("meta"):
        m = LensMMDiT(cfg, dtype=torch.bfloat16)
    assert sum(p.numel() for p in m.parameters()) == RELEASED_PARAMS
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert MMDiTConfig.from_state_dict_shapes(shapes) == cfg
    for key in (
        "time_text_embed.timestep_embedder.linear_2.weight",
        "txt_norm.3.weight",
        "transformer_blocks.47.attn.to_out.0.bias",
        "transformer_blocks.0.attn.norm_added_k.weight",
        "transformer_blocks.5.txt_mod.1.weight",
        "transformer_blocks.9.img_mlp.w3.weight",
        "norm_out.linear.bias",
        "proj_out.weight",
    ):
        assert key in shapes


def test_from_json_rejects_other_layouts():
    with pytest.raises(ValueError, match="gate_mlp"):
        MMDiTConfig.from_json({"gate_mlp": False})
    with pytest.raises(ValueError, match="inner_dim"):
        MMDiTConfig.from_json({"inner_dim": 1024})
    assert MMDiTConfig.from_json({"_class_name": "X", "unknown": 1, "num_layers": 3}).num_layers == 3


def test_from_state_dict_shapes_names_missing_tensor(ref_state_dict):
    shapes = {k: v.shape for k, v in ref_state_dict.items()}
    for missing in ("txt_in.weight", "transformer_blocks.0.attn.norm_q.weight", "proj_out.weight"):
        with pytest.raises(ValueError, match=missing.replace(".", r"\.")):
            MMDiTConfig.from_state_dict_shapes({k: v for k, v in shapes.items() if k != missing})
    with pytest.raises(ValueError, match=r"img_in\.weight"):
        MMDiTConfig.from_state_dict_shapes({f"model.diffusion_model.{k}": v for k, v in shapes.items()})
    gap = {k: v for k, v in shapes.items() if not k.startswith("transformer_blocks.0.")}
    with pytest.raises(ValueError, match=r"transformer_blocks\.0\."):
        MMDiTConfig.from_state_dict_shapes(gap)


# ------------------------------------------------------------------------------- behaviour


def test_bf16_close_to_fp32(model, golden):
    inputs = case_inputs(golden, "padded")
    ref = run(model, inputs)
    m16 = copy.deepcopy(model).to(torch.bfloat16)
    out = run(m16, inputs)
    assert out.dtype == torch.float32  # returned in x's dtype
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 2e-2, rel  # measured ~6e-3


def test_mask_fast_path_equals_explicit_mask(model, golden, monkeypatch):
    inputs = case_inputs(golden, "square")
    assert bool(inputs[3].all())
    fast = run(model, inputs)
    monkeypatch.setattr(LensMMDiT, "_attention_mask", staticmethod(build_joint_attention_mask))
    explicit = run(model, inputs)
    torch.testing.assert_close(fast, explicit, rtol=1e-5, atol=1e-6)


def test_padded_text_tokens_are_ignored(model, golden):
    x, sigma, feats, mask, grid = case_inputs(golden, "square")
    out = run(model, (x, sigma, feats, mask, grid))
    gen = torch.Generator().manual_seed(1)
    extra = [
        torch.cat([f, 100 * torch.randn(f.shape[0], 3, f.shape[2], generator=gen)], dim=1) for f in feats
    ]
    padded_mask = torch.cat([mask, torch.zeros(mask.shape[0], 3, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(run(model, (x, sigma, extra, padded_mask, grid)), out, rtol=1e-5, atol=1e-5)


def test_all_false_mask_batch_is_finite(model, golden):
    x, sigma, feats, mask, grid = case_inputs(golden, "padded")
    out = run(model, (x, sigma, [torch.zeros_like(f) for f in feats], torch.zeros_like(mask), grid))
    assert torch.isfinite(out).all()


def test_gradient_checkpointing_same_gradients(model, golden):
    x, sigma, feats, mask, grid = case_inputs(golden, "padded")

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        m = copy.deepcopy(model).train()
        m.gradient_checkpointing = checkpointing
        m(x, sigma, feats, mask, grid).square().mean().backward()
        return {k: p.grad for k, p in m.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and len(plain) > 0
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-5, atol=1e-7, msg=k)


def test_rope_cache_reused_and_not_in_state_dict(model):
    a = model.rope(3, 4, 5, torch.device("cpu"))
    b = model.rope(3, 4, 5, torch.device("cpu"))
    assert a[0] is b[0]
    assert not any("rope" in k for k in model.state_dict())


def test_forward_rejects_bad_shapes(model, golden):
    x, sigma, feats, mask, _ = case_inputs(golden, "padded")
    with pytest.raises(ValueError, match="grid_hw"):
        run(model, (x, sigma, feats, mask, (4, 4)))
    with pytest.raises(ValueError, match="text feature"):
        run(model, (x, sigma, feats[:3], mask, (5, 3)))
    with pytest.raises(ValueError, match="txt_mask"):
        run(model, (x, sigma, feats, mask[:, :2], (5, 3)))


def test_config_validation():
    with pytest.raises(ValueError, match="axes_dims_rope"):
        MMDiTConfig(attention_head_dim=32)
