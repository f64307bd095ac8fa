"""GGUF reading and ggml dequantisation in torch: the base of Lens' quantised models.

``GGUFFile`` opens a file lazily (memory map, lazy tokenizer arrays); ``dequantize`` turns ggml
blocks into fp32/fp16/bf16 on CPU or CUDA, bit-exact with ``gguf.quants.dequantize``.
"""

from .dequant import BLOCK_INFO, dequantize
from .ggml_types import QK_K, TYPE_SIZES, GGMLType
from .gguf_metadata import GGUFValueType, LazyStringArray
from .gguf_reader import GGUFError, GGUFFile, GGUFTensorInfo

__all__ = [
    "BLOCK_INFO",
    "QK_K",
    "TYPE_SIZES",
    "GGMLType",
    "GGUFError",
    "GGUFFile",
    "GGUFTensorInfo",
    "GGUFValueType",
    "LazyStringArray",
    "dequantize",
]
