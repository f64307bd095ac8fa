"""fp8 weights (quant.fp_formats.Fp8Weight) and fp8 checkpoints (plain, ComfyUI's scaled fp8, the
comfy_quant float8 formats): decoding against a numpy decode of the bit layout, quantisers, packed
layers (LoRA, dtype moves, embeddings), whole MMDiT files whose forward equals a dense model holding
the independently decoded weights, and clear errors for broken files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from lens_core.errors import CheckpointError
from lens_core.loading import load_mmdit
from lens_core.mmdit import LensMMDiT
from lens_core.safetensors_io import save_file_atomic
from quant import fp_formats
from quant.comfy_quant import pack_weight
from quant.fp_formats import Fp8Weight, MXFP8Weight, quantize_fp8, quantize_mxfp8
from quant.layers import GGMLEmbedding, GGMLLinear

from .fp_reference import decode_checkpoint, e4m3, e5m2

FP8 = {"float8_e4m3fn": (torch.float8_e4m3fn, e4m3), "float8_e5m2": (torch.float8_e5m2, e5m2)}


def finite_codes(dtype: torch.dtype) -> torch.Tensor:
    """Every fp8 byte that is a finite number, as fp8."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    values = codes.view(dtype).float()
    return codes[torch.isfinite(values)].view(dtype)


@pytest.mark.parametrize("name", FP8)
def test_every_fp8_code_decodes_like_its_bit_layout(name):
    dtype, reference = FP8[name]
    codes = finite_codes(dtype)
    expected = reference(codes.view(torch.uint8).numpy())
    np.testing.assert_array_equal(Fp8Weight(codes.view(1, -1)).dequantize().double().numpy()[0], expected)
    scale = torch.tensor(0.0123456789)
    w = Fp8Weight(codes.view(1, -1), scale)
    scaled = torch.from_numpy(expected * float(scale)).float()  # exact product, rounded once to fp32
    assert torch.equal(w.dequantize()[0], scaled)
    assert torch.equal(w.dequantize(torch.bfloat16)[0], scaled.to(torch.bfloat16))


def all_codes(dtype: torch.dtype, rows: int = 24) -> torch.Tensor:
    """``[rows, 256]``: every fp8 byte (NaN, inf, -0 included) in every row, each row rotated so
    the codes also meet every column; large enough for torch's vectorised kernels."""
    codes = (torch.arange(256)[None, :] + 7 * torch.arange(rows)[:, None]) % 256
    return codes.to(torch.uint8).view(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    as_int = {4: torch.int32, 2: torch.int16}[a.element_size()]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(as_int), b.view(as_int))


@pytest.fixture(params=["table", "cast"])
def fp8_decoder(request, monkeypatch):
    """Run a test with the lookup-table decoder forced on for every fp8 dtype, and with it off."""
    monkeypatch.setattr(fp_formats, "_uses_table", lambda data: request.param == "table")
    monkeypatch.setattr(fp_formats, "_GATHER_CHUNK", 1000)  # several chunks, one not a whole row
    return request.param


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [1.0, 0.0123456789, 3.0e38])
def test_fp8_decode_is_bit_identical_to_torch_cast(fp8_decoder, fp8, out_dtype, scale):
    codes = all_codes(fp8)
    s = torch.tensor(scale)
    want = (codes.to(torch.float32) * s).to(out_dtype)  # fp32 product, rounded once
    w = Fp8Weight(codes, s)
    assert same_bits(w.dequantize(out_dtype), want)
    out = torch.full((codes.numel(),), 5.0, dtype=out_dtype)
    assert same_bits(w.dequantize(out_dtype, out=out), want) and same_bits(out.view(want.shape), want)
    bank = Fp8Weight(torch.stack([codes, codes.flip(0)]), torch.tensor([scale, 0.5]))
    want_bank = torch.stack([want, (codes.flip(0).to(torch.float32) * 0.5).to(out_dtype)])
    assert same_bits(bank.dequantize(out_dtype), want_bank)
    assert same_bits(bank.dequantize(out_dtype, out=torch.empty(bank.numel(), dtype=out_dtype)), want_bank)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(24, 256), (20, 200)])
def test_mxfp8_decode_is_bit_identical_to_torch_cast(fp8_decoder, out_dtype, shape):
    torch.manual_seed(3)
    x = torch.randn(*shape) * torch.logspace(-30, 30, shape[1], base=2.0)
    data, scales = quantize_mxfp8(x)
    codes = all_codes(torch.float8_e4m3fn, data.shape[0])[:, : data.shape[1]].contiguous()
    w = MXFP8Weight(codes, scales, shape)
    exps = fp_formats.unswizzle_scales(scales, data.shape[0], data.shape[1] // 32).float()
    factor = torch.exp2(exps - 127).repeat_interleave(32, dim=1)  # exact powers of two
    want = (codes.to(torch.float32) * factor)[: shape[0], : shape[1]].to(out_dtype)
    assert same_bits(w.dequantize(out_dtype), want)
    assert same_bits(w.dequantize(out_dtype, out=torch.empty(w.numel(), dtype=out_dtype)).view(shape), want)


def test_table_decoding_is_chosen_for_e4m3_on_cpu_only():
    assert fp_formats._uses_table(torch.zeros(2, dtype=torch.float8_e4m3fn))
    assert not fp_formats._uses_table(torch.zeros(2, dtype=torch.float8_e5m2))
    assert not fp_formats._uses_table(torch.zeros(2, dtype=torch.float8_e4m3fn, device="meta"))


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_quantize_fp8_scaled_and_plain(dtype):
    torch.manual_seed(0)
    x = torch.randn(64, 96) * 0.03
    data, scale = quantize_fp8(x, dtype)
    top = torch.finfo(dtype).max
    assert data.dtype == dtype and torch.isclose(scale, x.abs().max() / top)
    y = Fp8Weight(data, scale).dequantize()
    mantissa_bits = 3 if dtype == torch.float8_e4m3fn else 2
    normal = x.abs() / scale >= torch.finfo(dtype).tiny
    assert ((y - x).abs()[normal] <= x.abs()[normal] * 2.0 ** -(mantissa_bits + 1) + 1e-12).all()
    assert torch.equal(quantize_fp8(y, dtype)[0].view(torch.uint8), data.view(torch.uint8))  # idempotent
    plain, one = quantize_fp8(x / x.abs().max() * 2 * top, dtype, scaled=False)  # plain: clamps at the max
    assert one.item() == 1.0 and plain.float().abs().max().item() == top


def fp8_linear(w: Fp8Weight, bias: torch.Tensor | None) -> GGMLLinear:
    with torch.device("meta"):
        layer = GGMLLinear(w.shape[1], w.shape[0], bias=bias is not None)
    layer.load_state_dict({"weight": w, **({"bias": bias} if bias is not None else {})}, assign=True)
    return layer


def test_fp8_linear_equals_dense_and_survives_dtype_moves_and_lora():
    torch.manual_seed(1)
    data, scale = quantize_fp8(torch.randn(24, 40) * 0.1)
    bias = torch.randn(24)
    layer = fp8_linear(Fp8Weight(data, scale), bias)
    dense = data.float() * scale
    x = torch.randn(3, 5, 40)
    assert layer.is_quantized and layer.weight is None and layer.weight_type == "float8_e4m3fn"
    assert torch.equal(layer(x), F.linear(x, dense, bias))
    # module.to(dtype) converts floating tensors: the packed storage is kept as bytes and survives.
    layer.to(torch.bfloat16)
    assert layer.qweight.data.dtype == torch.float8_e4m3fn
    assert torch.equal(layer.qweight.data.view(torch.uint8), data.view(torch.uint8))
    xb = x.to(torch.bfloat16)
    assert torch.equal(layer(xb), F.linear(xb, dense.to(torch.bfloat16), bias.to(torch.bfloat16)))
    layer.float()  # (the bias went through bf16 and back)
    down, up = torch.randn(4, 40), torch.randn(24, 4)
    layer.add_lora(down, up, 0.5)
    torch.testing.assert_close(layer(x), F.linear(x, dense + 0.5 * up @ down, layer.bias))
    sd = layer.state_dict()
    assert isinstance(sd["weight"], Fp8Weight) and torch.equal(sd["weight"].data.view(torch.uint8), data.view(torch.uint8))


def test_fp8_embedding_keeps_rows_packed():
    torch.manual_seed(2)
    data, scale = quantize_fp8(torch.randn(50, 16))
    with torch.device("meta"):
        emb = GGMLEmbedding(50, 16)
    emb.load_state_dict({"weight": Fp8Weight(data, scale)}, assign=True)
    ids = torch.tensor([[3, 7, 49], [0, 0, 12]])
    assert emb.is_quantized
    assert torch.equal(emb(ids), F.embedding(ids, data.float() * scale))


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def write_fp8_mmdit(state: dict, path, layout: str, prefix: str = "") -> None:
    """The tiny MMDiT with every matrix in ``layout``: ``fp8_e4m3fn`` (plain), ``fp8_scaled``
    (legacy marker), a comfy_quant float8 format, or ``metadata`` (float8_e4m3fn declared in the
    file's ``_quantization_metadata`` instead of comfy_quant tensors)."""
    fmt = "float8_e4m3fn" if layout == "metadata" else layout
    out, layers = {}, {}
    for k, v in state.items():
        if v.dim() == 2:
            layer = prefix + k[: -len(".weight")]
            parts = pack_weight(v, fmt)
            if layout == "metadata":
                layers[layer] = json.loads(bytes(parts.pop("comfy_quant").tolist()))
            if layout in ("fp8_scaled", "float8_e4m3fn"):  # activation scales: only fp8 matmuls use them
                parts["scale_input" if layout == "fp8_scaled" else "input_scale"] = torch.tensor(1.0)
            out.update({f"{layer}.{s}": t for s, t in parts.items()})
        else:
            out[prefix + k] = v
    if layout == "fp8_scaled":
        out[prefix + "scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})} if layers else None
    save_file_atomic(out, path, metadata)


def forward(model: LensMMDiT, cfg, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 12, cfg.in_channels, generator=g)
    feats = [torch.randn(2, 5, cfg.enc_hidden_dim, generator=g) for _ in range(cfg.num_text_layers)]
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    with torch.no_grad():
        return model(x, torch.tensor([0.3, 0.8]), feats, mask, (3, 4))


def dense_model(state: dict, cfg) -> LensMMDiT:
    model = LensMMDiT(cfg)
    model.load_state_dict(state)
    return model.eval()


def assert_matches_reference(model: LensMMDiT, reference: dict, cfg, ulp: int = 0) -> None:
    """Every packed layer decodes to the reference weight (exactly, or within ``ulp`` fp32 ulps), and
    the forward pass equals a dense model holding those weights (up to BLAS summation order)."""
    for name, layer in model.named_modules():
        if isinstance(layer, GGMLLinear):
            got, want = layer.weight_for(torch.float32, "cpu"), reference[name + ".weight"]
            torch.testing.assert_close(got, want, rtol=ulp * 2.0**-23, atol=0, msg=name)
    torch.testing.assert_close(forward(model, cfg), forward(dense_model(reference, cfg), cfg), rtol=1e-5, atol=1e-5)


def read(path):
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    return load_file(path), metadata


@pytest.mark.parametrize(
    "layout, prefix",
    [
        ("fp8_e4m3fn", ""),
        ("fp8_scaled", "model.diffusion_model."),
        ("float8_e4m3fn", ""),
        ("float8_e5m2", "model.diffusion_model."),
        ("metadata", "model.diffusion_model."),
    ],
)
def test_fp8_mmdit_stays_fp8_and_matches_the_decoded_weights(tmp_path, tiny_states, tiny_configs_, layout, prefix):
    cfg = tiny_configs_[0]
    state = tiny_states["transformer"]
    path = tmp_path / f"lens_{layout}.safetensors"
    write_fp8_mmdit(state, path, layout, prefix)
    model = load_mmdit(path)
    packed = {n: m for n, m in model.named_modules() if isinstance(m, GGMLLinear)}
    fp8 = torch.float8_e5m2 if layout == "float8_e5m2" else torch.float8_e4m3fn
    assert packed and all(m.is_quantized and m.qweight.data.dtype == fp8 for m in packed.values())
    # Memory: one byte per matrix value (plus a 4-byte scale), nothing decoded ahead of use.
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    matrices = sum(v.numel() for v in state.values() if v.dim() == 2)
    vectors = sum(v.numel() * 4 for v in state.values() if v.dim() != 2)
    assert held == matrices + 4 * len(packed) + vectors

    raw, metadata = read(path)
    reference = {k.removeprefix(prefix): v for k, v in decode_checkpoint(raw, metadata).items()}
    assert_matches_reference(model, reference, cfg)
    original = forward(dense_model(state, cfg), cfg)
    assert (forward(model, cfg) - original).norm() / original.norm() < 0.1


def test_lens_quantize_writes_loadable_fp8_files(tmp_path, tiny_pipeline, tiny_states, tiny_configs_, capsys):
    from quant.convert import main

    cfg = tiny_configs_[0]
    for qtype in ("fp8_e4m3fn", "fp8_scaled"):
        out = tmp_path / f"{qtype}.safetensors"
        assert main([str(tiny_pipeline / "transformer"), str(out), "--type", qtype, "--quiet"]) == 0
        assert qtype in capsys.readouterr().out
        raw, metadata = read(out)
        assert ("scaled_fp8" in raw) == (qtype == "fp8_scaled")
        assert json.loads(metadata["config"])["selected_layer_index"] == list(cfg.selected_layer_index)
        model = load_mmdit(out)
        assert model.config.selected_layer_index == cfg.selected_layer_index
        assert_matches_reference(model, decode_checkpoint(raw, metadata), cfg)
    assert main([str(tiny_pipeline / "transformer"), str(tmp_path / "x.gguf"), "--type", "fp8_scaled"]) == 2
    assert "writes a .safetensors file" in capsys.readouterr().err


def broken(state: dict, layer: str = "transformer_blocks.0.img_mlp.w1", **changes) -> dict:
    """The tiny MMDiT with ``layer`` as comfy_quant float8_e4m3fn, then ``changes`` (None deletes)."""
    out = {k: v for k, v in state.items() if k != layer + ".weight"}
    out.update({f"{layer}.{s}": t for s, t in pack_weight(state[layer + ".weight"], "float8_e4m3fn").items()})
    for suffix, value in changes.items():
        if value is None:
            del out[f"{layer}.{suffix}"]
        else:
            out[f"{layer}.{suffix}"] = value
    return out


def conf(fmt: str) -> torch.Tensor:
    return torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"comfy_quant": conf("int8_tensorwise")}, r"img_mlp\.w1' is quantised as 'int8_tensorwise'.*reads float8"),
        ({"weight_scale": None}, r"tensor 'transformer_blocks\.0\.img_mlp\.w1\.weight_scale' is missing"),
        ({"weight_scale": torch.ones(3)}, r"img_mlp\.w1\.weight_scale.*\[3\].*needs 1 value"),
        ({"weight": torch.zeros(341, 128, dtype=torch.bfloat16)}, r"w1\.weight' is stored as BF16.*needs F8_E4M3"),
        ({"pre_quant_scale": torch.ones(128)}, r"pre_quant_scale.*not supported"),
        ({"comfy_quant": torch.tensor([1, 2, 3], dtype=torch.uint8)}, r"w1\.comfy_quant' is not ComfyUI comfy_quant"),
        ({"weight": torch.zeros(341, 96, dtype=torch.float8_e4m3fn)}, r"w1\.weight' has shape \(341, 96\).*\(341, 128\)"),
        ({"comfy_quant": None}, r"does not have, e\.g\. transformer_blocks\.0\.img_mlp\.w1\.weight_scale"),  # plain fp8
    ],
)
def test_broken_fp8_files_name_the_tensor_and_file(tmp_path, tiny_states, changes, message):
    path = tmp_path / "broken.safetensors"
    save_file_atomic(broken(tiny_states["transformer"], **changes), path)
    with pytest.raises(CheckpointError, match=message) as err:
        load_mmdit(path)
    assert str(path) in str(err.value)
