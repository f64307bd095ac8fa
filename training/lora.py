"""LoRA training on a lens_core LensMMDiT with ``peft``, and saving the result in common namings.

Adapted modules (same as the musubi-tuner and OneTrainer Lens branches): per block the fused
``attn.img_qkv``/``attn.txt_qkv``, the attention outputs ``attn.to_out.0``/``attn.to_add_out``
and the SwiGLU projections ``img_mlp.w1/w2/w3``/``txt_mlp.w1/w2/w3``. The modulation linears
(``img_mod``/``txt_mod``) stay frozen: they are sensitive (4-bit quantising them already breaks
the model) and a LoRA there mostly shifts global colour/contrast.

The last block's text output (``to_add_out``, ``txt_norm2``, ``txt_mlp``) never reaches the
image, so its gradient is exactly zero; by default it is not adapted, which also lets DDP run
without ``find_unused_parameters``.

Files are written with :func:`lens_core.safetensors_io.save_file_atomic` in diffusers/PEFT naming
(``transformer.<path>.lora_A.weight``) with the alpha in the metadata, or in kohya naming
(``lora_unet_..._lora_down.weight`` + ``.alpha``); :mod:`lens_core.lora` reads both back.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict

from lens_core.lora import LORA_TARGET_SUFFIXES, parse_lora, peft_metadata, to_kohya_state_dict
from lens_core.safetensors_io import save_file_atomic

ADAPTER = "default"
FILE_PREFIX = "transformer."


def dead_module_names(num_layers: int) -> list[str]:
    """Modules whose output cannot reach the image tokens: the last block's text path after attention."""
    last = f"transformer_blocks.{num_layers - 1}"
    return [f"{last}.attn.to_add_out", f"{last}.txt_norm2"] + [f"{last}.txt_mlp.w{i}" for i in (1, 2, 3)]


def lora_target_names(
    model: nn.Module, suffixes: Sequence[str] = LORA_TARGET_SUFFIXES, exclude_dead: bool = True
) -> list[str]:
    """The module names LoRA will adapt in ``model`` (a LensMMDiT)."""
    num_layers = len(model.transformer_blocks)
    dead = set(dead_module_names(num_layers)) if exclude_dead else set()
    pattern = re.compile(r"transformer_blocks\.\d+\.(" + "|".join(re.escape(s) for s in suffixes) + r")")
    return [n for n, _ in model.named_modules() if pattern.fullmatch(n) and n not in dead]


def add_lora(
    model: nn.Module,
    rank: int = 16,
    alpha: float | None = None,
    dropout: float = 0.0,
    suffixes: Sequence[str] = LORA_TARGET_SUFFIXES,
    exclude_dead: bool = True,
) -> list[str]:
    """Inject LoRA layers in place (``peft.inject_adapter_in_model``); freeze everything else.

    ``alpha`` defaults to ``rank`` (scaling 1). B starts at zero, so the model is unchanged until
    trained. Returns the adapted module names. LoRA parameters are created in fp32 whatever the
    base dtype, so a bf16 base model still gets fp32 LoRA weights and optimizer state.
    """
    targets = lora_target_names(model, suffixes, exclude_dead)
    if not targets:
        raise ValueError("no LoRA target modules found: is this a lens_core LensMMDiT?")
    config = LoraConfig(
        r=int(rank),
        lora_alpha=float(alpha if alpha is not None else rank),
        lora_dropout=float(dropout),
        target_modules=targets,
        bias="none",
        init_lora_weights=True,
    )
    model.requires_grad_(False)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name, p in model.named_parameters():
        is_lora = ".lora_A." in name or ".lora_B." in name
        if is_lora and p.dtype != torch.float32:
            p.data = p.data.float()
        p.requires_grad_(is_lora)
    model.lens_lora_config = {"rank": int(rank), "alpha": float(config.lora_alpha), "targets": targets}
    return targets


def lora_config_of(model: nn.Module) -> dict:
    cfg = getattr(model, "lens_lora_config", None)
    if cfg is None:
        raise ValueError("this model has no LoRA (call add_lora first)")
    return cfg


def lora_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The LoRA weights in diffusers/PEFT file naming: ``transformer.<path>.lora_A.weight`` etc."""
    sd = get_peft_model_state_dict(model, adapter_name=ADAPTER)
    return {
        FILE_PREFIX + k: (v.detach().to(dtype) if dtype else v.detach()).cpu().contiguous()
        for k, v in sd.items()
    }


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load weights written by :func:`lora_state_dict` back into an injected model (resume)."""
    stripped = {k[len(FILE_PREFIX) :] if k.startswith(FILE_PREFIX) else k: v for k, v in state.items()}
    result = set_peft_model_state_dict(model, stripped, adapter_name=ADAPTER)
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if result.unexpected_keys or missing:
        raise ValueError(
            f"LoRA checkpoint does not fit the model: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}"
        )


def save_lora(
    model: nn.Module,
    path: str | os.PathLike,
    naming: str = "peft",
    dtype: torch.dtype = torch.bfloat16,
    extra_metadata: dict[str, str] | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the model's LoRA (or ``state``, e.g. EMA weights in the same naming) to ``path``.

    ``naming``: ``"peft"`` (diffusers/PEFT, alpha in metadata) or ``"kohya"`` (musubi/sd-scripts,
    per-module ``.alpha`` tensors).
    """
    cfg = lora_config_of(model)
    sd = state if state is not None else lora_state_dict(model)
    sd = {k: v.detach().to(dtype).cpu().contiguous() for k, v in sd.items()}
    meta = peft_metadata(cfg["rank"], cfg["alpha"], cfg["targets"])
    meta.update(extra_metadata or {})
    if naming == "kohya":
        modules, _ = parse_lora(sd, cfg["targets"], meta)
        sd = to_kohya_state_dict(modules)
        meta = {k: v for k, v in meta.items() if k not in ("lora_adapter_metadata",)}
        meta["ss_network_dim"] = str(cfg["rank"])
        meta["ss_network_alpha"] = str(cfg["alpha"])
    elif naming != "peft":
        raise ValueError(f"unknown LoRA naming {naming!r}; choose 'peft' or 'kohya'")
    return save_file_atomic(sd, path, meta)


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of everything that trains, in a stable order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def freeze_dead_parameters(model: nn.Module) -> list[str]:
    """Full fine-tuning: freeze the parameters that cannot receive a gradient (see module docstring)."""
    dead = tuple(dead_module_names(len(model.transformer_blocks)))
    frozen = []
    for name, p in model.named_parameters():
        if name.startswith(dead):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen
