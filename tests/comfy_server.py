"""Test helper: a real ComfyUI server with this repository linked in as a custom node.

Where ComfyUI lives: ``$COMFYUI_PATH`` (one folder, or several separated by ``os.pathsep`` to test
several versions), else ``~/ComfyUI`` and ``~/ComfyUI-*`` that hold a ``main.py``. The Python
that runs it: ``$COMFYUI_PYTHON``, else the checkout's own ``<ComfyUI>/venv`` or ``<ComfyUI>/.venv``
(so each version gets the frontend it pins), else ``~/comfy-venv/bin/python``, else this
interpreter; it needs ComfyUI's requirements and lens_core's dependencies. Nothing is installed or built here.

The server runs with ``--cpu`` on a free local port and a temporary ``--base-directory`` whose
``custom_nodes/ComfyUI-Lens`` is a symlink to this repository and whose ``models/`` the tests fill.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXTENSION_NAME = "ComfyUI-Lens"


def comfyui_installs() -> list[Path]:
    """ComfyUI checkouts to test against (may be empty)."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        candidates = [Path(p).expanduser() for p in env.split(os.pathsep) if p]
    else:
        home = Path.home()
        candidates = [home / "ComfyUI", *sorted(home.glob("ComfyUI-*"))]
    return [p.resolve() for p in candidates if (p / "main.py").is_file() and (p / "comfy").is_dir()]


# Multiplies the wall-clock limits below, for a machine busy with other work (e.g. a training run).
TIMEOUT_SCALE = float(os.environ.get("LENS_TEST_TIMEOUT_SCALE", "1"))


def comfyui_python(comfy_root: Path) -> str:
    env = os.environ.get("COMFYUI_PYTHON")
    if env:
        return env
    for candidate in (comfy_root / "venv", comfy_root / ".venv", Path.home() / "comfy-venv"):
        python = candidate / "bin" / "python"
        if python.is_file():
            return str(python)
    return sys.executable


def missing_requirements(python: str) -> str | None:
    """None if ``python`` can import what ComfyUI and lens_core need, else the error."""
    probe = "import aiohttp, torch, safetensors, yaml, quicktok, tokenizers"
    result = subprocess.run([python, "-c", probe], capture_output=True, text=True,
                            timeout=120 * TIMEOUT_SCALE)
    return None if result.returncode == 0 else (result.stderr.strip().splitlines() or ["?"])[-1]


def comfyui_version(comfy_root: Path) -> str:
    text = (comfy_root / "comfyui_version.py").read_text() if (comfy_root / "comfyui_version.py").exists() else ""
    for line in text.splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    return "unknown"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """Start with ``start()``, stop with ``stop()`` (or use as a context manager)."""

    def __init__(self, comfy_root: Path, base_dir: Path, python: str | None = None,
                 extra_args: Sequence[str] = ()) -> None:
        self.comfy_root = Path(comfy_root)
        self.extra_args = list(extra_args)  # more ComfyUI command-line flags, e.g. ["--fast", "fp8_matrix_mult"]
        self.base = Path(base_dir)
        self.python = python or comfyui_python(self.comfy_root)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base / "server.log"
        self.proc: subprocess.Popen | None = None
        for sub in ("models/diffusion_models", "models/text_encoders", "models/vae", "custom_nodes",
                    "input", "output", "temp", "user"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / EXTENSION_NAME
        if not link.exists():
            link.symlink_to(REPO, target_is_directory=True)

    @property
    def models(self) -> Path:
        return self.base / "models"

    @property
    def output(self) -> Path:
        return self.base / "output"

    def start(self, timeout: float = 240.0) -> ComfyServer:
        cmd = [
            self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--base-directory", str(self.base), "--disable-auto-launch", "--preview-method", "none",
            "--database-url", "sqlite:///:memory:", *self.extra_args,
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=self.comfy_root, stdout=log, stderr=subprocess.STDOUT, env=env)
        timeout *= TIMEOUT_SCALE
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=20)

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    # -- HTTP -----------------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path: str, payload: dict, timeout: float = 30) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, body = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, body = e.code, e.read()
        try:
            return status, json.loads(body or b"{}")
        except ValueError:
            return status, {"text": body.decode(errors="replace")}

    def queue(self, prompt: dict) -> str:
        """POST /prompt; the prompt id, or AssertionError with ComfyUI's validation errors."""
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": "lens-tests"})
        assert status == 200, f"prompt rejected ({status}): {json.dumps(body, indent=1)[:3000]}"
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600.0) -> dict:
        """The /history entry of ``prompt_id`` once it has finished (successfully or not)."""
        timeout *= TIMEOUT_SCALE
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and (
                entry["status"].get("status_str") in ("success", "error")
            ):
                return entry
            if not self.alive():
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout:.0f}s:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 600.0) -> dict:
        return self.wait(self.queue(prompt), timeout)

    def images(self, entry: dict) -> list[Path]:
        """Saved image files of a finished /history entry."""
        out = []
        for node_out in entry.get("outputs", {}).values():
            for img in node_out.get("images", []):
                if img.get("type") == "output":
                    out.append(self.output / img.get("subfolder", "") / img["filename"])
        return out


def copy_model(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)
    return dst


# -- tiny random-weight models in the real layouts -------------------------------------------------

TINY_NAMES = {
    "lens": "lens_tiny.safetensors",  # MMDiT with the ComfyUI "model.diffusion_model." prefix
    "lens_turbo": "lens_turbo_tiny.safetensors",  # MMDiT, bare names, other weights
    "text_encoder_folder": "gpt-oss-tiny/",  # HF folder: config.json, model.safetensors, tokenizer.json
    "text_encoder_file": "gpt_oss_tiny.safetensors",  # single file, config from the shapes
    "vae": "flux2-vae-tiny.safetensors",  # BFL names, config in the safetensors metadata
    "vae_folder": "flux2-vae-tiny-diffusers/",  # the same weights as a diffusers vae/ folder
}


def _diffusers_vae_to_bfl(sd: dict, n_blocks: int) -> dict:
    """diffusers AutoencoderKLFlux2 names -> Black Forest Labs / ComfyUI names (flux2-vae.safetensors)."""
    import re

    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, t in sd.items():
        k = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        if m := re.fullmatch(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)", k):
            side, stage, i, kind, j, rest = m.groups()
            i = int(i) if stage == "down" else n_blocks - 1 - int(i)
            k = f"{side}.{stage}.{i}.block.{j}.{rest}" if kind == "resnets" else f"{side}.{stage}.{i}.{stage}sample.{rest}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", k):
            k = f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{m.group(3)}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", k):
            k = f"{m.group(1)}.mid.attn_1.{attn[m.group(2)]}.{m.group(3)}"
            if t.ndim == 2:
                t = t[:, :, None, None]
        out[k] = t
    return out


def write_tiny_models(models: Path, scratch: Path) -> dict[str, Path]:
    """Tiny Lens files laid out as users have them, in ComfyUI's model folders.

    The encoder has 24 layers so the MMDiT reads the released layers 5, 11, 17, 23.
    Returns name -> path for each entry of TINY_NAMES.
    """
    import dataclasses

    import torch
    from safetensors.torch import load_file

    from lens_core.mmdit import LensMMDiT
    from lens_core.random_weights import randomize_, tiny_configs, write_random_pipeline
    from lens_core.safetensors_io import save_file_atomic

    mmdit_cfg, enc_cfg, vae_cfg = tiny_configs()
    mmdit_cfg = dataclasses.replace(mmdit_cfg, selected_layer_index=(5, 11, 17, 23))
    enc_cfg = dataclasses.replace(enc_cfg, num_hidden_layers=24, layer_types=None)
    root = write_random_pipeline(scratch / "tiny-pipeline", (mmdit_cfg, enc_cfg, vae_cfg), seed=0, dtype=torch.float32)

    paths = {k: models / sub / TINY_NAMES[k] for k, sub in [
        ("lens", "diffusion_models"), ("lens_turbo", "diffusion_models"), ("text_encoder_folder", "text_encoders"),
        ("text_encoder_file", "text_encoders"), ("vae", "vae"), ("vae_folder", "vae")]}
    mmdit = load_file(root / "transformer" / "diffusion_pytorch_model.safetensors")
    save_file_atomic({"model.diffusion_model." + k: v for k, v in mmdit.items()}, paths["lens"])
    turbo = randomize_(LensMMDiT(mmdit_cfg), seed=7).state_dict()
    save_file_atomic(turbo, paths["lens_turbo"])

    folder = paths["text_encoder_folder"]
    shutil.copytree(root / "text_encoder", folder)
    shutil.copy2(root / "tokenizer" / "tokenizer.json", folder / "tokenizer.json")
    shutil.copy2(root / "text_encoder" / "model.safetensors", paths["text_encoder_file"])

    vae = load_file(root / "vae" / "diffusion_pytorch_model.safetensors")
    config = (root / "vae" / "config.json").read_text()
    save_file_atomic(_diffusers_vae_to_bfl(vae, len(vae_cfg.block_out_channels)), paths["vae"], {"config": config})
    shutil.copytree(root / "vae", paths["vae_folder"])
    return paths
