"""GGUF reader and torch dequantisation, checked against the ``gguf`` package (numpy reference).

Every kernel must be bit-exact with ``gguf.quants.dequantize`` in fp32, and its fp16/bf16 output
must be that fp32 result rounded once.  Types gguf can quantise are fed real quantised data; the
K-quants and IQ types, which it cannot write, get random blocks with sane fp16 scales
(``quant.synthetic``), which exercise every code and every scale bit.
"""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from lens_core.errors import CheckpointError
from quant import BLOCK_INFO, TYPE_SIZES, GGMLType, GGUFError, GGUFFile, LazyStringArray, dequantize
from quant import dequant as dequant_module
from quant.synthetic import random_blocks

GGUF_QUANTISABLE = ["BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "MXFP4"]
ALL_TYPES = [GGMLType(t).name for t in BLOCK_INFO]


def reference(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> np.ndarray:
    """gguf's numpy dequantisation, reshaped to the torch shape."""
    with np.errstate(over="ignore"):  # MXFP4 with huge exponents overflows to inf, in both
        out = gguf_dequantize(raw, gguf.GGMLQuantizationType[type_name])
    return np.ascontiguousarray(out, dtype=np.float32).reshape(shape)


def assert_bitexact(ours: torch.Tensor, ref: np.ndarray) -> None:
    assert ours.dtype == torch.float32 and tuple(ours.shape) == ref.shape
    ours_bits, ref_bits = ours.numpy().view(np.uint32), ref.view(np.uint32)
    if not np.array_equal(ours_bits, ref_bits):
        bad = np.argwhere(ours_bits != ref_bits)
        i = tuple(bad[0])
        pytest.fail(f"{len(bad)} values differ, first at {i}: ours {ours.numpy()[i]!r}, gguf {ref[i]!r}")


def check_all_dtypes(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> None:
    """fp32 bit-exact with gguf; fp16/bf16 equal to the fp32 result cast."""
    flat = torch.from_numpy(np.ascontiguousarray(raw).reshape(-1))
    ours = dequantize(flat, GGMLType[type_name], shape)
    assert_bitexact(ours, reference(raw, type_name, shape))
    for dtype in (torch.bfloat16, torch.float16):
        low = dequantize(flat, GGMLType[type_name], shape, dtype=dtype)
        assert low.dtype == dtype
        assert torch.equal(low.view(torch.int16), ours.to(dtype).view(torch.int16))


# ------------------------------------------------------------------------------------------
# Dequantisation kernels
# ------------------------------------------------------------------------------------------


def test_type_tables_match_gguf():
    assert {int(k): v for k, v in TYPE_SIZES.items()} == {int(k): v for k, v in gguf.GGML_QUANT_SIZES.items()}
    k_and_iq = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"]
    assert sorted(ALL_TYPES) == sorted(["F32", "F16", *GGUF_QUANTISABLE, *k_and_iq])


@pytest.mark.parametrize("type_name", GGUF_QUANTISABLE)
def test_gguf_quantised_data(type_name):
    rng = np.random.default_rng(1)
    data = (
        rng.standard_normal((16, 256)).astype(np.float32) * np.logspace(-3, 2, 16, dtype=np.float32)[:, None]
    )
    data[0, :32] = 0.0  # an all-zero block (zero scale)
    data[1, :64:3] *= -40.0  # outliers
    raw = gguf_quantize(data, gguf.GGMLQuantizationType[type_name])
    check_all_dtypes(raw, type_name, data.shape)


@pytest.mark.parametrize("type_name", ALL_TYPES)
def test_random_blocks(type_name):
    shape = (4, 3, 512)  # 3-D like a stack of expert matrices; several blocks per row
    raw = random_blocks(GGMLType[type_name], shape, seed=7)
    check_all_dtypes(raw, type_name, shape)


def test_mxfp4_exponent_extremes():
    """E8M0 bytes 0 and 1 give fp32 subnormal scales, 254/255 overflow to inf: same as ggml."""
    exps = np.array([0, 1, 2, 100, 127, 128, 200, 254, 255], dtype=np.uint8)
    i, r = np.arange(16)[None, :], np.arange(len(exps))[:, None]
    codes = (i | (((7 * i + r) % 16) << 4)).astype(np.uint8)  # every code as low and as high nibble
    raw = np.concatenate([exps[:, None], codes], axis=1)
    check_all_dtypes(raw, "MXFP4", (len(exps), 32))


@pytest.mark.parametrize("type_name", ["F16", "BF16", "Q4_0", "Q5_1", "Q6_K", "IQ4_XS", "MXFP4"])
def test_chunked_path(monkeypatch, type_name):
    """Tensors larger than a CPU chunk are decoded piecewise, with a ragged last chunk."""
    monkeypatch.setitem(dequant_module._CHUNK_VALUES, "cpu", 1000)
    block_values = BLOCK_INFO[GGMLType[type_name]][0]
    shape = (37, max(3 * block_values, 96))
    check_all_dtypes(random_blocks(GGMLType[type_name], shape, seed=3), type_name, shape)


@pytest.mark.parametrize("chunk", [None, 1000])
@pytest.mark.parametrize("type_name", ["F32", "F16", "Q4_K", "MXFP4"])
def test_out_buffer(monkeypatch, type_name, chunk):
    """Decoding into a caller's buffer gives the same bits and returns a view of that buffer."""
    if chunk is not None:
        monkeypatch.setitem(dequant_module._CHUNK_VALUES, "cpu", chunk)
    shape = (6, 512)
    raw = torch.from_numpy(random_blocks(GGMLType[type_name], shape, seed=4).reshape(-1))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        buffer = torch.full((6 * 512,), float("nan"), dtype=dtype)
        result = dequantize(raw, GGMLType[type_name], shape, out=buffer)
        assert result.shape == shape and result.data_ptr() == buffer.data_ptr()
        assert torch.equal(result, dequantize(raw, GGMLType[type_name], shape, dtype))


def test_out_buffer_is_checked():
    raw = torch.from_numpy(random_blocks(GGMLType.Q8_0, (2, 64)).reshape(-1))
    with pytest.raises(ValueError, match="128 elements"):
        dequantize(raw, GGMLType.Q8_0, (2, 64), out=torch.empty(100))
    with pytest.raises(ValueError, match="contiguous"):
        dequantize(raw, GGMLType.Q8_0, (2, 64), out=torch.empty(64, 2).t())
    with pytest.raises(ValueError, match="dtype"):
        dequantize(raw, GGMLType.Q8_0, (2, 64), torch.float16, out=torch.empty(128))


def test_result_is_fresh_memory():
    raw = torch.from_numpy(random_blocks(GGMLType.F32, (4, 8)).reshape(-1))
    out = dequantize(raw, GGMLType.F32, (4, 8))
    out.zero_()
    assert raw.view(torch.float32).abs().sum() > 0


def test_misaligned_raw_still_decodes():
    raw = random_blocks(GGMLType.F16, (3, 5)).reshape(-1)
    shifted = torch.from_numpy(np.concatenate([[0], raw]).astype(np.uint8))[1:]
    out = dequantize(shifted, GGMLType.F16, (3, 5))
    assert_bitexact(out, reference(raw, "F16", (3, 5)))


def test_dequantize_rejects_bad_input():
    raw = torch.zeros(34, dtype=torch.uint8)
    with pytest.raises(ValueError, match="needs 68 bytes"):
        dequantize(raw, GGMLType.Q8_0, (2, 32))
    with pytest.raises(ValueError, match="whole 32-value blocks.*rows of 16"):
        dequantize(raw, GGMLType.Q8_0, (2, 16))
    with pytest.raises(ValueError, match="dtype"):
        dequantize(raw, GGMLType.Q8_0, (1, 32), dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="IQ2_XXS"):
        dequantize(torch.zeros(66, dtype=torch.uint8), GGMLType.IQ2_XXS, (1, 256))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("type_name", ALL_TYPES)
def test_cuda_matches_cpu(type_name):
    shape = (64, 1024)
    raw = torch.from_numpy(random_blocks(GGMLType[type_name], shape, seed=5).reshape(-1))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        cpu = dequantize(raw, GGMLType[type_name], shape, dtype)
        cuda = dequantize(raw.cuda(), GGMLType[type_name], shape, dtype)
        assert cuda.is_cuda
        assert torch.equal(
            cuda.cpu().view(torch.int16 if dtype != torch.float32 else torch.int32),
            cpu.view(torch.int16 if dtype != torch.float32 else torch.int32),
        )


# ------------------------------------------------------------------------------------------
# GGUF files
# ------------------------------------------------------------------------------------------

TOKENS = ["<|endoftext|>", "hello", " wörld", "日本", "", "\u0120tab\t", "a" * 300]


def build_tensors() -> dict[str, tuple[np.ndarray, str, tuple[int, ...]]]:
    """name -> (array to hand GGUFWriter, ggml type name, torch shape)."""
    rng = np.random.default_rng(0)
    out: dict[str, tuple[np.ndarray, str, tuple[int, ...]]] = {}
    f32 = rng.standard_normal((3, 5)).astype(np.float32)
    out["norm.weight"] = (f32[0], "F32", (5,))
    out["proj.weight"] = (f32, "F32", (3, 5))
    out["f16.weight"] = (rng.standard_normal((4, 8)).astype(np.float16), "F16", (4, 8))
    for type_name, shape in (("BF16", (2, 64)), ("Q8_0", (4, 64)), ("Q4_1", (2, 96)), ("MXFP4", (3, 4, 64))):
        data = rng.standard_normal(shape).astype(np.float32)
        out[f"{type_name.lower()}.weight"] = (
            gguf_quantize(data, gguf.GGMLQuantizationType[type_name]),
            type_name,
            shape,
        )
    for type_name, shape in (("Q4_K", (2, 512)), ("Q6_K", (3, 256)), ("IQ4_XS", (1, 256))):
        out[f"{type_name.lower()}.weight"] = (
            random_blocks(GGMLType[type_name], shape, seed=2),
            type_name,
            shape,
        )
    return out


def write_gguf(path: Path, tensors: dict, alignment: int | None = None, extra_kv: bool = True) -> Path:
    writer = gguf.GGUFWriter(str(path), "lens")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    if extra_kv:
        writer.add_string("general.name", "Lens tiny")
        writer.add_uint32("lens.block_count", 48)
        writer.add_float32("lens.rope.theta", 10000.0)
        writer.add_bool("lens.flag", True)
        writer.add_uint64("lens.big", 2**40 + 3)
        writer.add_int8("lens.neg", -5)
        writer.add_float64("lens.f64", 0.1)
        writer.add_array("tokenizer.ggml.tokens", TOKENS)
        writer.add_array("tokenizer.ggml.token_type", [1, 2, 3, 4, 5, 6, 7])
        writer.add_array("lens.scores", [0.5, -1.25, 3.0])
        writer.add_array("lens.nested", [[1, 2, 3], [4]])
        writer.add_array("lens.nested_str", [["a", "bc"], ["déf"]])
    for name, (array, type_name, _) in tensors.items():
        if type_name in ("F32", "F16"):
            writer.add_tensor(name, array)
        else:
            writer.add_tensor(name, array, raw_dtype=gguf.GGMLQuantizationType[type_name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tensors():
    return build_tensors()


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory, tensors):
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", tensors)


def test_metadata(gguf_path):
    with GGUFFile(gguf_path) as f:
        md = f.metadata
        assert f.version == 3 and f.alignment == 32
        assert md["general.architecture"] == "lens"
        assert md["general.name"] == "Lens tiny"
        assert md["lens.block_count"] == 48 and isinstance(md["lens.block_count"], int)
        assert md["lens.rope.theta"] == 10000.0
        assert md["lens.flag"] is True
        assert md["lens.big"] == 2**40 + 3 and md["lens.neg"] == -5 and md["lens.f64"] == 0.1
        types = md["tokenizer.ggml.token_type"]
        assert (
            isinstance(types, np.ndarray)
            and types.dtype == np.int32
            and types.tolist() == [1, 2, 3, 4, 5, 6, 7]
        )
        assert not types.flags.writeable  # a view over the read-only map
        assert md["lens.scores"].dtype == np.float32 and md["lens.scores"].tolist() == [0.5, -1.25, 3.0]
        assert [a.tolist() for a in md["lens.nested"]] == [[1, 2, 3], [4]]
        assert [list(a) for a in md["lens.nested_str"]] == [["a", "bc"], ["déf"]]
        with pytest.raises(TypeError):
            md["general.name"] = "x"  # read-only mapping


def test_lazy_string_array(gguf_path):
    with GGUFFile(gguf_path) as f:
        tokens = f.metadata["tokenizer.ggml.tokens"]
        assert isinstance(tokens, LazyStringArray)
        assert len(tokens) == len(TOKENS)
        assert tokens[1] == "hello" and tokens[-1] == "a" * 300 and tokens[4] == ""
        assert tokens[1:4] == TOKENS[1:4] and tokens[::-2] == TOKENS[::-2]
        assert list(tokens) == TOKENS and tokens.tolist() == TOKENS
        assert tokens.get_bytes(3) == "日本".encode()
        assert "hello" in tokens and tokens.index("日本") == 3
        with pytest.raises(IndexError):
            tokens[len(TOKENS)]


def test_tensors_match_writer_and_gguf_reader(gguf_path, tensors):
    reader = gguf.GGUFReader(gguf_path)
    ref = {t.name: t for t in reader.tensors}
    with GGUFFile(gguf_path) as f:
        assert list(f.tensors) == list(tensors)
        for name, (array, type_name, shape) in tensors.items():
            info = f.tensors[name]
            assert info.name == name and info.ggml_type == GGMLType[type_name]
            assert isinstance(info.ggml_type, GGMLType)
            assert info.shape == shape == tuple(int(d) for d in reversed(ref[name].shape.tolist()))
            assert info.offset == ref[name].data_offset and info.offset % 32 == 0
            assert info.n_bytes == ref[name].n_bytes == array.nbytes
            raw = f.raw(name)
            assert raw.dtype == torch.uint8 and raw.dim() == 1
            assert raw.numpy().tobytes() == np.ascontiguousarray(array).tobytes()
            ours = f.dequantize(name)
            assert_bitexact(ours, reference(ref[name].data, type_name, shape))
            if type_name in ("F32", "F16"):
                np.testing.assert_array_equal(ours.numpy(), array.astype(np.float32).reshape(shape))
            assert torch.equal(
                f.dequantize(name, dtype=torch.bfloat16, device="cpu"), ours.to(torch.bfloat16)
            )
            buffer = torch.empty(shape, dtype=torch.float16)
            assert f.dequantize(name, out=buffer) is not None and torch.equal(buffer, ours.to(torch.float16))


def test_custom_alignment(tmp_path, tensors):
    path = write_gguf(tmp_path / "aligned.gguf", tensors, alignment=256, extra_kv=False)
    with GGUFFile(path) as f:
        assert f.alignment == 256 and f.metadata["general.alignment"] == 256
        for name, info in f.tensors.items():
            assert info.offset % 256 == 0
            assert f.raw(name).numpy().tobytes() == np.ascontiguousarray(tensors[name][0]).tobytes()


def test_close(gguf_path):
    f = GGUFFile(gguf_path)
    view = f.raw("proj.weight")
    tokens = f.metadata["tokenizer.ggml.tokens"]
    f.close()
    f.close()  # idempotent
    assert "closed" in repr(f)
    with pytest.raises(GGUFError, match="closed"):
        f.raw("proj.weight")
    assert view.numel() == 60  # outstanding views keep the map alive
    assert tokens[1] == "hello"
    with GGUFFile(gguf_path) as g, pytest.raises(KeyError, match="nope"):
        g.raw("nope")


# ------------------------------------------------------------------------------------------
# Broken files
# ------------------------------------------------------------------------------------------


def tensor_info_field(data: bytes, name: str) -> int:
    """Byte offset of the n_dims field of tensor ``name``'s info record."""
    key = struct.pack("<Q", len(name)) + name.encode()
    pos = data.find(key)
    assert pos > 0
    return pos + len(key)


def broken_copy(tmp_path: Path, gguf_path: Path, patch) -> Path:
    data = bytearray(gguf_path.read_bytes())
    data = patch(data) or data
    path = tmp_path / "broken.gguf"
    path.write_bytes(bytes(data))
    return path


def expect_error(path: Path, *fragments: str) -> str:
    with pytest.raises(GGUFError) as e:
        GGUFFile(path)
    message = str(e.value)
    assert isinstance(e.value, ValueError) and isinstance(e.value, CheckpointError)
    assert message.startswith(str(path))
    for fragment in fragments:
        assert fragment in message
    return message


def test_bad_magic(tmp_path, gguf_path):
    def patch(d):
        d[:4] = b"GGML"

    expect_error(broken_copy(tmp_path, gguf_path, patch), "not a GGUF file")


@pytest.mark.parametrize("version", [1, 4, 7])
def test_unsupported_version(tmp_path, gguf_path, version):
    def patch(d):
        d[4:8] = struct.pack("<I", version)

    expect_error(broken_copy(tmp_path, gguf_path, patch), "unsupported GGUF version", str(version))


def test_big_endian_is_named(tmp_path, gguf_path):
    def patch(d):
        d[4:8] = struct.pack(">I", 3)

    expect_error(broken_copy(tmp_path, gguf_path, patch), "big-endian")


def test_truncated_tensor_data_names_the_tensor(tmp_path, gguf_path, tensors):
    last = list(tensors)[-1]

    def patch(d):
        return d[:-100]  # past the padding (< 32 bytes) into the last tensor's 136 bytes

    expect_error(broken_copy(tmp_path, gguf_path, patch), "truncated", repr(last))


@pytest.mark.parametrize("keep", [3, 20, 200])
def test_truncated_header_or_metadata(tmp_path, gguf_path, keep):
    expect_error(broken_copy(tmp_path, gguf_path, lambda d: d[:keep]), "truncated")


def test_unknown_type_id_names_tensor_and_id(tmp_path, gguf_path):
    def patch(d):
        pos = tensor_info_field(d, "q8_0.weight")
        n_dims = struct.unpack_from("<I", d, pos)[0]
        struct.pack_into("<I", d, pos + 4 + 8 * n_dims, 99)

    expect_error(broken_copy(tmp_path, gguf_path, patch), "'q8_0.weight'", "unknown ggml type id 99")


def test_shape_not_whole_blocks(tmp_path, gguf_path):
    def patch(d):
        pos = tensor_info_field(d, "q8_0.weight")
        struct.pack_into("<Q", d, pos + 4, 48)  # ne0 64 -> 48: not a multiple of 32

    expect_error(broken_copy(tmp_path, gguf_path, patch), "'q8_0.weight'", "Q8_0", "whole 32-value blocks")


def test_shape_too_large_overlaps_next_tensor(tmp_path, gguf_path):
    def patch(d):
        pos = tensor_info_field(d, "q8_0.weight")
        struct.pack_into("<Q", d, pos + 4 + 8, 8)  # ne1 4 -> 8: twice the bytes

    expect_error(broken_copy(tmp_path, gguf_path, patch), "'q8_0.weight'", "overlaps", "'q4_1.weight'")


def test_misaligned_offset(tmp_path, gguf_path):
    def patch(d):
        pos = tensor_info_field(d, "q8_0.weight")
        n_dims = struct.unpack_from("<I", d, pos)[0]
        field = pos + 4 + 8 * n_dims + 4
        struct.pack_into("<Q", d, field, struct.unpack_from("<Q", d, field)[0] + 1)

    expect_error(broken_copy(tmp_path, gguf_path, patch), "'q8_0.weight'", "alignment")


def test_unsupported_type_dequantize_names_tensor(tmp_path):
    path = tmp_path / "iq2.gguf"
    writer = gguf.GGUFWriter(str(path), "lens")
    writer.add_tensor("w", np.zeros((1, 66), np.uint8), raw_dtype=gguf.GGMLQuantizationType.IQ2_XXS)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with GGUFFile(path) as f:
        assert f.tensors["w"].shape == (1, 256)
        assert f.raw("w").numel() == 66
        with pytest.raises(GGUFError, match=r"tensor 'w'.*IQ2_XXS"):
            f.dequantize("w")
