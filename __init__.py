"""ComfyUI-Lens as a ComfyUI custom node package (clone or link this folder into custom_nodes/).

ComfyUI calls ``comfy_entrypoint``; everything ComfyUI-specific is imported inside it, so importing
this package elsewhere (tests, tools) needs no ComfyUI.
"""

import importlib.util
import os
import sys

WEB_DIRECTORY = "./web"  # frontend extension: the Lens Reasoner shows its refined prompt in the node


def _make_lens_core_importable() -> None:
    """Use the installed lens_core, else the one in this folder (a plain clone into custom_nodes).

    The folder goes at the end of sys.path so that it can never shadow ComfyUI's own modules.
    """
    if importlib.util.find_spec("lens_core") is None:
        here = os.path.dirname(os.path.abspath(__file__))
        if here not in sys.path:
            sys.path.append(here)


async def comfy_entrypoint():
    _make_lens_core_importable()
    from .nodes.comfy_nodes import LensExtension

    return LensExtension()
