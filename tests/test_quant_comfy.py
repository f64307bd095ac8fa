"""ComfyUI's MXFP8 and NVFP4 layouts (quant.fp_formats, quant.comfy_quant): decoding against numpy
decoders of the bit layouts and the cuBLAS tiled scale layout, the quantisers' rounding, ComfyUI's
own code as a cross-check (when a ComfyUI with comfy_kitchen is installed), the Comfy-Org file
layouts loaded through lens_core.loading (mxfp8/nvfp4 MMDiT, nvfp4 GPT-OSS with its tokenizer
embedded), packed memory, ``lens generate`` on those files, and clear errors for broken files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lens_core.cli import main as lens_main
from lens_core.errors import CheckpointError
from lens_core.loading import load_mmdit, load_text_encoder
from lens_core.pipeline import find_tokenizer
from lens_core.safetensors_io import TensorSource, save_file_atomic
from lens_core.text_encoder import GptOssEncoder
from lens_core.tokenizer import write_tokenizer_json
from quant.comfy_quant import ExpertBanks, PackedSource, pack_weight, write_gpt_oss_comfy
from quant.convert import main as quantize_main
from quant.fp_formats import (
    MXFP8Weight,
    NVFP4Weight,
    quantize_mxfp8,
    quantize_nvfp4,
    swizzle_scales,
    unswizzle_scales,
)
from quant.layers import GGMLLinear
from quant.safetensors_writer import write_streaming

from .fp_reference import (
    decode_checkpoint,
    decode_mxfp8,
    decode_nvfp4,
    e2m1,
    run_comfy_reference,
    tiled_offsets,
)
from .test_quant_fp8 import assert_matches_reference, dense_model, forward

SHAPES = [(48, 64), (130, 96), (20, 50), (256, 320)]  # padded ones included


@pytest.mark.parametrize("rows, cols", [(1, 1), (128, 4), (130, 9), (300, 13)])
def test_tiled_scale_layout_matches_the_index_formula(rows, cols):
    scales = torch.randint(0, 256, (rows, cols), dtype=torch.int32).to(torch.uint8)
    tiled = swizzle_scales(scales)
    assert tiled.shape == (-(-rows // 128) * 128, -(-cols // 4) * 4)
    flat = tiled.reshape(-1).numpy()
    np.testing.assert_array_equal(flat[tiled_offsets(rows, cols)], scales.numpy())
    assert torch.equal(unswizzle_scales(tiled.reshape(-1), rows, cols), scales)


def random_fp8_codes(shape, generator) -> torch.Tensor:
    codes = torch.randint(0, 256, shape, generator=generator, dtype=torch.int32).to(torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x3C  # no NaN
    return codes.view(torch.float8_e4m3fn)


@pytest.mark.parametrize("rows, cols", SHAPES)
def test_mxfp8_decodes_like_its_bit_layout(rows, cols):
    g = torch.Generator().manual_seed(rows * cols)
    padded = (-(-rows // 32) * 32, -(-cols // 32) * 32)
    data = random_fp8_codes(padded, g)
    scales = swizzle_scales(torch.randint(100, 150, (padded[0], padded[1] // 32), generator=g, dtype=torch.int32).to(torch.uint8))
    w = MXFP8Weight(data, scales, (rows, cols))
    expected = decode_mxfp8(data, scales)[:rows, :cols]
    np.testing.assert_array_equal(w.dequantize().double().numpy(), expected)
    assert torch.equal(w.dequantize(torch.bfloat16), torch.from_numpy(expected).to(torch.bfloat16))
    out = torch.empty(rows * cols)  # the layers' shared decode buffers
    assert torch.equal(w.dequantize(out=out), out.view(rows, cols))


@pytest.mark.parametrize("rows, cols", SHAPES)
def test_nvfp4_decodes_like_its_bit_layout(rows, cols):
    g = torch.Generator().manual_seed(rows + cols)
    padded = (-(-rows // 16) * 16, -(-cols // 16) * 16)
    data = torch.randint(0, 256, (padded[0], padded[1] // 2), generator=g, dtype=torch.int32).to(torch.uint8)
    blocks = swizzle_scales(random_fp8_codes((padded[0], padded[1] // 16), g).view(torch.uint8)).view(torch.float8_e4m3fn)
    tensor_scale = torch.tensor(0.0037)
    w = NVFP4Weight(data, blocks, tensor_scale, (rows, cols))
    expected = decode_nvfp4(data, blocks, tensor_scale)[:rows, :cols]
    # float64 reference rounded once; fp32 (tensor * block) * code rounds twice: within 1 ulp.
    np.testing.assert_allclose(w.dequantize().double().numpy(), expected, rtol=2**-23, atol=0)


def packed(parts: dict) -> MXFP8Weight | NVFP4Weight:
    """The packed weight of ``pack_weight``'s tensors."""
    if "weight_scale_2" in parts:
        return NVFP4Weight(parts["weight"], parts["weight_scale"], parts["weight_scale_2"])
    return MXFP8Weight(parts["weight"], parts["weight_scale"])


@pytest.mark.parametrize("fmt", ["mxfp8", "nvfp4"])
def test_expert_banks_decode_expert_by_expert(fmt):
    torch.manual_seed(3)
    bank = torch.randn(3, 40, 64) * torch.tensor([0.01, 1.0, 30.0])[:, None, None]  # own scale per expert
    parts = pack_weight(bank, fmt)
    assert json.loads(bytes(parts["comfy_quant"].tolist())) == {"format": fmt, "num_experts": 3}
    w = packed(parts)
    whole = w.dequantize()
    for e in range(3):
        alone = packed(pack_weight(bank[e], fmt)).dequantize()
        assert torch.equal(w.expert(e).dequantize(), alone) and torch.equal(whole[e], alone)


@pytest.mark.parametrize("rows, cols", SHAPES)
def test_quantisers_round_to_the_nearest_value(rows, cols):
    torch.manual_seed(rows)
    x = torch.randn(rows, cols) * torch.rand(rows, 1) * 0.1
    # MXFP8: the smallest power-of-two block scale that fits the block maximum into fp8.
    data, scales = quantize_mxfp8(x)
    exps = unswizzle_scales(scales, data.shape[0], data.shape[1] // 32)[:rows].double() - 127
    amax = torch.nn.functional.pad(x.abs(), (0, data.shape[1] - cols)).view(rows, -1, 32).amax(-1).double()
    assert (amax <= 448 * 2**exps).all() and (amax > 448 * 2 ** (exps - 1)).all()
    y = MXFP8Weight(data, scales, (rows, cols)).dequantize()
    assert ((y - x).abs() <= x.abs() * 2**-4 + 2.0 ** (exps.repeat_interleave(32, 1)[:, :cols] - 10)).all()
    # NVFP4: every value is the E2M1 point nearest to x / (block * tensor scale).
    data, blocks, tensor = quantize_nvfp4(x)
    assert tensor.item() == pytest.approx(x.abs().max().item() / (448 * 6))
    total = unswizzle_scales(blocks, data.shape[0], data.shape[1] * 2 // 16)[:rows].float() * tensor
    total = np.repeat(total.double().numpy(), 16, axis=1)[:, :cols]
    packed = data.numpy()
    codes = np.stack((packed >> 4, packed & 0x0F), -1).reshape(packed.shape[0], -1)[:rows, :cols]
    target = x.double().numpy() / total
    grid = e2m1(np.arange(16))
    best = np.abs(target[..., None] - grid).min(-1)
    assert np.all(np.abs(target - e2m1(codes)) <= best + 1e-9)


# ---------------------------------------------------------------------------------------------
# ComfyUI's own code as the reference
# ---------------------------------------------------------------------------------------------


def our_decode(path) -> dict[str, torch.Tensor]:
    """Every packed weight of a file, decoded by quant (fp32)."""
    source = PackedSource(TensorSource.open(path))
    return {k[: -len(".weight")]: source[k].dequantize() for k in source.packed_names}


def test_comfyui_reads_our_files_as_we_do(tmp_path):
    torch.manual_seed(4)
    state, layers = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}, []
    cases = [(f, s) for f in ("float8_e4m3fn", "float8_e5m2", "mxfp8", "nvfp4", "fp8_scaled", "fp8_e4m3fn")
             for s in ((40, 64), (20, 50))]
    cases += [("mxfp8", (3, 40, 64)), ("nvfp4", (3, 48, 32)), ("float8_e4m3fn", (2, 16, 32))]  # banks
    for i, (fmt, shape) in enumerate(cases):
        layer = f"layer{i}"
        layers.append(layer)
        state.update({f"{layer}.{k}": v for k, v in pack_weight(torch.randn(shape) * 0.2, fmt).items()})
    save_file(state, tmp_path / "ours.safetensors")
    run_comfy_reference(tmp_path, "dequantize", tmp_path / "ours.safetensors", tmp_path / "comfy.safetensors")
    comfy = load_file(tmp_path / "comfy.safetensors")
    ours = our_decode(tmp_path / "ours.safetensors")
    assert sorted(comfy) == sorted(ours) == sorted(layers)
    for layer in layers:
        assert torch.equal(ours[layer], comfy[layer]), layer


def test_we_read_comfyui_quantised_layers_as_comfyui_does(tmp_path):
    torch.manual_seed(5)
    formats = ("float8_e4m3fn", "float8_e5m2", "mxfp8", "nvfp4")
    save_file({"a": torch.randn(64, 96) * 0.1, "b": torch.randn(40, 50)}, tmp_path / "dense.safetensors")
    run_comfy_reference(
        tmp_path, "quantize", tmp_path / "dense.safetensors", tmp_path / "comfy.safetensors", ",".join(formats)
    )
    comfy = load_file(tmp_path / "comfy.safetensors")
    save_file({k: v for k, v in comfy.items() if not k.endswith(".reference")}, tmp_path / "layers.safetensors")
    ours = our_decode(tmp_path / "layers.safetensors")
    assert len(ours) == 2 * len(formats)
    for layer, got in ours.items():
        reference = comfy[f"{layer}.reference"]  # unpadded: ComfyUI slices to the layer's size
        assert torch.equal(got[: reference.shape[0], : reference.shape[1]], reference), layer


# ---------------------------------------------------------------------------------------------
# Comfy-Org's files: mxfp8 / nvfp4 MMDiT, nvfp4 GPT-OSS with its tokenizer
# ---------------------------------------------------------------------------------------------


def read(path):
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    return load_file(path), metadata


@pytest.fixture(scope="module")
def comfy_files(tmp_path_factory, tiny_pipeline, tiny_states, tiny_configs_):
    """``lens-quantize`` mxfp8 / nvfp4 MMDiTs and a ComfyUI-layout nvfp4 encoder with its tokenizer."""
    root = tmp_path_factory.mktemp("comfy-files")
    files = {}
    for qtype in ("mxfp8", "nvfp4"):
        files[qtype] = root / f"lens_{qtype}.safetensors"
        assert quantize_main([str(tiny_pipeline / "transformer"), str(files[qtype]), "--type", qtype, "--quiet"]) == 0
    tokenizer = write_tokenizer_json(root / "tokenizer.json")
    for fmt in ("nvfp4", None):
        files[f"encoder_{fmt}"] = write_gpt_oss_comfy(
            tiny_states["text_encoder"], tiny_configs_[1], root / f"gpt_oss_{fmt}.safetensors", fmt, tokenizer
        )
    return files


@pytest.mark.parametrize("qtype", ["mxfp8", "nvfp4"])
def test_quantised_mmdit_stays_packed_and_matches_the_decoded_weights(comfy_files, tiny_states, tiny_configs_, qtype):
    path = comfy_files[qtype]
    model = load_mmdit(path)
    cfg = model.config
    layers = dict(model.named_modules())
    assert layers["transformer_blocks.0.img_mlp.w1"].weight_type == qtype
    assert layers["transformer_blocks.1.attn.img_qkv"].weight_type == qtype
    assert not layers["transformer_blocks.0.img_mod.1"].is_quantized  # modulation kept in full precision
    assert cfg.mlp_hidden_dim == 352  # the SwiGLU width 341 as stored: zero-padded to whole blocks
    packed = [m for m in layers.values() if isinstance(m, GGMLLinear) and m.is_quantized]
    assert all(b.dtype == torch.uint8 for m in packed for b in m.buffers())
    assert all(m.weight is None for m in packed)
    raw, metadata = read(path)
    # nvfp4: fp32 (tensor * block scale) * code rounds twice, the float64 reference once.
    assert_matches_reference(model, decode_checkpoint(raw, metadata), cfg, ulp=0 if qtype == "mxfp8" else 1)
    # Zero padding changes nothing: close to the unquantised model of width 341.
    original_cfg = tiny_configs_[0]
    original = forward(dense_model(tiny_states["transformer"], original_cfg), original_cfg)
    error = (forward(model, cfg) - original).norm() / original.norm()
    assert error < (0.03 if qtype == "mxfp8" else 0.1)


def reference_encoder(state: dict, cfg) -> GptOssEncoder:
    model = GptOssEncoder(cfg, selected_layers=tuple(range(cfg.num_hidden_layers)))
    model.load_state_dict(state)
    return model.eval()


def encoder_features(model, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 2000, (2, 11), generator=g)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, 7:] = False
    with torch.no_grad():
        return model(ids, mask)


def test_nvfp4_gpt_oss_keeps_experts_packed_and_matches_the_decoded_weights(comfy_files, tiny_states, tiny_configs_):
    cfg = tiny_configs_[1]
    path = comfy_files["encoder_nvfp4"]
    raw, metadata = read(path)
    assert raw["layers.0.mlp.experts.gate_up_proj.weight"].dtype == torch.uint8  # ComfyUI names, no prefix
    assert "tokenizer_json" in raw and "model.embed_tokens.weight" not in raw
    encoder = load_text_encoder(path, (0, 1, 2, 3))
    experts = encoder.model.layers[0].mlp.experts
    assert isinstance(experts, ExpertBanks) and experts.gate_up_proj.weight_type == "nvfp4"
    assert all(b.dtype == torch.uint8 for b in experts.buffers()) and experts.gate_up_proj.weight is None
    # Reference: the banks decoded in numpy, put back into the HF layout ([E, in, out]).
    decoded = decode_checkpoint(raw, metadata)
    state = dict(tiny_states["text_encoder"])
    for k in list(state):
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            state[k] = decoded[k.removeprefix("model.") + ".weight"].transpose(1, 2)
    expected = encoder_features(reference_encoder(state, cfg))
    for got, want in zip(encoder_features(encoder), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    original = encoder_features(reference_encoder(tiny_states["text_encoder"], cfg))
    assert (expected[0] - original[0]).norm() / original[0].norm() < 0.15
    assert find_tokenizer(path).source.endswith("(embedded tokenizer_json)")


def test_dense_expert_banks_are_the_hf_experts_transposed(comfy_files, tiny_states, tiny_configs_):
    """Hidden and expert widths are equal, so a wrong transposition would keep every shape: values tell."""
    encoder = load_text_encoder(comfy_files["encoder_None"], (0, 1, 2, 3))
    original = encoder_features(reference_encoder(tiny_states["text_encoder"], tiny_configs_[1]))
    for got, want in zip(encoder_features(encoder), original, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_lens_generate_runs_the_comfy_files(tmp_path, comfy_files, tiny_pipeline):
    common = ["generate", "--prompt", "a red circle", "--vae", str(tiny_pipeline), "--width", "32", "--height", "32",
              "--steps", "2", "--seed", "5"]
    assert lens_main([*common, "--transformer", str(comfy_files["mxfp8"]), "--text-encoder",
                      str(comfy_files["encoder_nvfp4"]), "--output", str(tmp_path / "q.png")]) == 0
    assert lens_main([*common, "--transformer", str(tiny_pipeline), "--text-encoder", str(tiny_pipeline),
                      "--output", str(tmp_path / "d.png")]) == 0
    a = np.asarray(Image.open(tmp_path / "q.png")).astype(int)
    b = np.asarray(Image.open(tmp_path / "d.png")).astype(int)
    assert a.std() > 1 and np.abs(a - b).mean() < 12  # close to the unquantised pipeline's image


def layer_file(tmp_path, fmt: str, **changes):
    """A ComfyUI file with the tiny MMDiT's w1 in ``fmt``, then ``changes`` (None deletes a tensor)."""
    from lens_core.random_weights import random_state_dicts, tiny_configs

    state = random_state_dicts(tiny_configs(), seed=0)["transformer"]
    layer = "transformer_blocks.0.img_mlp.w1"
    parts = pack_weight(state.pop(layer + ".weight"), fmt)
    for k, v in changes.items():
        parts.pop(k) if v is None else parts.__setitem__(k, v)
    state.update({f"{layer}.{k}": v for k, v in parts.items()})
    path = tmp_path / f"{fmt}.safetensors"
    save_file_atomic(state, path)
    return path


@pytest.mark.parametrize(
    "fmt, changes, message",
    [
        ("nvfp4", {"weight_scale_2": None}, r"w1' is nvfp4 .* tensor 'transformer_blocks\.0\.img_mlp\.w1\.weight_scale_2' is missing"),
        ("nvfp4", {"weight_scale": torch.zeros(128, 3, dtype=torch.uint8)},
         r"nvfp4 tensors .*w1\.weight' \[352, 64\], .*w1\.weight_scale' \[128, 3\].*must be"),
        ("mxfp8", {"weight_scale": None}, r"w1\.weight_scale' is missing"),
        ("mxfp8", {"weight_scale": torch.zeros(384, 4, dtype=torch.float32)}, r"mxfp8 tensors .*weight_scale' \[384, 4\]"),
        ("mxfp8", {"weight": torch.zeros(352, 128, dtype=torch.uint8)}, r"stored as U8, but its format mxfp8"),
    ],
)
def test_broken_quantised_layers_name_the_tensor_and_file(tmp_path, fmt, changes, message):
    path = layer_file(tmp_path, fmt, **changes)
    with pytest.raises(CheckpointError, match=message) as err:
        load_mmdit(path)
    assert str(path) in str(err.value)


def test_block_formats_cannot_hold_an_embedding_table(tmp_path, tiny_states, tiny_configs_):
    state = dict(tiny_states["text_encoder"])
    emb = state.pop("model.embed_tokens.weight")
    state.update({f"model.embed_tokens.{k}": v for k, v in pack_weight(emb, "mxfp8").items()})
    path = tmp_path / "enc.safetensors"
    save_file_atomic(state, path)
    with pytest.raises(CheckpointError, match=r"embed_tokens.*cannot stay mxfp8") as err:
        load_text_encoder(path, (0, 1, 2, 3))
    assert str(path) in str(err.value)


def test_streaming_writer_writes_what_safetensors_reads_and_is_atomic(tmp_path):
    tensors = {
        "a": torch.randn(3, 5),
        "marker": torch.empty(0, dtype=torch.float8_e4m3fn),
        "scale": torch.tensor(2.5),
        "codes": torch.arange(7, dtype=torch.uint8),
        "half": torch.randn(2, 3).to(torch.bfloat16),
        "e8m0": torch.tensor([1.0, 0.25]).to(torch.float8_e8m0fnu),
    }
    layout = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    items = list(tensors.items())
    path = write_streaming(tmp_path / "s.safetensors", layout, [dict(items[:2]), dict(items[2:])], {"k": "v"})
    loaded, metadata = read(path)
    assert metadata == {"k": "v"} and list(loaded) == list(tensors)
    for k, v in tensors.items():
        same = loaded[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)
        assert loaded[k].dtype == v.dtype and loaded[k].shape == v.shape and torch.equal(*same), k
    with pytest.raises(RuntimeError, match="announced layout"):
        write_streaming(tmp_path / "bad.safetensors", layout, [dict(items[1:])])
    with pytest.raises(RuntimeError, match="fewer tensors"):
        write_streaming(tmp_path / "short.safetensors", layout, [dict(items[:3])])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors"]  # nothing half-written left


def test_lens_quantize_refuses_a_quantised_source_and_writes_nothing(tmp_path, comfy_files, capsys):
    out = tmp_path / "again.safetensors"
    assert quantize_main([str(comfy_files["mxfp8"]), str(out), "--type", "nvfp4", "--quiet"]) == 2
    assert "F8_E4M3: only float checkpoints" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
