"""The opt-in fp8 matmul path (``set_fp8_matmul``, ``fp8_linear`` via ``torch._scaled_mm``).

Production takes it only on CUDA GPUs with fp8 tensor cores; torch's CPU ``_scaled_mm`` computes the
same thing (slowly), so these tests run it on the CPU by declaring the CPU supported.  The reference
is written independently: the input rounded to fp8 by ``quantize_fp8`` and decoded, times the
decoded weight, in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quant import fp_formats
from quant.fp_formats import Fp8Weight, MXFP8Weight, fp8_matmul_supported, quantize_fp8, quantize_mxfp8
from quant.layers import GGMLLinear, set_fp8_matmul


@pytest.fixture
def scaled_mm_calls(monkeypatch) -> list[tuple[int, ...]]:
    """Declare the CPU fp8-capable and record the shapes ``torch._scaled_mm`` is called with."""
    calls: list[tuple[int, ...]] = []
    real = torch._scaled_mm

    def spy(a, b, **kwargs):
        calls.append((*a.shape, b.shape[1]))
        return real(a, b, **kwargs)

    monkeypatch.setattr(fp_formats, "fp8_matmul_supported", lambda device: True)
    monkeypatch.setattr(torch, "_scaled_mm", spy)
    return calls


def fp8_layer(out_features: int, in_features: int, bias: bool = True, fp8=torch.float8_e4m3fn, seed: int = 0):
    """An fp8 GGMLLinear with fp8 matmuls switched on, and its dense (decoded) weight."""
    g = torch.Generator().manual_seed(seed)
    data, scale = quantize_fp8(torch.randn(out_features, in_features, generator=g) * 0.05, fp8)
    with torch.device("meta"):
        layer = GGMLLinear(in_features, out_features, bias=bias)
    state = {"weight": Fp8Weight(data, scale)}
    if bias:
        state["bias"] = torch.randn(out_features, generator=g)
    layer.load_state_dict(state, assign=True)
    assert set_fp8_matmul(layer, True) == 1
    return layer, data.double() * scale.double()


def reference(x: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """The fp8 path's exact product: ``x`` rounded to fp8 with one per-tensor scale, float64 matmul."""
    xq, x_scale = quantize_fp8(x.reshape(-1, x.shape[-1]).float())
    return ((xq.double() * x_scale.double()) @ dense.t()).view(*x.shape[:-1], -1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
def test_fp8_matmul_equals_fp8_rounded_input_times_weight(scaled_mm_calls, dtype, bias):
    layer, dense = fp8_layer(48, 64, bias)
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        y = layer(x)
    assert scaled_mm_calls == [(6, 64, 48)] and y.dtype == dtype and y.shape == (2, 3, 48)
    product = reference(x, dense)
    b = torch.zeros(48, dtype=torch.float64) if layer.bias is None else layer.bias.detach().double()
    want = product + b
    # Only the rounding of the product and of the bias sum to ``dtype`` (and the fp32 summation
    # order) separate it from the exact value.
    eps = torch.finfo(dtype).eps
    assert ((y.double() - want).abs() <= eps * (product.abs() + want.abs()) + 1e-5 * want.abs().max()).all()
    # Against the decode path: within the fp8 rounding of the input (2**-4 relative per value).
    decoded = F.linear(x.double(), dense, b)
    assert (y.double() - decoded).norm() / decoded.norm() < 2.0**-4


def test_fp8_matmul_is_off_by_default_and_cpu_only_when_declared(monkeypatch):
    assert not fp8_matmul_supported(torch.device("cpu"))
    layer, dense = fp8_layer(32, 32)
    x = torch.randn(5, 32)
    want = F.linear(x, dense.float(), layer.bias)
    assert torch.equal(layer(x), want)  # switched on, but the CPU has no fp8 kernel: decodes
    calls = []
    monkeypatch.setattr(fp_formats, "fp8_matmul_supported", lambda device: True)
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(a))
    set_fp8_matmul(layer, False)
    assert torch.equal(layer(x), want) and not calls


@pytest.mark.parametrize(
    "out_features, in_features, fp8",
    [(40, 64, torch.float8_e4m3fn), (48, 40, torch.float8_e4m3fn), (48, 64, torch.float8_e5m2)],
)
def test_shapes_and_formats_without_fp8_kernel_fall_back_to_decoding(scaled_mm_calls, out_features, in_features, fp8):
    layer, dense = fp8_layer(out_features, in_features, fp8=fp8)
    x = torch.randn(3, in_features)
    assert torch.equal(layer(x), F.linear(x, dense.float(), layer.bias))
    assert torch.equal(layer(x[:0]), F.linear(x[:0], dense.float(), layer.bias))  # empty batch
    assert not scaled_mm_calls


def test_lora_patched_and_training_calls_never_take_the_fp8_path(scaled_mm_calls):
    layer, dense = fp8_layer(48, 64)
    x = torch.randn(4, 64)
    down, up = torch.randn(2, 64), torch.randn(48, 2)
    layer.add_lora(down, up, 0.5)
    torch.testing.assert_close(layer(x), F.linear(x, dense.float() + 0.5 * up @ down, layer.bias))
    layer.lora_patches.clear()
    xg = x.clone().requires_grad_(True)
    layer(xg).sum().backward()  # autograd records the call: decoded weight, gradients flow
    torch.testing.assert_close(xg.grad, dense.float().sum(0).expand(4, 64))
    assert not scaled_mm_calls
    # A weight replaced by a float tensor (e.g. LoRA merged into it) makes a dense layer.
    merged = torch.randn(48, 64)
    layer.load_state_dict({"weight": merged, "bias": layer.bias.detach()})
    assert not layer.is_quantized and torch.equal(layer(x), F.linear(x, merged, layer.bias))
    assert not scaled_mm_calls


def test_formats_without_a_matmul_kernel_decode(scaled_mm_calls):
    data, scales = quantize_mxfp8(torch.randn(64, 64))
    with torch.device("meta"):
        layer = GGMLLinear(64, 64, bias=False)
    layer.load_state_dict({"weight": MXFP8Weight(data, scales)}, assign=True)
    set_fp8_matmul(layer, True)
    x = torch.randn(2, 64)
    assert torch.equal(layer(x), F.linear(x, layer.weight_for(torch.float32, "cpu")))
    assert not scaled_mm_calls
