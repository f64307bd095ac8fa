"""Image conversion and atomic PNG output with the generation settings embedded."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from PIL import Image, PngImagePlugin

METADATA_KEY = "lens"


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """``[B, 3, H, W]`` in [-1, 1] -> PIL RGB images (rounded, not truncated, to uint8)."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy(), "RGB") for a in x]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_png(image: Image.Image, path: str | os.PathLike, settings: Mapping[str, Any]) -> Path:
    """Write ``image`` as PNG with ``settings`` in text chunks, atomically.

    The file appears complete or not at all: it is written to a temporary file in the same
    folder and renamed. ``settings`` goes in as JSON under ``lens`` and the prompt also as a
    plain ``prompt`` chunk so image viewers show it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    info.add_itxt(METADATA_KEY, json.dumps(dict(settings), ensure_ascii=False, sort_keys=True))
    if "prompt" in settings:
        info.add_itxt("prompt", str(settings["prompt"]))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_settings(path: str | os.PathLike) -> dict[str, Any]:
    """The settings :func:`save_png` embedded in a PNG."""
    with Image.open(path) as im:
        return json.loads(im.text[METADATA_KEY])
