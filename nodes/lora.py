"""Lens LoRAs as ComfyUI weight patches (what the Lens LoRA Loader node adds to a MODEL).

The file is read by :func:`lens_core.lora.read_lora` (every naming: PEFT/diffusers ``transformer.``,
OneTrainer, ``diffusion_model.``, kohya/musubi ``lora_unet_``, split q/k/v) and each module becomes
a patch on the ModelPatcher (``add_patches``), keyed by ComfyUI's state-dict name. Nothing is
merged here: ComfyUI applies the patches when it loads the model to the device and restores the
weights when it unloads or another LoRA set is used, as for its own LoRA loader.

Works on the Lens Model Loader's MODEL and on ComfyUI's native Lens model (UNETLoader, 0.23+):
both name their parameters ``diffusion_model.transformer_blocks.N.attn.img_qkv.weight`` etc.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lens_core.lora import LoraFormatError, read_lora, shapes_from_state_dict

from .lens_bridge import MODEL_PREFIX, lora_patches

try:  # ComfyUI >= 0.3.40: patch objects; older versions take ("lora", weights) tuples
    from comfy.weight_adapter.lora import LoRAAdapter
except ImportError:  # pragma: no cover - depends on the ComfyUI version
    LoRAAdapter = None

log = logging.getLogger("ComfyUI-Lens")

LENS_ANCHOR = MODEL_PREFIX + "transformer_blocks.0.attn.img_qkv.weight"


def _lora_value(up, down, alpha):
    weights = (up, down, alpha, None, None, None)  # up, down, alpha, mid, dora_scale, reshape
    return LoRAAdapter(set(), weights) if LoRAAdapter is not None else ("lora", weights)


def lens_lora_patches(model_patcher, path: str | Path) -> tuple[dict, list[str]]:
    """``(patches for ModelPatcher.add_patches, keys of the file that fit no module)``.

    Raises LoraFormatError for a MODEL that is not Lens, a file with no Lens LoRA in it, LoKr/LoHa/
    DoRA files and LoRAs of another model size.
    """
    state = model_patcher.model_state_dict()
    if LENS_ANCHOR not in state:
        raise LoraFormatError(
            f"this MODEL is not a Lens model ({type(model_patcher.model).__name__} has no '{LENS_ANCHOR}'); "
            "load it with Lens Model Loader (or ComfyUI's UNETLoader for a Lens file)"
        )
    shapes = shapes_from_state_dict({k: tuple(v.shape) for k, v in state.items()}, MODEL_PREFIX)
    modules, unmatched = read_lora(path, shapes, strict=False)
    patches: dict = {}
    for p in lora_patches(modules, shapes, MODEL_PREFIX):
        patches[p.key if p.offset is None else (p.key, p.offset)] = _lora_value(p.up, p.down, p.alpha)
        if p.bias is not None:
            if p.bias_key not in state:
                raise LoraFormatError(f"{p.key}: the LoRA has a bias but the layer has none")
            patches[p.bias_key if p.offset is None else (p.bias_key, p.offset)] = ("diff", (p.bias,))
    return patches, unmatched


def load_lens_lora(model_patcher, path: str | Path, strength: float):
    """A clone of ``model_patcher`` with the LoRA at ``path`` patched in at ``strength``."""
    patches, unmatched = lens_lora_patches(model_patcher, path)
    if unmatched:
        log.warning("Lens LoRA %s: %d tensor(s) fit no module of this model and were skipped, e.g. %s",
                    Path(path).name, len(unmatched), unmatched[:3])
    patched = model_patcher.clone()
    added = set(patched.add_patches(patches, float(strength)))
    missing = [k for k in patches if k not in added]
    if missing:  # every key came from this model's state dict, so this would be a bug
        raise RuntimeError(f"Lens LoRA {Path(path).name}: ComfyUI did not take patches for {missing[:3]}")
    log.info("Lens LoRA %s: %d patches at strength %g", Path(path).name, len(patches), strength)
    return patched
