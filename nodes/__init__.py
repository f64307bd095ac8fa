"""ComfyUI nodes for Lens: thin adapters from ComfyUI's types to :mod:`lens_core` calls.

``lens_bridge`` holds the ComfyUI-free conversions (conditioning layout, latent/token layout,
seeded noise) and can be imported anywhere; every other module here imports ComfyUI and is only
loaded inside a running ComfyUI (through the ``comfy_entrypoint`` of the repository's top-level
``__init__.py``).
"""
