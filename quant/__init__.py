"""GGUF reading and ggml dequantisation in torch: the base of Lens' quantised models.

``GGUFFile`` opens a file lazily (memory map, lazy tokenizer arrays); ``dequantize`` turns ggml
blocks into fp32/fp16/bf16 on CPU or CUDA, bit-exact with ``gguf.quants.dequantize``.

On top of it: ``GGMLOps`` (quantised Linear/Embedding layers for any lens_core model; they also
hold the fp8 / MXFP8 / NVFP4 weights of ComfyUI's safetensors files, ``fp_formats`` and
``comfy_quant``, which ``lens_core.loading`` uses for such files),
``quantize`` (torch quantisers incl. the K-quants), ``load_mmdit_gguf`` / ``load_gpt_oss_gguf`` /
``load_gguf_tokenizer`` (models from GGUF files) and ``convert_mmdit`` (``lens-quantize``).  The
model loaders and the converter import lens_core models, so they are loaded on first use.
"""

from .dequant import BLOCK_INFO, dequantize
from .ggml_types import QK_K, TYPE_SIZES, GGMLType
from .gguf_metadata import GGUFValueType, LazyStringArray
from .gguf_reader import GGUFError, GGUFFile, GGUFTensorInfo
from .layers import (
    GGMLEmbedding,
    GGMLLinear,
    GGMLOps,
    LoraPatch,
    PackedWeight,
    QuantizedWeight,
    apply_lora_file,
    apply_lora_patches,
)
from .quantize import quantize, quantize_with_values

_LAZY = {
    "load_mmdit_gguf": "gguf_models",
    "load_mmdit_gguf_config": "gguf_models",
    "load_gpt_oss_gguf": "gguf_models",
    "is_gguf": "gguf_models",
    "GGUFExperts": "gguf_models",
    "load_gguf_tokenizer": "gpt_oss_gguf",
    "write_gpt_oss_gguf": "gpt_oss_gguf",
    "convert_mmdit": "convert",
    "convert_mmdit_comfy": "comfy_quant",
    "write_gpt_oss_comfy": "comfy_quant",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'quant' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{module}", __name__), name)


__all__ = [
    "BLOCK_INFO",
    "QK_K",
    "TYPE_SIZES",
    "GGMLEmbedding",
    "GGMLLinear",
    "GGMLOps",
    "GGMLType",
    "GGUFError",
    "GGUFExperts",
    "GGUFFile",
    "GGUFTensorInfo",
    "GGUFValueType",
    "LazyStringArray",
    "LoraPatch",
    "PackedWeight",
    "QuantizedWeight",
    "apply_lora_file",
    "apply_lora_patches",
    "convert_mmdit",
    "convert_mmdit_comfy",
    "dequantize",
    "is_gguf",
    "load_gguf_tokenizer",
    "load_gpt_oss_gguf",
    "load_mmdit_gguf",
    "load_mmdit_gguf_config",
    "quantize",
    "quantize_with_values",
    "write_gpt_oss_comfy",
    "write_gpt_oss_gguf",
]
