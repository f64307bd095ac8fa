"""Crash-safe training checkpoints: written to a temp folder, then renamed into place.

A checkpoint folder ``checkpoints/step_00001000/`` holds everything needed to continue the run
bit-exactly: the trainable weights (``trainable.safetensors``), the optimizer state
(``optimizer.pt``, tensors only, loaded with ``weights_only=True``), the EMA (``ema.safetensors``),
``state.json`` (step, LR scheduler, batch sampler position, EMA update count) and one
``rank_<r>.json`` per process (its RNG states and, for streamed tar data, its stream position).

Everything is first written to ``.tmp_step_00001000/``; the folder is renamed only when all
ranks have finished, and ``state.json`` is written last. So a ``step_*`` folder with a
``state.json`` is complete by construction, and a run killed at any moment resumes from the last
complete checkpoint (stale temp folders are removed).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "state.json"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


def step_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def tmp_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f".tmp_step_{step:08d}"


def complete_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every complete checkpoint under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def find_latest(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def begin(root: str | os.PathLike, step: int) -> Path:
    """Create an empty temp folder for the checkpoint of ``step`` (main process only)."""
    tmp = tmp_dir(root, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(root: str | os.PathLike, step: int, keep: int) -> Path:
    """Rename the finished temp folder into place and prune old checkpoints (main process only)."""
    tmp, final = tmp_dir(root, step), step_dir(root, step)
    if not (tmp / STATE_FILE).is_file():
        raise RuntimeError(f"{tmp}: checkpoint incomplete (no {STATE_FILE}); not committing")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep > 0:
        for _, old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    for stale in Path(root).glob(".tmp_step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


# ---------------------------------------------------------------------------------------------
# RNG states (JSON, so loading them runs no pickle)
# ---------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states of this process."""
    np_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
