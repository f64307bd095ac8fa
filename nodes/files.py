"""Model names in ComfyUI's model folders, resolved only through ``folder_paths``.

Node inputs never become paths by joining strings: files go through
``folder_paths.get_full_path_or_raise`` (which also normalises ``..`` away), folders through the
``config.json`` inside them. Folders (Hugging Face / diffusers layouts such as ``gpt-oss-20b/``)
are listed with a trailing ``/``; the shard files inside them are not listed separately.

ComfyUI lists only the extensions it knows, and every model folder shares one extension set, so
``.gguf`` files are listed through extra folder names (:data:`GGUF_FOLDERS`) that share the path
lists of ``diffusion_models`` (``unet``) and ``text_encoders`` (``clip``) with a set of their own:
other nodes never see the GGUF files, and paths added to those folders later are seen here too.

The Lens loaders also offer the model that ships in the package, Lens-Toy (:data:`BUILTIN`), first
and as their default, so a workflow runs with nothing downloaded. Its name maps to a fixed component
folder inside ``lens_core/default_model`` (:data:`BUILTIN_COMPONENTS`); it is never joined with the
name, and no file name can take it (listed files end in an extension, folders in ``/``).
"""

from __future__ import annotations

import posixpath
from pathlib import Path

import folder_paths

from lens_core.pipeline import DEFAULT_MODEL_DIR

FOLDER_MARKER = "config.json"
WEIGHT_EXTENSIONS = (".safetensors", ".sft")
GGUF_FOLDERS = {"diffusion_models": "lens_gguf_diffusion_models", "text_encoders": "lens_gguf_text_encoders"}
BUILTIN = "lens-toy (built-in)"
# ComfyUI model folder -> the Lens-Toy component its loader reads (a diffusers component folder).
BUILTIN_COMPONENTS = {folder: DEFAULT_MODEL_DIR / component for folder, component in
                      (("diffusion_models", "transformer"), ("text_encoders", "text_encoder"), ("vae", "vae"))}


def register_gguf_folders() -> None:
    """Make :data:`GGUF_FOLDERS` known to ``folder_paths`` (once; run when the extension loads)."""
    for folder, gguf_folder in GGUF_FOLDERS.items():
        if gguf_folder not in folder_paths.folder_names_and_paths:
            paths = folder_paths.folder_names_and_paths[folder][0]  # the same list object, not a copy
            folder_paths.folder_names_and_paths[gguf_folder] = (paths, {".gguf"})


def _folder_of(name: str) -> str:
    return posixpath.dirname(name.replace("\\", "/"))


def model_choices(folder: str, folders: bool = False, gguf: bool = False) -> list[str]:
    """:data:`BUILTIN` first where ``folder`` has a built-in component, then the safetensors file
    names in the ComfyUI model folder ``folder``, with ``gguf`` also its GGUF files; with
    ``folders``, also ``name/`` entries for sub-folders holding a ``config.json`` and weights (their
    files are then hidden)."""
    builtin = [BUILTIN] if folder in BUILTIN_COMPONENTS else []
    return builtin + _listed(folder, folders, gguf)


def _listed(folder: str, folders: bool, gguf: bool) -> list[str]:
    """The names ``folder_paths`` knows in ``folder``, as :func:`model_choices` describes them."""
    files = [f for f in folder_paths.get_filename_list(folder) if f.lower().endswith(WEIGHT_EXTENSIONS)]
    if gguf:
        files = sorted(files + folder_paths.get_filename_list(GGUF_FOLDERS[folder]))
    if not folders:
        return files
    candidates = sorted({_folder_of(f) for f in files} - {""})
    model_folders = [d for d in candidates if folder_paths.get_full_path(folder, f"{d}/{FOLDER_MARKER}") is not None]
    inside = tuple(d + "/" for d in model_folders)
    return [d + "/" for d in model_folders] + [f for f in files if not f.replace("\\", "/").startswith(inside)]


def resolve(folder: str, name: str) -> Path:
    """The path of ``name`` (a listed file, or a listed ``folder/``) inside ComfyUI's ``folder``, or
    the built-in component for :data:`BUILTIN`."""
    if name == BUILTIN and folder in BUILTIN_COMPONENTS:
        return BUILTIN_COMPONENTS[folder]
    if name.endswith("/"):
        marker = folder_paths.get_full_path_or_raise(folder, f"{name}{FOLDER_MARKER}")
        return Path(marker).parent
    return Path(folder_paths.get_full_path_or_raise(folder, name))
