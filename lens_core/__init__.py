"""lens_core: Microsoft Lens text-to-image in plain PyTorch, with no ComfyUI import.

Entry points: :class:`lens_core.pipeline.LensPipeline` (Python API) and ``lens generate`` (CLI).
"""

__version__ = "0.1.0"
