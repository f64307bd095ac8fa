"""Random-weight Lens checkpoints in the real file layouts.

No weights can be downloaded in CI, so tests, benchmarks and the placeholder default model are
built from seeded random weights written exactly as the released files are laid out (diffusers
folders with sharded safetensors and an index, ComfyUI single files with a prefix, HF encoder
folders with MXFP4 experts). Weights are scaled like a trained network (unit-variance
activations), so a forward pass through many layers stays finite.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn

from .mmdit import LensMMDiT, MMDiTConfig
from .mxfp4 import quantize_mxfp4
from .safetensors_io import save_file_atomic, save_sharded
from .text_encoder import GptOssConfig, GptOssEncoder
from .tokenizer import write_tokenizer_json
from .vae import Flux2VAE, VAEConfig


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Fill every floating parameter/buffer of ``model`` in place from a generator seeded per device.

    Matrices get N(0, 1/fan_in); 1-D ``weight``s (norm scales) 1 + N(0, 0.1^2); other 1-D
    tensors (biases, sinks, BN means) N(0, 0.05^2); BN variances U(0.5, 2).
    """
    generators: dict[torch.device, torch.Generator] = {}
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    with torch.no_grad():
        for name, t in tensors.items():
            if not t.is_floating_point():
                continue
            if t.device not in generators:  # draw on the tensor's device: full-size models stay on the GPU
                generators[t.device] = torch.Generator(device=t.device).manual_seed(seed)
            kw = {"generator": generators[t.device], "device": t.device}
            if name.endswith("running_var"):
                v = torch.rand(t.shape, **kw) * 1.5 + 0.5
            elif t.ndim == 1 and name.endswith("weight"):
                v = 1 + 0.1 * torch.randn(t.shape, **kw)
            elif t.ndim == 1:
                v = 0.05 * torch.randn(t.shape, **kw)
            elif name.endswith("embed_tokens.weight"):
                v = torch.randn(t.shape, **kw)
            else:
                fan_in = t.shape[-2] if name.endswith(("gate_up_proj", "down_proj")) else math.prod(t.shape[1:])
                v = torch.randn(t.shape, **kw) / math.sqrt(fan_in)
            t.copy_(v)
    return model


def tiny_configs(encoder_hidden: int = 32) -> tuple[MMDiTConfig, GptOssConfig, VAEConfig]:
    """Small configs of the real architectures (MMDiT head_dim stays 64 for the 8/28/28 RoPE axes)."""
    mmdit = MMDiTConfig(
        num_layers=2, num_attention_heads=2, enc_hidden_dim=encoder_hidden, mlp_hidden_dim=341,
        selected_layer_index=(0, 1, 2, 3),
    )
    encoder = GptOssConfig(
        hidden_size=encoder_hidden, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
        layer_types=("sliding_attention", "full_attention") * 2,
    )
    vae = VAEConfig(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8)  # 3 downsamples: /8 like the real one
    return mmdit, encoder, vae


def mmdit_config_json(config: MMDiTConfig) -> dict:
    return {
        "_class_name": "LensTransformer2DModel", "patch_size": config.patch_size, "in_channels": config.in_channels,
        "out_channels": config.out_channels, "num_layers": config.num_layers,
        "attention_head_dim": config.attention_head_dim, "num_attention_heads": config.num_attention_heads,
        "inner_dim": config.inner_dim, "enc_hidden_dim": config.enc_hidden_dim,
        "axes_dims_rope": list(config.axes_dims_rope), "gate_mlp": True, "rms_norm": True,
        "multi_layer_encoder_feature": True, "selected_layer_index": list(config.selected_layer_index),
    }


def encoder_config_json(config: GptOssConfig) -> dict:
    return {
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim, "intermediate_size": config.intermediate_size,
        "num_local_experts": config.num_local_experts, "num_experts_per_tok": config.num_experts_per_tok,
        "experts_per_token": config.num_experts_per_tok, "sliding_window": config.sliding_window,
        "layer_types": list(config.layer_types), "rms_norm_eps": config.rms_norm_eps,
        "rope_parameters": dict(config.rope_scaling, rope_theta=config.rope_theta),
        "swiglu_limit": config.swiglu_limit, "pad_token_id": config.pad_token_id, "attention_bias": True,
    }


def vae_config_json(config: VAEConfig) -> dict:
    return {
        "_class_name": "AutoencoderKLFlux2", "in_channels": config.in_channels, "out_channels": config.out_channels,
        "latent_channels": config.latent_channels, "block_out_channels": list(config.block_out_channels),
        "layers_per_block": config.layers_per_block, "norm_num_groups": config.norm_num_groups,
        "batch_norm_eps": config.batch_norm_eps, "patch_size": list(config.patch_size),
        "down_block_types": ["DownEncoderBlock2D"] * len(config.block_out_channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(config.block_out_channels),
        "act_fn": "silu", "mid_block_add_attention": True, "use_quant_conv": True, "use_post_quant_conv": True,
    }


def random_state_dicts(
    configs: tuple[MMDiTConfig, GptOssConfig, VAEConfig], seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, dict[str, torch.Tensor]]:
    """Seeded random state dicts of the three components (encoder in HF names, dense experts)."""
    mmdit_cfg, enc_cfg, vae_cfg = configs
    models = {
        "transformer": LensMMDiT(mmdit_cfg),
        "text_encoder": GptOssEncoder(enc_cfg, selected_layers=tuple(range(enc_cfg.num_hidden_layers))),
        "vae": Flux2VAE(vae_cfg),
    }
    return {
        name: {k: v.to(dtype) if v.is_floating_point() else v for k, v in randomize_(m, seed + i).state_dict().items()}
        for i, (name, m) in enumerate(models.items())
    }


def mxfp4_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace dense expert weights by the MXFP4 ``*_blocks``/``*_scales`` of the original GPT-OSS release."""
    out = {}
    for k, v in state.items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            # HF keeps MXFP4 weights as [E, out, in]: the contracted axis is last.
            blocks, scales = quantize_mxfp4(v.float().transpose(1, 2).contiguous())
            out[k + "_blocks"], out[k + "_scales"] = blocks, scales
        else:
            out[k] = v
    return out


def write_random_pipeline(
    root: str | Path,
    configs: tuple[MMDiTConfig, GptOssConfig, VAEConfig] | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    shard_bytes: int | None = None,
    mxfp4: bool = False,
    tokenizer_json: bool = True,
) -> Path:
    """Write a diffusers-layout pipeline folder: ``model_index.json``, ``transformer/``,
    ``text_encoder/`` (HF names, optional MXFP4 experts), ``tokenizer/tokenizer.json``, ``vae/``.

    ``shard_bytes`` splits the transformer and encoder into sharded files with an index.
    ``tokenizer_json=False`` leaves the tokenizer out (the bundled o200k_harmony is then used).
    """
    root = Path(root)
    configs = configs or tiny_configs()
    states = random_state_dicts(configs, seed, dtype)
    if mxfp4:
        states["text_encoder"] = mxfp4_experts(states["text_encoder"])
    files = {"transformer": "diffusion_pytorch_model", "text_encoder": "model", "vae": "diffusion_pytorch_model"}
    jsons = {"transformer": mmdit_config_json(configs[0]), "text_encoder": encoder_config_json(configs[1]), "vae": vae_config_json(configs[2])}
    for name, state in states.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(jsons[name], indent=2))
        if shard_bytes and name != "vae":
            save_sharded(state, folder, files[name], shard_bytes)
        else:
            save_file_atomic(state, folder / f"{files[name]}.safetensors")
    if tokenizer_json:
        write_tokenizer_json(root / "tokenizer" / "tokenizer.json")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "LensPipeline",
        "transformer": ["diffusers", "LensTransformer2DModel"],
        "text_encoder": ["transformers", "LensGptOssEncoder"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "vae": ["diffusers", "AutoencoderKLFlux2"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    }, indent=2))
    return root
