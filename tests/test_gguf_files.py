"""benchmarks/gguf_files.py and gguf_sizes.py: synthetic GGUFs and exact sizes, against the real
converter (``quant.convert.convert_mmdit``) and writer (``quant.gpt_oss_gguf.write_gpt_oss_gguf``).

The README's file-size table and the peak-RSS benchmark rest on these: a random-block file must be
byte-for-byte the converter's layout (same header, same tensor table, same size), and the size
arithmetic must give the size of files the real tools write.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from lens_core.mmdit import LensMMDiT, MMDiTConfig
from lens_core.random_weights import randomize_
from lens_core.safetensors_io import save_file_atomic
from lens_core.text_encoder import GptOssConfig
from quant import GGMLType, GGUFFile, load_mmdit_gguf
from quant.convert import convert_mmdit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gguf_files  # noqa: E402
import gguf_sizes  # noqa: E402

# 4 heads x 64 = 256-wide rows take K-quants; the 341-wide MLP rows take the fallbacks.
SMALL = MMDiTConfig(num_layers=2, num_attention_heads=4, enc_hidden_dim=256, mlp_hidden_dim=341)


@pytest.fixture(scope="module")
def bf16_source(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mmdit") / "lens_bf16.safetensors"  # the stem becomes general.name
    state = randomize_(LensMMDiT(SMALL), 0).to(torch.bfloat16).state_dict()
    save_file_atomic(state, path)
    return path


def table(path: Path) -> dict[str, tuple[tuple[int, ...], GGMLType]]:
    with GGUFFile(path) as f:
        return {n: (i.shape, i.ggml_type) for n, i in f.tensors.items()}


def header(path: Path) -> bytes:
    with GGUFFile(path) as f:
        offset = f.data_offset
    return path.read_bytes()[:offset]


@pytest.mark.parametrize("qtype", ["BF16", "Q8_0", "Q4_K", "mixed"])
def test_random_mmdit_is_the_converters_layout(bf16_source, tmp_path, qtype):
    converted = convert_mmdit(bf16_source, tmp_path / "converted.gguf", qtype).path
    synthetic = gguf_files.write_random_mmdit(tmp_path / "random.gguf", qtype, SMALL, seed=1)
    assert header(synthetic) == header(converted)
    assert table(synthetic) == table(converted)
    assert {n: (s, t) for n, s, t in gguf_files.mmdit_plan(qtype, SMALL)} == table(converted)
    size = converted.stat().st_size
    assert synthetic.stat().st_size == size == gguf_files.mmdit_file_size(qtype, SMALL)


def test_random_mmdit_loads_and_runs(tmp_path):
    path = gguf_files.write_random_mmdit(tmp_path / "random.gguf", "Q4_K", SMALL)
    model = load_mmdit_gguf(path)
    assert model.transformer_blocks[0].attn.img_qkv.weight_type == GGMLType.Q4_K
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, SMALL.in_channels, generator=g)
    feats = [torch.randn(1, 5, SMALL.enc_hidden_dim, generator=g) for _ in range(SMALL.num_text_layers)]
    with torch.no_grad():
        y = model(x, torch.tensor([0.5]), feats, torch.ones(1, 5, dtype=torch.bool), (4, 4))
    assert y.shape == x.shape and torch.isfinite(y).all()


@pytest.mark.parametrize("weight_type", ["BF16", "Q8_0"])
def test_encoder_plan_and_header(weight_type):
    """The plan equals the tensor table write_gpt_oss_gguf writes and the sizes add up (checked
    inside encoder_header_bytes); the header does not depend on the widths, only on the layer
    count and metadata, which is what lets a narrow twin stand in for the 20 B model."""
    full = GptOssConfig()
    narrow = gguf_sizes.encoder_header_bytes(full, weight_type, None)
    wider = gguf_sizes.encoder_header_bytes(full, weight_type, None, width=96)
    assert narrow == wider > 0
    plan = gguf_files.gpt_oss_tensors(full, weight_type)
    assert sum(torch.Size(s).numel() for n, s, _ in plan if "_exps.weight" in n) == 24 * 32 * 3 * 2880 * 2880
    assert {t for n, _, t in plan if n.endswith("_exps.weight")} == {GGMLType.MXFP4}


def test_encoder_plan_mismatch_is_reported(monkeypatch):
    real = gguf_files.gpt_oss_tensors
    monkeypatch.setattr(gguf_sizes, "gpt_oss_tensors", lambda c, t: real(c, t, with_output=False))
    with pytest.raises(RuntimeError, match="no longer matches"):
        gguf_sizes.encoder_header_bytes(GptOssConfig(num_hidden_layers=2), "Q8_0", None)
