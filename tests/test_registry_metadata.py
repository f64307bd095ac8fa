"""The ComfyUI registry metadata in ``pyproject.toml`` and the zip ``comfy node pack`` builds.

The registry (``comfy node publish``) reads ``[tool.comfy]``: a publisher id, a display name, an icon
URL, the ComfyUI versions supported and the model files the workflows need. The checks that need
comfy-cli run its own ``comfy node validate`` and ``comfy node pack`` (comfy-cli pins its own
dependencies, so it usually lives in a separate venv: ``$COMFY_CLI`` names its ``comfy``
executable, else ``comfy`` on PATH); without it they skip loudly.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
from PIL import Image

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
COMFY = PYPROJECT["tool"]["comfy"]
# ComfyUI's model folders a [tool.comfy].Models location may start with.
MODEL_FOLDERS = {"diffusion_models", "unet", "text_encoders", "clip", "vae", "loras", "checkpoints"}


def test_publisher_and_display_name():
    # Registry ids are lower-case letters, digits and hyphens, starting with a letter.
    assert re.fullmatch(r"[a-z][a-z0-9-]{2,}", COMFY["PublisherId"]), COMFY["PublisherId"]
    assert COMFY["DisplayName"].strip()
    assert re.fullmatch(r">=\d+\.\d+\.\d+", COMFY["requires-comfyui"])


def test_icon_is_a_committed_square_image_served_from_the_repository():
    repo_url = PYPROJECT["project"]["urls"]["Repository"]
    owner_name = repo_url.removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{owner_name}/main/"
    assert COMFY["Icon"].startswith(prefix), (COMFY["Icon"], prefix)
    icon = REPO / COMFY["Icon"].removeprefix(prefix)
    assert icon.is_file(), f"[tool.comfy].Icon points at {icon}, which is not in the repository"
    with Image.open(icon) as im:
        assert im.width == im.height <= 400, im.size  # the registry shows icons square, at most 400 px


def test_models_name_public_files_in_comfyui_folders():
    for model in COMFY["Models"]:
        folder, _, name = model["location"].partition("/")
        assert folder in MODEL_FOLDERS and name, model
        assert model["model_url"].startswith("https://huggingface.co/") and model["model_url"].endswith(name), model


@pytest.fixture(scope="module")
def comfy_cli() -> str:
    exe = os.environ.get("COMFY_CLI") or shutil.which("comfy")
    if not exe:
        reason = "comfy-cli not found (pip install comfy-cli in its own venv, then set COMFY_CLI=/path/to/comfy)"
        warnings.warn(f"registry tests SKIPPED: {reason}", stacklevel=2)
        pytest.skip(f"registry tests SKIPPED: {reason}")
    return exe


def _comfy(exe: str, *args: str, cwd: Path) -> str:
    proc = subprocess.run([exe, "--skip-prompt", "--no-enable-telemetry", "node", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    return out


@pytest.fixture(scope="module")
def checkout(comfy_cli, tmp_path_factory) -> Path:
    """A clone of the repository plus the working copy's changes and new files, all git-tracked
    (`pack` zips only tracked files)."""
    if not (REPO / ".git").exists():
        pytest.skip("registry tests SKIPPED: not a git checkout (comfy node pack zips git-tracked files)")
    dest = tmp_path_factory.mktemp("pack") / "ComfyUI-Lens"
    subprocess.run(["git", "clone", "-q", str(REPO), str(dest)], check=True)
    changed = subprocess.run(["git", "ls-files", "-m", "-o", "--exclude-standard"], cwd=REPO, check=True,
                             capture_output=True, text=True).stdout.split()
    for rel in changed:
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    return dest


def test_comfy_node_validate_passes(comfy_cli, checkout):
    out = _comfy(comfy_cli, "validate", cwd=checkout)
    assert "passed" in out, out


def test_comfy_node_pack_ships_the_extension_and_not_the_test_suite(comfy_cli, checkout):
    _comfy(comfy_cli, "pack", cwd=checkout)
    with zipfile.ZipFile(checkout / "node.zip") as z:
        names = set(z.namelist())
    for needed in ("__init__.py", "pyproject.toml", "nodes/__init__.py", "lens_core/pipeline.py",
                   "lens_core/default_model/transformer/diffusion_pytorch_model.safetensors",
                   "example_workflows/lens_toy_t2i.json", "web/lens_reasoner.js"):
        assert needed in names, f"{needed} missing from the packed zip"
    assert not any(n.startswith(("tests/", ".ci/", "benchmarks/")) for n in names)
