"""Moved to :mod:`lens_core.lora` (inference needs it without ``training``); this re-export keeps
``from training.lora_format import apply_lora`` and friends working."""

from lens_core.lora import *  # noqa: F403
from lens_core.lora import __all__  # noqa: F401
