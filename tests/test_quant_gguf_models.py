"""Lens models from GGUF files (quant.gguf_models, quant.gpt_oss_gguf).

* MMDiT: a tiny model converted to GGUF F32 gives exactly the safetensors outputs; Q8_0/Q4_K
  models equal a dense model holding the decoded weights, bit for bit, and stay within a measured
  error of the original;
* GPT-OSS: tiny encoders written the way llama.cpp converts them (names, de-interleaved gate/up,
  transposed experts, MXFP4 repacking) give exactly the features of the HF-layout encoder; a
  deliberately transposed expert does not (the test would catch a layout mistake);
* tokenizer from GGUF metadata; broken files raise errors naming the tensor.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from lens_core.errors import CheckpointError, TokenizerError
from lens_core.loading import load_mmdit, load_text_encoder
from lens_core.mmdit import LensMMDiT, MMDiTConfig
from lens_core.random_weights import (
    encoder_config_json,
    mmdit_config_json,
    mxfp4_experts,
    randomize_,
    tiny_configs,
)
from lens_core.safetensors_io import save_file_atomic
from lens_core.text_encoder import GptOssEncoder
from quant import GGMLType, GGUFError
from quant.convert import convert_mmdit
from quant.gguf_models import (
    GGUFExperts,
    is_gguf,
    load_gpt_oss_gguf,
    load_mmdit_gguf,
    load_mmdit_gguf_config,
)
from quant.gguf_reader import GGUFFile
from quant.gpt_oss_gguf import (
    gpt_oss_config_from_gguf,
    hf_mxfp4_to_ggml,
    load_gguf_tokenizer,
    tokenizer_arrays_from_json,
    write_gpt_oss_gguf,
)
from quant.layers import GGMLEmbedding, GGMLLinear, QuantizedWeight

# ------------------------------------------------------------------------------------------
# MMDiT
# ------------------------------------------------------------------------------------------


def mmdit_inputs(cfg: MMDiTConfig, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    b, h, w, s = 2, 4, 6, 7
    x = torch.randn(b, h * w, cfg.in_channels, generator=g)
    feats = [torch.randn(b, s, cfg.enc_hidden_dim, generator=g) for _ in range(cfg.num_text_layers)]
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[1, 5:] = False
    return x, torch.tensor([0.3, 0.8]), feats, mask, (h, w)


def run(model, inputs, dtype=torch.float32):
    x, sigma, feats, mask, hw = inputs
    with torch.no_grad():
        return model(x.to(dtype), sigma, [f.to(dtype) for f in feats], mask, hw).float()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def decoded_copy(model: LensMMDiT) -> LensMMDiT:
    """A plain dense LensMMDiT holding exactly the values the GGUF model decodes to."""
    state = {
        k: (v.dequantize(torch.float32).to(model.compute_dtype) if isinstance(v, QuantizedWeight) else v)
        for k, v in model.state_dict().items()
    }
    dense = LensMMDiT(model.config, dtype=model.compute_dtype)
    dense.load_state_dict(state)
    # Frozen like every loaded model: torch's linear picks another (last-bit different) kernel for
    # non-contiguous inputs when the weight requires grad, even under no_grad.
    return dense.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def tiny_mmdit(tmp_path_factory):
    cfg = tiny_configs()[0]
    root = tmp_path_factory.mktemp("mmdit")
    save_file_atomic(randomize_(LensMMDiT(cfg), 0).state_dict(), root / "m.safetensors")
    return root / "m.safetensors", cfg


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mmdit_f32_gguf_equals_safetensors_exactly(tiny_mmdit, tmp_path, dtype):
    src, cfg = tiny_mmdit
    convert_mmdit(src, tmp_path / "m.gguf", "F32")
    assert is_gguf(tmp_path / "m.gguf") and not is_gguf(src)
    ref = load_mmdit(src, dtype=dtype)
    model = load_mmdit_gguf(tmp_path / "m.gguf", dtype=dtype)
    assert all(
        isinstance(m, GGMLLinear) and not m.is_quantized
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
    )
    inputs = mmdit_inputs(cfg)
    assert torch.equal(run(model, inputs, dtype), run(ref, inputs, dtype))


# Measured relative error of the velocity on these seeds: Q8_0 0.0081 (tiny model, w2 rows of 341
# stay F16), Q4_K 0.028, mixed 0.023 (small model whose rows are whole 256-value blocks; the fragile
# layers at Q8_0).
@pytest.mark.parametrize(
    ("qtype", "small", "bound"), [("Q8_0", False, 0.012), ("Q4_K", True, 0.04), ("mixed", True, 0.035)]
)
def test_mmdit_quantised_gguf(tiny_mmdit, tmp_path, qtype, small, bound):
    if small:
        cfg = MMDiTConfig(
            num_layers=2,
            num_attention_heads=4,
            enc_hidden_dim=64,
            mlp_hidden_dim=512,
            selected_layer_index=(0, 1, 2, 3),
        )
        src = tmp_path / "small.safetensors"
        save_file_atomic(randomize_(LensMMDiT(cfg), 0).state_dict(), src)
    else:
        src, cfg = tiny_mmdit
    report = convert_mmdit(src, tmp_path / "m.gguf", qtype)
    model = load_mmdit_gguf(tmp_path / "m.gguf")
    if qtype == "Q4_K":
        assert report.types["Q4_K"] == 2 * 2 * 5  # qkv, out, w1-3 of both streams in both blocks
        assert model.transformer_blocks[0].img_mlp.w2.weight_type == GGMLType.Q4_K
        assert model.transformer_blocks[0].img_mod[1].weight_type == GGMLType.Q8_0  # kept at 8 bit
    inputs = mmdit_inputs(cfg)
    out = run(model, inputs)
    assert torch.equal(out, run(decoded_copy(model), inputs))  # exactly the decoded weights
    err = rel(out, run(load_mmdit(src), inputs))
    assert 0 < err < bound, err


def test_mmdit_gguf_prefix_config_and_device_copy(tiny_mmdit, tmp_path):
    """A ComfyUI-GGUF style file with a ``model.diffusion_model.`` prefix and no Lens metadata."""
    src, cfg = tiny_mmdit
    from safetensors.torch import load_file

    state = load_file(str(src))
    w = gguf.GGUFWriter(str(tmp_path / "comfy.gguf"), "lens")
    for k, v in state.items():
        if v.ndim == 2 and v.shape[1] % 32 == 0:
            w.add_tensor(
                "model.diffusion_model." + k,
                gguf_quantize(v.numpy(), gguf.GGMLQuantizationType.Q8_0),
                raw_dtype=gguf.GGMLQuantizationType.Q8_0,
            )
        else:
            w.add_tensor("model.diffusion_model." + k, v.to(torch.float16).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    config = load_mmdit_gguf_config(tmp_path / "comfy.gguf")
    assert config.num_layers == cfg.num_layers and config.selected_layer_index == (5, 11, 17, 23)
    model = load_mmdit_gguf(tmp_path / "comfy.gguf", copy=True)
    raw = model.img_in.weight_raw  # copy=True: own memory, not a view of the whole file map
    assert model.img_in.is_quantized and raw.untyped_storage().nbytes() == raw.numel()
    view = load_mmdit_gguf(tmp_path / "comfy.gguf").img_in.weight_raw
    assert view.untyped_storage().nbytes() > view.numel()  # default: zero-copy view of the map
    inputs = mmdit_inputs(cfg)
    assert rel(run(model, inputs), run(load_mmdit(src), inputs)) < 0.02
    # Our converter stores the config (from config.json here) as metadata, and it is read back.
    folder = tmp_path / "transformer"
    folder.mkdir()
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(src.read_bytes())
    (folder / "config.json").write_text(json.dumps(mmdit_config_json(cfg)))
    convert_mmdit(folder, tmp_path / "ours.gguf", "Q8_0")
    assert load_mmdit_gguf_config(tmp_path / "ours.gguf").selected_layer_index == (0, 1, 2, 3)


def test_mmdit_gguf_errors_name_the_tensor(tiny_mmdit, tmp_path):
    src, cfg = tiny_mmdit
    convert_mmdit(src, tmp_path / "m.gguf", "Q8_0")
    data = (tmp_path / "m.gguf").read_bytes()
    # Truncated download: the reader names the tensor that runs past the end.
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 5000])
    with pytest.raises(GGUFError, match=r"truncated file: tensor '.*'"):
        load_mmdit_gguf(tmp_path / "cut.gguf")

    from safetensors.torch import load_file

    state = load_file(str(src))

    def write(path, patch):
        w = gguf.GGUFWriter(str(path), "lens")
        for k, v in state.items():
            name, arr, raw = patch(k, v)
            w.add_tensor(name, arr, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    # A tensor of the wrong shape for the model: named, with both shapes.
    def wrong_shape(k, v):
        if k == "transformer_blocks.1.attn.to_add_out.weight":
            v = v[:, :96]
        return k, v.numpy(), None

    write(tmp_path / "shape.gguf", wrong_shape)
    with pytest.raises(
        CheckpointError, match=r"'transformer_blocks\.1\.attn\.to_add_out\.weight' has shape \(128, 96\)"
    ):
        load_mmdit_gguf(tmp_path / "shape.gguf")

    # A type without a dequantisation kernel (Q8_1): refused at load time, naming tensor and type.
    def no_kernel(k, v):
        if k == "transformer_blocks.0.img_mlp.w1.weight":
            return k, np.zeros((v.shape[0], v.shape[1] // 32 * 40), np.uint8), gguf.GGMLQuantizationType.Q8_1
        return k, v.numpy(), None

    write(tmp_path / "q81.gguf", no_kernel)
    with pytest.raises(
        GGUFError, match=r"tensor 'transformer_blocks\.0\.img_mlp\.w1\.weight' is stored as Q8_1"
    ):
        load_mmdit_gguf(tmp_path / "q81.gguf")


def test_not_a_lens_gguf(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    w.add_tensor("blk.0.attn_q.weight", np.zeros((32, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="not a Lens MMDiT GGUF: general.architecture is 'llama'"):
        load_mmdit_gguf(tmp_path / "llama.gguf")
    with pytest.raises(CheckpointError, match="not a llama.cpp GPT-OSS GGUF"):
        load_gpt_oss_gguf(tmp_path / "llama.gguf", (0,))


# ------------------------------------------------------------------------------------------
# GPT-OSS
# ------------------------------------------------------------------------------------------

SELECTED = (0, 1, 3)


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    """Tiny GPT-OSS (hidden = expert width = 32: a transposed expert has the right shape) as HF
    folders with dense and MXFP4 experts."""
    cfg = tiny_configs()[1]
    root = tmp_path_factory.mktemp("gptoss")
    state = randomize_(
        GptOssEncoder(cfg, selected_layers=tuple(range(cfg.num_hidden_layers))), 3
    ).state_dict()
    for name, st in (("dense", state), ("mxfp4", mxfp4_experts(state))):
        (root / name).mkdir()
        save_file_atomic(st, root / name / "model.safetensors")
        (root / name / "config.json").write_text(json.dumps(encoder_config_json(cfg)))
    return root, cfg, state


def encoder_inputs():
    ids = torch.randint(0, 5000, (2, 12), generator=torch.Generator().manual_seed(0))
    ids[0, 3] = 200006
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 9:] = False
    return ids, mask


def features(model, dtype=torch.float32):
    ids, mask = encoder_inputs()
    with torch.no_grad():
        return [f.float() for f in model(ids, mask)]


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpt_oss_f32_experts_exact(gpt_oss, tmp_path, fuse, dtype):
    root, cfg, state = gpt_oss
    path = write_gpt_oss_gguf(state, cfg, tmp_path / "e.gguf", fuse_gate_up=fuse)
    with GGUFFile(path) as f:
        names = set(f.tensors)
        assert f.metadata["general.architecture"] == "gpt-oss"
        assert ("blk.0.ffn_gate_up_exps.weight" in names) == fuse and (
            "blk.0.ffn_gate_exps.weight" in names
        ) != fuse
        assert f.tensors["blk.0.ffn_down_exps.weight"].shape == (
            cfg.num_local_experts,
            cfg.hidden_size,
            cfg.intermediate_size,
        )
        assert {
            "token_embd.weight",
            "blk.0.attn_sinks.weight",
            "blk.0.post_attention_norm.weight",
            "blk.0.ffn_gate_inp.bias",
        } <= names
    model = load_gpt_oss_gguf(path, SELECTED, dtype=dtype)
    assert isinstance(model.model.layers[0].mlp.experts, GGUFExperts)
    assert len(model.model.layers) == max(SELECTED) + 1
    ref = load_text_encoder(root / "dense", SELECTED, dtype=dtype)
    assert same(features(model), features(ref))


def test_gpt_oss_mxfp4_repack_equals_hf_mxfp4_encoder(gpt_oss, tmp_path):
    """HF MXFP4 blocks repacked to ggml MXFP4 (no requantisation) == lens_core's MXFP4 encoder."""
    root, cfg, state = gpt_oss
    hf = mxfp4_experts(state)
    for fuse in (False, True):
        path = write_gpt_oss_gguf(hf, cfg, tmp_path / f"mx{fuse}.gguf", fuse_gate_up=fuse)
        with GGUFFile(path) as f:
            assert (
                f.tensors[
                    "blk.1.ffn_up_exps.weight" if not fuse else "blk.1.ffn_gate_up_exps.weight"
                ].ggml_type
                == GGMLType.MXFP4
            )
        model = load_gpt_oss_gguf(path, SELECTED)
        assert model.model.layers[1].mlp.experts.quantized("down").ggml_type == GGMLType.MXFP4
        assert same(features(model), features(load_text_encoder(root / "mxfp4", SELECTED)))


def test_hf_mxfp4_repack_matches_gguf_decoder():
    """The repacked bytes decode (gguf's numpy MXFP4) to lens_core's MXFP4 values."""
    from lens_core.mxfp4 import dequantize_mxfp4, quantize_mxfp4

    x = torch.randn(6, 128)
    blocks, scales = quantize_mxfp4(x)
    ggml = hf_mxfp4_to_ggml(blocks, scales)
    ours = gguf_dequantize(ggml.numpy().reshape(6, -1), gguf.GGMLQuantizationType.MXFP4)
    assert np.array_equal(ours.astype(np.float32), dequantize_mxfp4(blocks, scales, torch.float32).numpy())


def test_gpt_oss_gguf_quantised_mxfp4_equals_dense_with_decoded_weights(gpt_oss, tmp_path):
    """Experts quantised by gguf.quants (MXFP4), attention/router/embedding at Q8_0: the features
    equal a dense HF-layout encoder holding the decoded values."""
    root, cfg, state = gpt_oss
    path = write_gpt_oss_gguf(state, cfg, tmp_path / "q.gguf", expert_type="MXFP4", weight_type="Q8_0")
    model = load_gpt_oss_gguf(path, SELECTED)
    assert isinstance(model.model.embed_tokens, GGMLEmbedding) and model.model.embed_tokens.is_quantized
    assert model.model.layers[0].self_attn.q_proj.weight_type == GGMLType.Q8_0

    dense_state = {}
    for k, v in model.state_dict().items():
        dense_state[k] = v.dequantize() if isinstance(v, QuantizedWeight) else v
    with GGUFFile(path) as f:
        for i in range(max(SELECTED) + 1):

            def dq(part, i=i):
                info = f.tensors[f"blk.{i}.ffn_{part}_exps.weight"]
                raw = f.raw(info.name).numpy().reshape(info.shape[0] * info.shape[1], -1)
                return torch.from_numpy(
                    gguf_dequantize(raw, gguf.GGMLQuantizationType.MXFP4)
                    .reshape(info.shape)
                    .astype(np.float32)
                )

            gate, up, down = dq("gate"), dq("up"), dq("down")  # [E, I, H], [E, I, H], [E, H, I]
            gate_up = torch.stack((gate, up), dim=2).reshape(
                cfg.num_local_experts, -1, cfg.hidden_size
            )  # rows interleaved
            p = f"model.layers.{i}.mlp.experts."
            dense_state[p + "gate_up_proj"] = gate_up.transpose(1, 2).contiguous()
            dense_state[p + "down_proj"] = down.transpose(1, 2).contiguous()
    ref = GptOssEncoder(cfg, selected_layers=SELECTED)
    ref.load_state_dict(dense_state)
    assert same(features(model), features(ref.eval().requires_grad_(False)))
    # And it is close to the unquantised encoder.
    exact = features(load_text_encoder(root / "dense", SELECTED))
    errs = [rel(a, b) for a, b in zip(features(model), exact, strict=True)]
    assert max(errs) < 0.4  # measured 0.09, 0.16, 0.27 (layers 0, 1, 3; random weights, 4-bit experts)


def test_gpt_oss_transposed_expert_is_caught(gpt_oss, tmp_path):
    """Negative control: hidden == expert width, so a transposed ``down`` has the right shape and
    loads - but the features differ.  The exactness tests above would catch a layout mistake."""
    root, cfg, state = gpt_oss
    wrong = dict(state)
    for i in range(cfg.num_hidden_layers):
        k = f"model.layers.{i}.mlp.experts.down_proj"
        wrong[k] = state[k].transpose(1, 2).contiguous()
    path = write_gpt_oss_gguf(wrong, cfg, tmp_path / "wrong.gguf")
    model = load_gpt_oss_gguf(path, SELECTED)
    ref = features(load_text_encoder(root / "dense", SELECTED))
    assert all(rel(a, b) > 1e-3 for a, b in list(zip(features(model), ref, strict=True))[1:])


def test_gpt_oss_config_and_errors(gpt_oss, tmp_path):
    root, cfg, state = gpt_oss
    path = write_gpt_oss_gguf(state, cfg, tmp_path / "e.gguf")
    with GGUFFile(path) as f:
        got = gpt_oss_config_from_gguf(f)
    for field in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "intermediate_size",
        "num_local_experts",
        "num_experts_per_tok",
        "sliding_window",
        "layer_types",
        "rms_norm_eps",
        "rope_theta",
        "rope_scaling",
        "pad_token_id",
    ):
        assert getattr(got, field) == getattr(cfg, field), field
    with pytest.raises(CheckpointError, match="only 4 layers"):
        load_gpt_oss_gguf(path, (5, 11))
    # Truncated: the reader names the tensor.
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:-20000])
    with pytest.raises(GGUFError, match=r"tensor '.*' .*runs past the end"):
        load_gpt_oss_gguf(tmp_path / "cut.gguf", SELECTED)


# ------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------


def metadata_only_gguf(path, arrays=None, model="gpt2"):
    w = gguf.GGUFWriter(str(path), "gpt-oss")
    if arrays is not None:
        tokens, types, merges = arrays
        w.add_tokenizer_model(model)
        w.add_tokenizer_pre("gpt-4o")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tokenizer_from_gguf_metadata(tmp_path_factory):
    from lens_core.tokenizer import load_tokenizer, write_tokenizer_json

    root = tmp_path_factory.mktemp("tok")
    arrays = tokenizer_arrays_from_json(write_tokenizer_json(root / "tokenizer.json"))
    assert len(arrays[0]) == 201088
    path = metadata_only_gguf(root / "tok.gguf", arrays)
    tok = load_gguf_tokenizer(path)
    assert "GGUF tokenizer metadata" in tok.source
    reference = load_tokenizer(None)
    for text in (
        "hello world",
        "A red cube left of 3 blue spheres.\n\n  Ünïcode 日本語\t!",
        "<|start|>user<|message|>a cat<|end|>",
    ):
        assert tok.encode(text) == reference.encode(text)
        assert tok.decode(tok.encode(text)) == text

    # No tokenizer metadata: the bundled tokenizer, or an error when asked for the file's own.
    bare = metadata_only_gguf(root / "bare.gguf")
    assert "quicktok" in load_gguf_tokenizer(bare).source
    with pytest.raises(TokenizerError, match="holds no tokenizer"):
        load_gguf_tokenizer(bare, fallback=False)
    # Another vocabulary is refused by the same validation as every Lens tokenizer.
    other = metadata_only_gguf(root / "other.gguf", (["h", "e", "l", "o", " ", "he"], [1] * 6, ["h e"]))
    with pytest.raises(TokenizerError, match="not the GPT-OSS o200k_harmony vocabulary"):
        load_gguf_tokenizer(other)
    spm = metadata_only_gguf(root / "spm.gguf", (["a"], [1], []), model="llama")
    with pytest.raises(TokenizerError, match="byte-level BPE"):
        load_gguf_tokenizer(spm)
