"""Packed models under ComfyUI's model management: quantised weights stay quantised, patches still apply.

Models whose weights ``lens_core`` keeps packed (GGUF files; fp8, scaled fp8 and ComfyUI's
``comfy_quant`` float8/mxfp8/nvfp4 safetensors) are built with :class:`ComfyGGMLOps`, ``quant``'s
GGML layers: a packed weight is a set of uint8 buffers decoded at every call, not a parameter.
ComfyUI's ModelPatcher moves buffers with the module (so loading, offloading and partial loading
work as for any model) but only patches parameters, by writing a patched copy over them.
:class:`LensModelPatcher` therefore hands each quantised layer the patch list of its weight when
the model is loaded and takes it back when the model is unpatched; the layer applies the patches
to the decoded weight at each call with ComfyUI's own ``comfy.lora.calculate_weight``, so every
patch ComfyUI's loaders make (LoRA in any naming ComfyUI maps, LoKr, LoHa, diff, offsets into
fused q/k/v) works without a dense copy of the model. Float tensors of the file (F32/F16/BF16, e.g. the modulation layers
ComfyUI's mxfp8 files keep in bf16) are ordinary parameters that ComfyUI patches as usual.

LensModelPatcher also suits every other model ``lens_core``/``quant`` load rather than ComfyUI (the
text encoders, whatever their format): it counts their memory from the tensors themselves.
"""

from __future__ import annotations

import itertools
import logging

import comfy.lora
import comfy.model_patcher
import torch

from quant.layers import GGMLLinear, GGMLOps

log = logging.getLogger("ComfyUI-Lens")


class ComfyGGMLLinear(GGMLLinear):
    """A GGML linear that also applies ComfyUI weight patches (set by LensModelPatcher)."""

    comfy_patches: tuple[str, list] | None = None  # (state-dict key, ComfyUI patch list)

    def weight_for(self, dtype: torch.dtype, device: torch.device | str, reuse: bool = False) -> torch.Tensor:
        if self.comfy_patches is None:
            return super().weight_for(dtype, device, reuse)
        key, patches = self.comfy_patches
        # calculate_weight writes into the weight: give it a private fp32 copy, never a cached or shared one.
        weight = super().weight_for(torch.float32, device, reuse=True).to(torch.float32, copy=True)
        return comfy.lora.calculate_weight(patches, weight, key, intermediate_dtype=torch.float32).to(dtype)


class ComfyGGMLOps(GGMLOps):
    """quant's GGML layer factory with patch-aware linears."""

    Linear = ComfyGGMLLinear


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes held by all parameters and buffers, quantised expert banks included (ComfyUI's own
    count reads the state dict, which leaves out non-persistent buffers)."""
    return sum(t.nbytes for t in itertools.chain(module.parameters(), module.buffers()))


class LensModelPatcher(comfy.model_patcher.ModelPatcher):
    """ModelPatcher for models that lens_core/quant built and filled: weight patches of quantised
    layers (ComfyGGMLOps) are applied by the layers at each call instead of being merged into their
    weights; the size is that of all parameters and buffers."""

    def __init__(self, model: torch.nn.Module, load_device, offload_device, size: int = 0, **kwargs):
        super().__init__(model, load_device, offload_device, size or module_bytes(model), **kwargs)

    def load(self, *args, **kwargs):
        result = super().load(*args, **kwargs)
        self._hand_patches(self.patches)
        return result

    def model_mmap_residency(self, free=False):
        """(touched mmap bytes, model bytes) for ComfyUI versions that track the pages of the
        files they map themselves (0.22); lens_core's and quant's maps are not among them."""
        return 0, self.model_size()

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        if unpatch_weights:
            self._hand_patches({})
        return super().unpatch_model(device_to, unpatch_weights)

    def _hand_patches(self, patches: dict) -> None:
        taken = set()
        for name, m in self.model.named_modules():
            if isinstance(m, ComfyGGMLLinear) and m.is_quantized:
                key = f"{name}.weight"
                m.comfy_patches = (key, patches[key]) if key in patches else None
                taken.add(key)
        left = [k for k in patches if k.endswith(".weight") and k not in taken and _is_quantized_weight(self.model, k)]
        if left:
            log.warning("packed model: %d patch(es) on quantised weights that only linear layers can take "
                        "were skipped, e.g. %s", len(left), left[:3])


def _is_quantized_weight(model: torch.nn.Module, key: str) -> bool:
    module = model.get_submodule(key.rsplit(".", 1)[0])
    return getattr(module, "is_quantized", False)
