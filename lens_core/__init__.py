"""lens_core: Microsoft Lens text-to-image in plain PyTorch, with no ComfyUI import."""
