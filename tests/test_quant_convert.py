"""Quantisers (quant.quantize) and the safetensors -> GGUF converter (quant.convert).

* Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 bytes are bit-identical to ``gguf.quants.quantize``;
* K-quant bytes (which gguf cannot write) decode through gguf's numpy dequantiser to exactly the
  values the quantiser intended, and their error is measured against simple references;
* the converter's type policy, streaming memory, atomic output, CLI and error messages.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from lens_core.errors import CheckpointError
from lens_core.mmdit import LensMMDiT, MMDiTConfig
from lens_core.random_weights import mmdit_config_json, randomize_, tiny_configs
from lens_core.safetensors_io import save_file_atomic, save_sharded
from quant import GGMLType, GGUFFile, dequantize
from quant import convert as convert_module
from quant.convert import choose_type, convert_mmdit, main
from quant.quantize import quantize, quantize_with_values

REPO = Path(__file__).resolve().parents[1]
LEGACY = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
K_QUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def awkward_data(rows: int = 64, cols: int = 512, seed: int = 0) -> torch.Tensor:
    """Gaussian weights plus the cases rounding code gets wrong: zero blocks, constant blocks,
    exact ties, a negative maximum, huge outliers, all-positive blocks."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * 0.05
    x[0, :256] = 0
    x[1, :256] = 0.125
    x[2, :32] = torch.arange(32) - 16.0  # ties at x.5 after scaling
    x[3, 7] = -4.0
    x[4, :] *= 100
    x[5, :256] = torch.rand(256, generator=g)
    x[6, :256] = -torch.rand(256, generator=g)
    return x


@pytest.mark.parametrize("type_name", LEGACY)
def test_legacy_types_bit_exact_with_gguf(type_name):
    x = awkward_data()
    raw, values = quantize_with_values(x, GGMLType[type_name])
    ref = gguf_quantize(x.numpy(), gguf.GGMLQuantizationType[type_name]).reshape(-1)
    assert np.array_equal(raw.numpy(), ref)
    ref_values = gguf_dequantize(ref.reshape(x.shape[0], -1), gguf.GGMLQuantizationType[type_name]).astype(
        np.float32
    )
    assert np.array_equal(values.numpy(), ref_values)


@pytest.mark.parametrize("type_name", K_QUANTS)
def test_k_quants_round_trip_through_gguf(type_name):
    """gguf cannot write K-quants; it decodes ours to exactly the intended values (bit for bit),
    and so does our own kernel."""
    x = awkward_data()
    raw, values = quantize_with_values(x, GGMLType[type_name])
    gg = gguf_dequantize(raw.numpy().reshape(x.shape[0], -1), gguf.GGMLQuantizationType[type_name])
    assert np.array_equal(values.numpy().view(np.uint32), gg.astype(np.float32).view(np.uint32))
    assert torch.equal(dequantize(raw, GGMLType[type_name], x.shape), values)
    assert torch.isfinite(values).all()
    assert torch.equal(values[0, :256], torch.zeros(256))  # a zero block stays zero


def _rel_rmse(v: torch.Tensor, x: torch.Tensor) -> float:
    return float(((v - x) ** 2).mean().sqrt() / x.pow(2).mean().sqrt())


def _naive(x: torch.Tensor, sub: int, nmax: int, affine: bool) -> torch.Tensor:
    """Round-to-nearest per sub-block with unquantised (float) scales: min/max range (affine) or
    the signed absolute maximum (symmetric)."""
    xs = x.reshape(-1, sub)
    if affine:
        mn, mx = xs.amin(1, keepdim=True).clamp(max=0), xs.amax(1, keepdim=True)
        d = (mx - mn) / nmax
        return ((((xs - mn) / d).round().clamp(0, nmax)) * d + mn).view_as(x)
    m = xs.gather(1, xs.abs().argmax(1, keepdim=True))
    d = m / -nmax
    return ((xs / d).round().clamp(-nmax, nmax - 1) * d).view_as(x)


def _search(x: torch.Tensor, sub: int, nmax: int, affine: bool) -> torch.Tensor:
    """Per sub-block brute-force search of the range (float scales, squared error)."""
    xs = x.reshape(-1, sub)
    mn0, mx0 = xs.amin(1, keepdim=True).clamp(max=0), xs.amax(1, keepdim=True)
    amax = xs.abs().amax(1, keepdim=True)
    best, best_err = None, None
    grid = (
        [(a, b) for a in torch.linspace(0, 0.3, 13) for b in torch.linspace(0, 0.3, 13)]
        if affine
        else [(f, None) for f in torch.linspace(0.5, 1.3, 161)]
    )
    for a, b in grid:
        if affine:
            lo, hi = mn0 * (1 - a), mx0 * (1 - b)
            d = (hi - lo) / nmax
            v = ((xs - lo) / d).round().clamp(0, nmax) * d + lo
        else:
            d = amax * a / nmax
            v = (xs / d).round().clamp(-nmax, nmax - 1) * d
        err = ((v - xs) ** 2).sum(1, keepdim=True)
        if best is None:
            best, best_err = v, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, v, best), torch.where(better, err, best_err)
    return best.view_as(x)


# (sub-block, levels, affine); measured relative RMSE on N(0,1) with this seed (see the report):
#        ours   naive   search
# Q2_K  0.299  0.327   0.259     (ggml optimises |error| * |x| for Q2_K, the search squared error)
# Q3_K  0.151  0.155   0.161
# Q4_K  0.072  0.078   0.071
# Q5_K  0.036  0.038   0.035
# Q6_K  0.018  0.019   0.017
K_GEOMETRY = {
    "Q2_K": (16, 3, True),
    "Q3_K": (16, 4, False),
    "Q4_K": (32, 15, True),
    "Q5_K": (32, 31, True),
    "Q6_K": (16, 32, False),
}
# ggml weights the fit by |x| (Q2_K) or x**2 (Q6_K) instead of plain squared error: a few % more RMSE.
SEARCH_SLACK = {"Q2_K": 1.16, "Q3_K": 1.0, "Q4_K": 1.03, "Q5_K": 1.05, "Q6_K": 1.09}
K_BOUNDS = {"Q2_K": 0.31, "Q3_K": 0.155, "Q4_K": 0.074, "Q5_K": 0.037, "Q6_K": 0.0182}


@pytest.mark.parametrize("type_name", K_QUANTS)
def test_k_quant_error_against_references(type_name):
    """Our K-quants (with quantised sub-block scales) beat round-to-nearest with exact float scales,
    and stay close to a brute-force per-sub-block search with float scales (Q3_K beats it)."""
    x = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0))
    _, values = quantize_with_values(x, GGMLType[type_name])
    ours = _rel_rmse(values, x)
    sub, nmax, affine = K_GEOMETRY[type_name]
    naive = _rel_rmse(_naive(x, sub, nmax, affine), x)
    search = _rel_rmse(_search(x, sub, nmax, affine), x)
    assert ours < naive
    assert ours < search * SEARCH_SLACK[type_name]
    assert ours < K_BOUNDS[type_name]


def test_error_ordering_across_types():
    x = torch.randn(64, 1024, generator=torch.Generator().manual_seed(1))
    err = {
        t: _rel_rmse(quantize_with_values(x, GGMLType[t])[1], x)
        for t in ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"]
    }
    assert err["Q2_K"] > err["Q3_K"] > err["Q4_K"] > err["Q5_K"] > err["Q6_K"] > err["Q8_0"]
    assert err["Q8_0"] < 0.006


def test_quantize_checks_input():
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize(torch.randn(4, 128), GGMLType.Q4_K)
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize(torch.tensor([[float("nan")] * 32]), GGMLType.Q8_0)
    with pytest.raises(NotImplementedError, match="IQ2_XXS"):
        quantize(torch.randn(1, 256), GGMLType.IQ2_XXS)
    bf = torch.randn(8, 256).bfloat16()  # any float dtype in, same result as its fp32 value
    assert torch.equal(quantize(bf, GGMLType.Q6_K), quantize(bf.float(), GGMLType.Q6_K))


# ------------------------------------------------------------------------------------------
# Converter
# ------------------------------------------------------------------------------------------


def test_policy():
    big = (1536, 1536)
    assert choose_type("transformer_blocks.3.attn.img_qkv.weight", (4608, 1536), "Q4_K") == GGMLType.Q4_K
    for name in (
        "transformer_blocks.3.img_mod.1.weight",
        "transformer_blocks.0.txt_mod.1.weight",
        "img_in.weight",
        "txt_in.weight",
        "proj_out.weight",
        "norm_out.linear.weight",
        "time_text_embed.timestep_embedder.linear_2.weight",
    ):
        assert choose_type(name, big, "Q4_K") == GGMLType.Q8_0, name
        assert choose_type(name, big, "BF16") == GGMLType.BF16, name
    assert choose_type("transformer_blocks.3.img_norm1.weight", (1536,), "Q4_K") == GGMLType.F32
    assert choose_type("transformer_blocks.3.attn.img_qkv.bias", (4608,), "Q8_0") == GGMLType.F32
    assert choose_type("x.weight", (16, 128), "Q8_0") == GGMLType.F32  # tiny
    # Rows that are not whole K-quant blocks fall back as llama.cpp does.
    assert choose_type("transformer_blocks.0.img_mlp.w1.weight", (4096, 160), "Q4_K") == GGMLType.Q5_0
    assert choose_type("transformer_blocks.0.img_mlp.w1.weight", (4096, 160), "Q6_K") == GGMLType.Q8_0
    assert choose_type("transformer_blocks.0.img_mlp.w2.weight", (128, 341), "Q4_K") == GGMLType.F16
    assert (
        choose_type("transformer_blocks.0.img_mlp.w2.weight", (128, 341), "Q4_K", torch.bfloat16)
        == GGMLType.BF16
    )
    assert choose_type("transformer_blocks.0.img_mlp.w2.weight", (128, 341), "F32") == GGMLType.F32
    # mixed: attention Q5_K, MLP w1/w3 Q4_K, w2 Q6_K, the fragile layers Q8_0.
    assert choose_type("transformer_blocks.0.attn.to_add_out.weight", big, "mixed") == GGMLType.Q5_K
    assert choose_type("transformer_blocks.0.txt_mlp.w3.weight", (4096, 1536), "mixed") == GGMLType.Q4_K
    assert choose_type("transformer_blocks.0.txt_mlp.w2.weight", (1536, 4096), "mixed") == GGMLType.Q6_K
    assert choose_type("transformer_blocks.0.img_mod.1.weight", (9216, 1536), "mixed") == GGMLType.Q8_0


def small_config() -> MMDiTConfig:
    """Rows that split into whole 256-value blocks, so K-quants are really used."""
    return MMDiTConfig(
        num_layers=2,
        num_attention_heads=4,
        enc_hidden_dim=64,
        mlp_hidden_dim=512,
        selected_layer_index=(0, 1, 2, 3),
    )


def test_convert_reads_every_layout_and_writes_metadata(tmp_path):
    cfg = tiny_configs()[0]
    state = randomize_(LensMMDiT(cfg), 0).state_dict()
    save_file_atomic(
        {f"model.diffusion_model.{k}": v.bfloat16() for k, v in state.items()},
        tmp_path / "merged.safetensors",
    )
    save_sharded(state, tmp_path / "sharded", "diffusion_pytorch_model", 1 << 20)
    (tmp_path / "sharded" / "config.json").write_text(json.dumps(mmdit_config_json(cfg)))
    a = convert_mmdit(tmp_path / "merged.safetensors", tmp_path / "a.gguf", "Q8_0")
    b = convert_mmdit(tmp_path / "sharded", tmp_path / "b.gguf", "F32")
    assert a.tensors == b.tensors == len(state)
    assert a.types["BF16"] == 4 and "F16" not in a.types  # w2 rows of 341: bf16 source -> BF16
    with GGUFFile(tmp_path / "a.gguf") as f:
        assert f.metadata["general.architecture"] == "lens"
        # A single file does not say which encoder layers it reads: the released ones.
        assert json.loads(f.metadata["lens.config"])["selected_layer_index"] == [5, 11, 17, 23]
        assert f.metadata["lens.quantization"] == "Q8_0"
        assert set(f.tensors) == set(state)  # prefix stripped
        assert f.tensors["transformer_blocks.0.img_mod.1.weight"].ggml_type == GGMLType.Q8_0
        assert f.tensors["txt_norm.0.weight"].ggml_type == GGMLType.F32
    with GGUFFile(tmp_path / "b.gguf") as f:
        assert json.loads(f.metadata["lens.config"])["selected_layer_index"] == [
            0,
            1,
            2,
            3,
        ]  # from config.json
        for k, v in state.items():
            assert torch.equal(f.dequantize(k), v), k


def test_convert_is_atomic(tmp_path, monkeypatch):
    cfg = tiny_configs()[0]
    save_file_atomic(randomize_(LensMMDiT(cfg), 0).state_dict(), tmp_path / "m.safetensors")
    out = tmp_path / "out.gguf"
    out.write_bytes(b"previous version")
    calls = {"n": 0}
    real = convert_module._encode

    def failing(t, gtype):
        calls["n"] += 1
        if calls["n"] == 10:
            raise RuntimeError("disk full")
        return real(t, gtype)

    monkeypatch.setattr(convert_module, "_encode", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        convert_mmdit(tmp_path / "m.safetensors", out, "Q8_0")
    assert out.read_bytes() == b"previous version"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "out.gguf"]  # no temp left
    monkeypatch.setattr(convert_module, "_encode", real)
    convert_mmdit(tmp_path / "m.safetensors", out, "Q8_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "out.gguf"]
    with GGUFFile(out) as f:
        assert len(f.tensors) == len(LensMMDiT(cfg).state_dict())


def test_convert_errors_name_the_problem(tmp_path):
    cfg = tiny_configs()[0]
    state = randomize_(LensMMDiT(cfg), 0).state_dict()
    bad = dict(state)
    bad["transformer_blocks.0.img_mlp.w1.weight"] = bad["transformer_blocks.0.img_mlp.w1.weight"].to(
        torch.float8_e4m3fn
    )
    save_file_atomic(bad, tmp_path / "fp8.safetensors")
    with pytest.raises(CheckpointError, match=r"img_mlp\.w1\.weight.*F8_E4M3"):
        convert_mmdit(tmp_path / "fp8.safetensors", tmp_path / "x.gguf", "Q8_0")
    extra = dict(state, **{"transformer_blocks.0.img_mlp.w1.weight_scale": torch.ones(1)})
    save_file_atomic(extra, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match="weight_scale"):
        convert_mmdit(tmp_path / "extra.safetensors", tmp_path / "x.gguf", "Q8_0")
    with pytest.raises(ValueError, match="unknown type"):
        convert_mmdit(tmp_path / "fp8.safetensors", tmp_path / "x.gguf", "Q7_K")
    assert not (tmp_path / "x.gguf").exists()


def test_cli(tmp_path, capsys):
    save_file_atomic(randomize_(LensMMDiT(small_config()), 0).state_dict(), tmp_path / "m.safetensors")
    assert main([str(tmp_path / "m.safetensors"), str(tmp_path / "m.gguf"), "--type", "Q4_K", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "m.gguf" in out and "Q4_K x" in out and "Q8_0 x" in out
    with GGUFFile(tmp_path / "m.gguf") as f:
        assert f.tensors["transformer_blocks.1.img_mlp.w2.weight"].ggml_type == GGMLType.Q4_K
        assert f.tensors["transformer_blocks.1.txt_mod.1.weight"].ggml_type == GGMLType.Q8_0
    assert main([str(tmp_path / "missing.safetensors"), str(tmp_path / "n.gguf")]) == 2
    assert "lens-quantize: error:" in capsys.readouterr().err


_CHILD = r"""
import json, resource, sys, threading, time
import torch
torch.set_num_threads(1)
from quant.convert import convert_mmdit

def anon():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024

base = anon()
peak = [base]
done = threading.Event()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.001)

t = threading.Thread(target=sample, daemon=True)
t.start()
report = convert_mmdit(sys.argv[1], sys.argv[2], sys.argv[3])
done.set()
t.join()
print(json.dumps({"delta": peak[0] - base, "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "bytes_in": report.bytes_in, "bytes_out": report.bytes_out}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc to sample RssAnon")
def test_convert_streams_with_memory_near_one_tensor(tmp_path):
    """A ~94 MiB fp32 model converts with the process' anonymous memory growing by ~21 MiB (the
    largest tensor is 6 MiB; a whole-model load would need > 94 MiB).  File-backed pages of the
    memory-mapped input are not counted: they are reclaimable page cache (ru_maxrss includes them)."""
    cfg = MMDiTConfig(
        num_layers=2,
        num_attention_heads=8,
        enc_hidden_dim=256,
        mlp_hidden_dim=2048,
        selected_layer_index=(0, 1, 2, 3),
    )
    save_file_atomic(randomize_(LensMMDiT(cfg), 0).state_dict(), tmp_path / "m.safetensors")
    size = (tmp_path / "m.safetensors").stat().st_size
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path / "m.safetensors"), str(tmp_path / "m.gguf"), "Q8_0"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        env={
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(REPO),
        },
    )
    assert result.returncode == 0, result.stderr[-2000:]
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    assert stats["bytes_in"] > 90 * 2**20 and size > 90 * 2**20
    assert stats["delta"] < 0.4 * size, stats
    assert stats["bytes_out"] < 0.3 * stats["bytes_in"]
