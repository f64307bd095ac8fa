"""Tiny datasets and configs for the tests and the CPU benchmark (no downloads, seconds to run).

Images are seeded random colour blocks (a few flat rectangles, so the VAE latents have
structure), written with Pillow in several aspect ratios; captions name the colours. Broken
files for the robustness tests are made here too: a truncated JPEG and a text file named
``.png``.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .config import TrainConfig, config_from_dict

TINY_SIZES: tuple[tuple[int, int], ...] = ((32, 32), (48, 24), (24, 48), (40, 32), (64, 64), (64, 32))
"""(width, height) of the tiny test images: square, 2:1, 1:2 and in-between, two areas."""

TINY_BUCKETS: dict[str, Any] = {
    "areas": [32, 48],
    "batch_sizes": [2, 2],
    "aspect_ratios": ["1:2", "1:1", "2:1"],
}
"""Bucket settings matching :data:`TINY_SIZES`: 6 buckets of at most 4x4 latent tokens."""

_COLOURS = {"red": (220, 30, 30), "green": (40, 170, 60), "blue": (20, 100, 240), "yellow": (245, 220, 30)}


def tiny_image(rng: np.random.Generator, width: int, height: int) -> tuple[Image.Image, str]:
    """A background plus one rectangle, and a caption naming both colours."""
    names = list(_COLOURS)
    bg, fg = rng.choice(len(names), 2, replace=False)
    a = np.empty((height, width, 3), dtype=np.uint8)
    a[:] = _COLOURS[names[bg]]
    x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
    a[y0 : y0 + height // 2, x0 : x0 + width // 2] = _COLOURS[names[fg]]
    return Image.fromarray(a), f"a {names[fg]} rectangle on a {names[bg]} background"


def write_tiny_folder(
    folder: str | Path, n: int = 12, sizes: Sequence[tuple[int, int]] = TINY_SIZES, seed: int = 0
) -> Path:
    """``n`` images ``img000.png``... with same-name ``.txt`` captions."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        image, caption = tiny_image(rng, w, h)
        image.save(folder / f"img{i:03d}.png")
        (folder / f"img{i:03d}.txt").write_text(caption)
    return folder


def write_broken_images(folder: str | Path) -> list[Path]:
    """A truncated JPEG and a text file named ``.png``, each with a caption."""
    folder = Path(folder)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    data = buf.getvalue()
    bad_jpeg = folder / "broken_truncated.jpg"
    bad_jpeg.write_bytes(data[: len(data) // 2])
    fake_png = folder / "broken_text.png"
    fake_png.write_text("this is not an image")
    for p in (bad_jpeg, fake_png):
        p.with_suffix(".txt").write_text("a broken image")
    return [bad_jpeg, fake_png]


def write_manifest(folder: str | Path, path: str | Path, fmt: str = "jsonl") -> Path:
    """A JSONL or CSV manifest of a :func:`write_tiny_folder` folder (paths relative to the manifest)."""
    folder, path = Path(folder), Path(path)
    rows = [
        {
            "image": str(p.relative_to(path.parent)) if p.is_relative_to(path.parent) else str(p),
            "caption": p.with_suffix(".txt").read_text(),
        }
        for p in sorted(folder.glob("*.png"))
    ]
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        lines = ["image,caption"] + [f'{r["image"]},"{r["caption"]}"' for r in rows]
        path.write_text("\n".join(lines) + "\n")
    return path


def write_tar_shards(folder: str | Path, out: str | Path, per_shard: int = 4) -> list[Path]:
    """Pack a caption folder into WebDataset shards ``shard-000.tar``... (``key.png`` + ``key.txt``)."""
    folder, out = Path(folder), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    shards = []
    for s in range(0, len(images), per_shard):
        path = out / f"shard-{s // per_shard:03d}.tar"
        with tarfile.open(path, "w") as tar:
            for img in images[s : s + per_shard]:
                for member in (img, img.with_suffix(".txt")):
                    info = tarfile.TarInfo(f"{img.stem}{member.suffix}")
                    data = member.read_bytes()
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append(path)
    return shards


def tiny_config(
    pipeline: str | Path, data_dir: str | Path, output_dir: str | Path, /, **sections: dict
) -> TrainConfig:
    """A fast CPU config for the tiny random pipeline; ``sections`` override whole-section keys."""
    base: dict[str, dict[str, Any]] = {
        "model": {"path": str(pipeline)},
        "data": {"kind": "folder", "path": str(data_dir), "num_workers": 0},
        "buckets": dict(TINY_BUCKETS),
        "train": {
            "output_dir": str(output_dir),
            "max_steps": 4,
            "checkpoint_every": 0,
            "warmup_steps": 0,
            "learning_rate": 1e-3,
            "progress": False,
            "device": "cpu",
            "gradient_checkpointing": False,
        },
        "lora": {"rank": 4, "save_dtype": "float32"},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return config_from_dict(base)
