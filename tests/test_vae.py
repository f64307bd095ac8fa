"""FLUX.2 VAE: parity with diffusers' AutoencoderKLFlux2 for both checkpoint namings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lens_core.errors import CheckpointError
from lens_core.vae import (
    Flux2VAE,
    VAEConfig,
    check_flux2_vae,
    convert_vae_state_dict,
    pack_latents,
    unpack_latents,
    vae_key_map,
)

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLFlux2  # noqa: E402

CONFIG_JSON = Path(__file__).resolve().parents[1] / "lens_core" / "configs" / "vae_config.json"
TINY = {
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "latent_channels": 32,
}


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference() -> AutoencoderKLFlux2:
    """Tiny diffusers VAE with random weights (norms included) and non-trivial bn statistics."""
    torch.manual_seed(0)
    n = len(TINY["block_out_channels"])
    model = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n, **TINY
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
        model.bn.running_mean.copy_(0.5 * torch.randn(128))
        model.bn.running_var.copy_(0.2 + torch.rand(128) * 2.0)
        model.bn.num_batches_tracked.fill_(1234)
    return model


def tiny_config() -> VAEConfig:
    return VAEConfig(**TINY)


def to_bfl(sd: dict[str, torch.Tensor], n_blocks: int) -> dict[str, torch.Tensor]:
    """diffusers names -> Black Forest Labs names (written independently of lens_core.vae)."""
    out: dict[str, torch.Tensor] = {}
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for key, t in sd.items():
        new = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        parts = new.split(".")
        if parts[1] == "down_blocks":
            i, rest = parts[2], parts[3:]
            if rest[0] == "resnets":
                new = ".".join(["encoder", "down", i, "block", *rest[1:]])
            else:  # downsamplers.0.conv.X
                new = ".".join(["encoder", "down", i, "downsample", *rest[2:]])
        elif parts[1] == "up_blocks":
            i, rest = str(n_blocks - 1 - int(parts[2])), parts[3:]
            if rest[0] == "resnets":
                new = ".".join(["decoder", "up", i, "block", *rest[1:]])
            else:
                new = ".".join(["decoder", "up", i, "upsample", *rest[2:]])
        elif parts[1] == "mid_block":
            if parts[2] == "resnets":
                new = ".".join([parts[0], "mid", f"block_{int(parts[3]) + 1}", *parts[4:]])
            else:  # attentions.0.<proj>.<param>
                proj = ".".join(parts[4:-1])
                new = ".".join([parts[0], "mid", "attn_1", attn[proj], parts[-1]])
                if t.ndim == 2:
                    t = t[:, :, None, None]  # Linear -> 1x1 conv
        out[new] = t
    return out


def patchify(z: torch.Tensor) -> torch.Tensor:
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unpatchify(z: torch.Tensor) -> torch.Tensor:
    b, c4, h, w = z.shape
    return z.view(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, 2 * h, 2 * w)


# ---------------------------------------------------------------------------------------------
# parity
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["diffusers", "bfl", "bfl-prefixed"])
def test_encode_decode_match_diffusers(reference, layout):
    sd = reference.state_dict()
    if layout != "diffusers":
        sd = to_bfl(sd, len(TINY["block_out_channels"]))
        assert sd["encoder.mid.attn_1.q.weight"].ndim == 4 and "decoder.up.0.upsample.conv.weight" not in sd
    if layout == "bfl-prefixed":  # merged checkpoint: VAE under a prefix, other weights beside it
        sd = {"first_stage_model." + k: v for k, v in sd.items()}
        sd["model.diffusion_model.x.weight"] = torch.zeros(1)
        sd["first_stage_model.encoder.quant_conv.weight"] = sd.pop("first_stage_model.quant_conv.weight")
        sd["first_stage_model.decoder.post_quant_conv.bias"] = sd.pop(
            "first_stage_model.post_quant_conv.bias"
        )

    with torch.device("meta"):
        ours = Flux2VAE(tiny_config())
    ours.load_state_dict(convert_vae_state_dict(sd), strict=True, assign=True)
    ours.eval()
    assert ours.bn.running_mean.device.type == "cpu"

    torch.manual_seed(1)
    images = torch.rand(2, 3, 64, 96) * 2 - 1
    mean = reference.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(reference.bn.running_var.view(1, -1, 1, 1) + reference.config.batch_norm_eps)
    with torch.no_grad():
        want = (patchify(reference.encode(images).latent_dist.mode()) - mean) / std
        got = ours.encode(images)
        assert got.shape == (2, 128, 64 // 8, 96 // 8) and got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

        latents = torch.randn(2, 128, 4, 6)
        want_img = reference.decode(unpatchify(latents * std + mean)).sample.clamp(-1, 1)
        got_img = ours.decode(latents)
        assert got_img.shape == (2, 3, 4 * 8, 6 * 8)
        # the comparison must not be trivial: most pixels are inside (-1, 1)
        assert (want_img.abs() < 1).float().mean() > 0.5
        torch.testing.assert_close(got_img, want_img, atol=1e-5, rtol=1e-5)


def test_bf16_compute_follows_weights(reference):
    ours = Flux2VAE(tiny_config(), dtype=torch.bfloat16)
    ours.load_state_dict(convert_vae_state_dict(reference.state_dict()))
    assert ours.bn.running_var.dtype == torch.bfloat16
    with torch.no_grad():
        z = ours.encode(torch.zeros(1, 3, 32, 32))
        img = ours.decode(z)
    assert z.dtype == torch.float32 and img.dtype == torch.float32 and img.shape == (1, 3, 32, 32)


def test_key_map_is_lazy_and_drops_counter(reference):
    sd = reference.state_dict()
    bfl = to_bfl(sd, 3)
    mapping = vae_key_map(bfl.keys())
    assert "bn.num_batches_tracked" not in mapping
    assert mapping["decoder.up.0.block.1.conv1.weight"] == "decoder.up_blocks.2.resnets.1.conv1.weight"
    assert mapping["decoder.up.2.upsample.conv.bias"] == "decoder.up_blocks.0.upsamplers.0.conv.bias"
    assert mapping["encoder.mid.attn_1.proj_out.weight"] == "encoder.mid_block.attentions.0.to_out.0.weight"
    assert sorted(mapping.values()) == sorted(Flux2VAE(tiny_config()).state_dict().keys())
    # diffusers names are already canonical; a pipeline prefix is stripped
    assert vae_key_map(["vae." + k for k in sd]) == {"vae." + k: k for k in sd if "num_batches" not in k}
    assert vae_key_map(["model.diffusion_model.img_in.weight"]) == {}


def test_from_state_dict_shapes(reference):
    shapes = {k: tuple(v.shape) for k, v in convert_vae_state_dict(to_bfl(reference.state_dict(), 3)).items()}
    cfg = VAEConfig.from_state_dict_shapes(shapes)
    assert cfg.block_out_channels == (32, 64, 64) and cfg.layers_per_block == 1
    assert (cfg.latent_channels, cfg.patch_size, cfg.decoder_block_out_channels) == (32, (2, 2), None)
    check_flux2_vae(shapes)  # 4-D attention shapes from a BFL file are accepted too
    check_flux2_vae({k: tuple(v.shape) for k, v in reference.state_dict().items()})


# ---------------------------------------------------------------------------------------------
# latent layout
# ---------------------------------------------------------------------------------------------


def test_pack_unpack_channel_order():
    torch.manual_seed(2)
    b, h, w = 2, 3, 5
    z = torch.randn(b, 128, h, w)
    tokens = pack_latents(z)
    assert tokens.shape == (b, h * w, 128)
    assert torch.equal(tokens[:, 1 * w + 2], z[:, :, 1, 2])  # row-major token order
    assert torch.equal(unpack_latents(tokens, h, w), z)

    # reference pipeline: rearrange 'b (h w) (c p1 p2) -> b c (h p1) (w p2)' gives the 32-ch latent
    full = tokens.reshape(b, h, w, 32, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, 32, 2 * h, 2 * w)
    assert torch.equal(full, unpatchify(z))
    assert torch.equal(patchify(full), z)


# ---------------------------------------------------------------------------------------------
# wrong files
# ---------------------------------------------------------------------------------------------


def _ldm_vae_shapes(latent: int, quant: bool, bn: bool) -> dict[str, tuple]:
    s = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.conv_out.weight": (2 * latent, 512, 3, 3),
        "decoder.conv_in.weight": (512, latent, 3, 3),
        "encoder.mid_block.attentions.0.to_q.weight": (512, 512),
        "decoder.mid_block.attentions.0.to_q.weight": (512, 512),
    }
    if quant:
        s["quant_conv.weight"] = (2 * latent, 2 * latent, 1, 1)
        s["post_quant_conv.weight"] = (latent, latent, 1, 1)
    if bn:
        s["bn.running_mean"] = s["bn.running_var"] = (4 * latent,)
    return s


@pytest.mark.parametrize(
    "shapes, words",
    [
        (_ldm_vae_shapes(16, quant=False, bn=False), "FLUX.1"),
        (_ldm_vae_shapes(4, quant=True, bn=False), "SDXL"),
        (_ldm_vae_shapes(32, quant=True, bn=False), "bn.running_mean"),
        ({"model.layers.0.self_attn.q_proj.weight": (8, 8)}, "not a VAE"),
    ],
)
def test_check_flux2_vae_rejects_other_vaes(shapes, words):
    with pytest.raises(ValueError, match="flux2-vae.safetensors") as err:
        check_flux2_vae(shapes)
    assert words in str(err.value)
    assert isinstance(err.value, CheckpointError)
    check_flux2_vae(_ldm_vae_shapes(32, quant=True, bn=True))


# ---------------------------------------------------------------------------------------------
# released config
# ---------------------------------------------------------------------------------------------


def test_released_config_parameter_count():
    d = json.loads(CONFIG_JSON.read_text())
    cfg = VAEConfig.from_json(d)
    assert cfg == VAEConfig()
    with torch.device("meta"):
        ours = Flux2VAE(cfg)
        theirs = AutoencoderKLFlux2.from_config({k: v for k, v in d.items() if k != "force_upcast"})
    n_ours = sum(p.numel() for p in ours.parameters())
    assert n_ours == sum(p.numel() for p in theirs.parameters()) == 84_046_115
    # same names and shapes as diffusers, less the BatchNorm counter
    want = {k: tuple(v.shape) for k, v in theirs.state_dict().items() if k != "bn.num_batches_tracked"}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == want
    check_flux2_vae(want)
    assert VAEConfig.from_state_dict_shapes(want) == cfg
