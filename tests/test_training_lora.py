"""LoRA injection (peft, training/lora.py), files in every naming, and merging with lens_core.lora.apply_lora."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file

from lens_core.lora import (
    LoraFormatError,
    apply_lora,
    convert_lora_file,
    kohya_name,
    load_lora_file,
)
from lens_core.mmdit import LensMMDiT
from lens_core.random_weights import randomize_, tiny_configs
from training.lora import add_lora, dead_module_names, lora_state_dict, lora_target_names, save_lora

CFG = tiny_configs()[0]



def _inputs(seed=0, n=16, s=7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, 128, generator=g)
    sigma = torch.rand(2, generator=g)
    feats = [torch.randn(2, s, CFG.enc_hidden_dim, generator=g) for _ in range(4)]
    mask = torch.ones(2, s, dtype=torch.bool)
    mask[0, 5:] = False
    return x, sigma, feats, mask, (4, 4)


def _base() -> LensMMDiT:
    return randomize_(LensMMDiT(CFG), 0).eval()


@pytest.fixture(scope="module")
def trained():
    """A peft-LoRA model whose LoRA weights are non-trivial (a few optimizer steps + random B)."""
    model = _base()
    add_lora(model, rank=4, alpha=6.0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for _ in range(3):
        x, sigma, feats, mask, hw = _inputs(1)
        loss = model(x, sigma, feats, mask, hw).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        expected = model(*_inputs(2))
    return model, expected


def test_targets_are_projections_not_modulation():
    model = _base()
    names = lora_target_names(model)
    assert "transformer_blocks.0.attn.img_qkv" in names and "transformer_blocks.0.txt_mlp.w3" in names
    assert (
        "transformer_blocks.0.attn.to_out.0" in names and "transformer_blocks.1.attn.to_add_out" not in names
    )
    assert not any("_mod" in n for n in names)
    assert set(lora_target_names(model, exclude_dead=False)) - set(names) == {
        n for n in dead_module_names(CFG.num_layers) if "norm" not in n
    }
    assert len(names) == 10 * CFG.num_layers - 4


def test_every_trainable_parameter_gets_a_gradient(trained):
    """The dead last-block text path is excluded, so DDP needs no find_unused_parameters."""
    model = _base()
    add_lora(model, rank=2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_()
    model.train()
    model(*_inputs()).square().mean().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n, _ in trainable)
    assert [n for n, p in trainable if p.grad is None or not p.grad.abs().sum()] == []


def test_saved_lora_applied_to_fresh_model_matches_peft(trained, tmp_path):
    model, expected = trained
    path = save_lora(model, tmp_path / "lora.safetensors", "peft", torch.float32)
    tensors, meta = load_lora_file(path)
    assert "transformer.transformer_blocks.0.attn.img_qkv.lora_A.weight" in tensors
    assert "transformer.transformer_blocks.1.img_mlp.w2.lora_B.weight" in tensors
    assert '"transformer.lora_alpha": 6.0' in meta["lora_adapter_metadata"]
    fresh = _base()
    report = apply_lora(fresh, path)
    assert len(report.applied) == len(lora_target_names(fresh)) and not report.unmatched
    with torch.no_grad():
        got = fresh(*_inputs(2))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # merging is linear in the strength: +1 then -1 restores the base weights exactly enough
    apply_lora(fresh, path, scale=-1.0)
    torch.testing.assert_close(fresh.state_dict(), _base().state_dict(), rtol=0, atol=1e-6)


def test_kohya_round_trip(trained, tmp_path):
    model, expected = trained
    kohya = save_lora(model, tmp_path / "kohya.safetensors", "kohya", torch.float32)
    sd = load_file(kohya)
    key = kohya_name("transformer_blocks.0.attn.img_qkv")
    assert key == "lora_unet_transformer_blocks_0_attn_img_qkv"
    assert {f"{key}.lora_down.weight", f"{key}.lora_up.weight", f"{key}.alpha"} <= set(sd)
    assert float(sd[f"{key}.alpha"]) == 6.0
    assert "lora_unet_transformer_blocks_0_attn_to_out_0.lora_up.weight" in sd
    fresh = _base()
    apply_lora(fresh, kohya)
    with torch.no_grad():
        torch.testing.assert_close(fresh(*_inputs(2)), expected, rtol=1e-5, atol=1e-5)
    # kohya -> peft -> kohya keeps every tensor
    peft = convert_lora_file(kohya, tmp_path / "peft.safetensors", to="peft")
    back = load_file(convert_lora_file(peft, tmp_path / "kohya2.safetensors", to="kohya"))
    assert set(back) == set(sd)
    for k in sd:
        torch.testing.assert_close(back[k], sd[k], rtol=0, atol=0)


@pytest.mark.parametrize("naming", ["diffusion_model", "onetrainer", "peft_adapter_name", "split_qkv"])
def test_other_namings_merge_identically(trained, tmp_path, naming):
    model, expected = trained
    sd = lora_state_dict(model)  # transformer.<path>.lora_A.weight
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        path, kind = k.removeprefix("transformer.").rsplit(".lora_", 1)
        a_or_b = kind.split(".")[0]
        if naming == "diffusion_model":
            out[f"diffusion_model.{path}.lora_{a_or_b}.weight"] = v
            out[f"diffusion_model.{path}.alpha"] = torch.tensor(6.0)
        elif naming == "onetrainer":
            out[f"transformer.{path}.lora_{'down' if a_or_b == 'A' else 'up'}.weight"] = v
            out[f"transformer.{path}.alpha"] = torch.tensor(6.0)
        elif naming == "peft_adapter_name":
            out[f"base_model.model.{path}.lora_{a_or_b}.default.weight"] = v
            out[f"base_model.model.{path}.alpha"] = torch.tensor(6.0)
        else:  # split q/k/v LoRAs, each the same rank, together equal to the fused one
            if path.endswith("qkv"):
                stream = path.rsplit(".", 1)[1][:3]
                names = (
                    ["to_q", "to_k", "to_v"]
                    if stream == "img"
                    else ["add_q_proj", "add_k_proj", "add_v_proj"]
                )
                block = path.rsplit(".", 1)[0]
                for i, name in enumerate(names):
                    part = v if a_or_b == "A" else v.chunk(3, dim=0)[i]
                    out[f"transformer.{block}.{name}.lora_{a_or_b}.weight"] = part
                    out[f"transformer.{block}.{name}.alpha"] = torch.tensor(6.0)
            else:
                out[f"transformer.{path}.lora_{a_or_b}.weight"] = v
                out[f"transformer.{path}.alpha"] = torch.tensor(6.0)
    save_file({k: t.clone().contiguous() for k, t in out.items()}, tmp_path / "x.safetensors")
    fresh = _base()
    apply_lora(fresh, tmp_path / "x.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(fresh(*_inputs(2)), expected, rtol=1e-5, atol=1e-5)


def test_bad_lora_files_are_refused(trained, tmp_path):
    model, _ = trained
    sd = lora_state_dict(model)
    with pytest.raises(LoraFormatError, match="LoKr"):
        apply_lora(_base(), {"lycoris_transformer_blocks_0_attn_img_qkv.lokr_w1": torch.zeros(2, 2)})
    extra = dict(sd) | {"transformer.nonexistent.lora_A.weight": torch.zeros(4, 8)}
    with pytest.raises(LoraFormatError, match="match no module"):
        apply_lora(_base(), extra)
    assert apply_lora(_base(), extra, strict=False).unmatched == ["transformer.nonexistent.lora_A.weight"]
    only_a = {k: v for k, v in sd.items() if "lora_A" in k}
    with pytest.raises(LoraFormatError, match="needs both"):
        apply_lora(_base(), only_a)
    bigger = LensMMDiT(dataclasses.replace(CFG, num_attention_heads=3))
    with pytest.raises(LoraFormatError, match="another model size"):
        apply_lora(bigger, sd)
    with pytest.raises(LoraFormatError, match="pickle"):
        apply_lora(_base(), tmp_path / "lora.pt")
