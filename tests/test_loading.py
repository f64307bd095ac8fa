"""Checkpoint loading: every layout users have, and a clear error for every kind of bad file."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lens_core.errors import CheckpointError
from lens_core.loading import load_mmdit, load_text_encoder, load_vae
from lens_core.mxfp4 import dequantize_mxfp4
from lens_core.safetensors_io import TensorSource, save_file_atomic

from .test_vae import to_bfl


def _assert_state_equal(model, expected, prefix=""):
    got = model.state_dict()
    for k, v in got.items():
        torch.testing.assert_close(v, expected[prefix + k].to(v.dtype), rtol=0, atol=0, msg=k)


def test_diffusers_folders_load_exactly(tiny_pipeline, tiny_states):
    mmdit = load_mmdit(tiny_pipeline)  # pipeline root resolves to transformer/
    assert not any(p.is_meta for p in mmdit.parameters())
    _assert_state_equal(mmdit, tiny_states["transformer"])
    encoder = load_text_encoder(tiny_pipeline / "text_encoder", selected_layers=(0, 1, 2, 3))
    _assert_state_equal(encoder, tiny_states["text_encoder"])
    vae = load_vae(tiny_pipeline / "vae")
    _assert_state_equal(vae, tiny_states["vae"])


def test_sharded_index_is_used(tiny_pipeline):
    index = json.loads((tiny_pipeline / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model.", "diffusion_model."])
def test_single_file_mmdit_with_prefix_and_other_components(tmp_path, tiny_states, prefix):
    merged = {prefix + k: v for k, v in tiny_states["transformer"].items()}
    if prefix:  # merged files hold the other components under their own prefixes
        merged.update({"first_stage_model." + k: v for k, v in tiny_states["vae"].items()})
    path = save_file_atomic(merged, tmp_path / "lens_merged.safetensors")
    _assert_state_equal(load_mmdit(path), tiny_states["transformer"])


def test_bf16_file_loads_as_fp32_and_bf16(tmp_path, tiny_states):
    path = save_file_atomic({k: v.bfloat16() for k, v in tiny_states["transformer"].items()}, tmp_path / "m.safetensors")
    assert load_mmdit(path, dtype=torch.float32).img_in.weight.dtype == torch.float32
    m = load_mmdit(path, dtype=torch.bfloat16)
    assert m.img_in.weight.dtype == torch.bfloat16
    torch.testing.assert_close(m.img_in.weight, tiny_states["transformer"]["img_in.weight"].bfloat16(), rtol=0, atol=0)


def test_float16_is_refused(tiny_pipeline):
    with pytest.raises(ValueError, match="float16"):
        load_mmdit(tiny_pipeline, dtype=torch.float16)


def test_bfl_vae_single_file(tmp_path, tiny_pipeline, tiny_states, tiny_configs_):
    bfl = to_bfl(tiny_states["vae"], len(tiny_configs_[2].block_out_channels))
    assert any(v.ndim == 4 and ".attn_1.q." in k for k, v in bfl.items())  # 1x1-conv attention weights
    # The tiny VAE's GroupNorm group count is not the released one: carry it as embedded config.
    config = (tiny_pipeline / "vae" / "config.json").read_text()
    path = save_file_atomic(bfl, tmp_path / "flux2-vae.safetensors", metadata={"config": config})
    _assert_state_equal(load_vae(path), tiny_states["vae"])


def test_mxfp4_encoder_keeps_experts_quantised(tmp_path, tiny_pipeline_mxfp4):
    enc = load_text_encoder(tiny_pipeline_mxfp4, selected_layers=(0, 1, 2, 3))
    state = enc.state_dict()
    blocks = [k for k in state if k.endswith("_blocks")]
    assert blocks and all(state[k].dtype == torch.uint8 for k in blocks)
    assert not any(k.endswith(("experts.gate_up_proj", "experts.down_proj")) for k in state)
    # Same features as a dense (bf16-style re-upload) encoder holding the dequantised weights.
    src = TensorSource.open(tiny_pipeline_mxfp4 / "text_encoder")
    dense = {k: src[k] for k in src if not k.endswith(("_blocks", "_scales"))}
    for k in blocks:
        base = k[: -len("_blocks")]
        dense[base] = dequantize_mxfp4(src[k], src[base + "_scales"], torch.float32).transpose(1, 2).contiguous()
    folder = tmp_path / "dense_encoder"
    folder.mkdir()
    shutil.copy(tiny_pipeline_mxfp4 / "text_encoder" / "config.json", folder)
    save_file_atomic(dense, folder / "model.safetensors")
    enc_dense = load_text_encoder(folder, selected_layers=(0, 1, 2, 3))
    ids = torch.randint(0, 1000, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.bool)
    for a, b in zip(enc(ids, mask), enc_dense(ids, mask), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_encoder_skips_layers_past_the_last_selected(tiny_pipeline):
    enc = load_text_encoder(tiny_pipeline, selected_layers=(0, 1))
    assert not any(k.startswith(("model.layers.2.", "model.layers.3.")) for k in enc.state_dict())
    with pytest.raises(CheckpointError, match="only 4 layers"):
        load_text_encoder(tiny_pipeline, selected_layers=(5, 11, 17, 23))


# -- bad input ---------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_mmdit(tmp_path / "nope.safetensors")


def test_pickle_checkpoints_are_refused(tmp_path):
    path = tmp_path / "lens.ckpt"
    path.write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="pickle") as e:
        load_mmdit(path)
    assert str(path) in str(e.value)


def test_truncated_file_names_file_and_tensor(tmp_path, tiny_pipeline):
    src = tiny_pipeline / "vae" / "diffusion_pytorch_model.safetensors"
    cut = tmp_path / "vae.safetensors"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"truncated: tensor '") as e:
        load_vae(cut)
    assert str(cut) in str(e.value)


def test_corrupt_header(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes((20).to_bytes(8, "little") + b"{not json at all!!!}" + b"\0" * 64)
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        load_mmdit(path)


def test_wrong_component_is_named(tiny_pipeline):
    with pytest.raises(CheckpointError, match="not a Lens MMDiT: it looks like a VAE"):
        load_mmdit(tiny_pipeline / "vae")
    with pytest.raises(CheckpointError, match="not a GPT-OSS text encoder: it looks like a Lens MMDiT"):
        load_text_encoder(tiny_pipeline / "transformer", selected_layers=(0,))
    with pytest.raises(CheckpointError, match="not a VAE"):
        load_vae(tiny_pipeline / "transformer")


def test_flux1_vae_is_rejected(tmp_path, tiny_states):
    flux1 = {k: v for k, v in tiny_states["vae"].items() if not k.startswith(("bn.", "quant_conv", "post_quant_conv"))}
    flux1["encoder.conv_out.weight"] = flux1["encoder.conv_out.weight"][:32]
    flux1["encoder.conv_out.bias"] = flux1["encoder.conv_out.bias"][:32]
    flux1["decoder.conv_in.weight"] = flux1["decoder.conv_in.weight"][:, :16]
    path = save_file_atomic(flux1, tmp_path / "ae.safetensors")
    with pytest.raises(CheckpointError, match="FLUX.1") as e:
        load_vae(path)
    assert str(path) in str(e.value)


def test_missing_and_misshapen_tensors(tmp_path, tiny_states):
    state = dict(tiny_states["transformer"])
    del state["proj_out.bias"]
    with pytest.raises(CheckpointError, match="incomplete .*proj_out.bias"):
        load_mmdit(save_file_atomic(state, tmp_path / "a.safetensors"))
    state = dict(tiny_states["transformer"])
    state["transformer_blocks.1.img_mlp.w2.weight"] = state["transformer_blocks.1.img_mlp.w2.weight"][:, :-1]
    with pytest.raises(CheckpointError, match=r"transformer_blocks.1.img_mlp.w2.weight' has shape"):
        load_mmdit(save_file_atomic(state, tmp_path / "b.safetensors"))


def test_missing_shard(tmp_path, tiny_pipeline):
    folder = tmp_path / "transformer"
    shutil.copytree(tiny_pipeline / "transformer", folder)
    next(folder.glob("*-00001-of-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_mmdit(folder)
