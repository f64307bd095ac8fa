"""Model names in ComfyUI's model folders, resolved only through ``folder_paths``.

Node inputs never become paths by joining strings: files go through
``folder_paths.get_full_path_or_raise`` (which also normalises ``..`` away), folders through the
``config.json`` inside them. Folders (Hugging Face / diffusers layouts such as ``gpt-oss-20b/``)
are listed with a trailing ``/``; the shard files inside them are not listed separately.
"""

from __future__ import annotations

import posixpath
from pathlib import Path

import folder_paths

FOLDER_MARKER = "config.json"


def _folder_of(name: str) -> str:
    return posixpath.dirname(name.replace("\\", "/"))


def model_choices(folder: str, folders: bool = False) -> list[str]:
    """File names in the ComfyUI model folder ``folder``; with ``folders``, also ``name/`` entries
    for sub-folders holding a ``config.json`` and safetensors (their files are then hidden)."""
    files = [f for f in folder_paths.get_filename_list(folder) if f.lower().endswith((".safetensors", ".sft"))]
    if not folders:
        return files
    candidates = sorted({_folder_of(f) for f in files} - {""})
    model_folders = [d for d in candidates if folder_paths.get_full_path(folder, f"{d}/{FOLDER_MARKER}") is not None]
    inside = tuple(d + "/" for d in model_folders)
    return [d + "/" for d in model_folders] + [f for f in files if not f.replace("\\", "/").startswith(inside)]


def resolve(folder: str, name: str) -> Path:
    """The path of ``name`` (a listed file, or a listed ``folder/``) inside ComfyUI's ``folder``."""
    if name.endswith("/"):
        marker = folder_paths.get_full_path_or_raise(folder, f"{name}{FOLDER_MARKER}")
        return Path(marker).parent
    return Path(folder_paths.get_full_path_or_raise(folder, name))
