"""The Lens-Toy recipe runs end to end at a tiny scale (slow: about a minute)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from lens_core.image_io import read_settings
from lens_core.pipeline import LensPipeline
from training.lens_toy import main


@pytest.mark.slow
def test_recipe_all_stages(tmp_path):
    out = tmp_path / "toy"
    main(["all", "--out", str(out), "--vae-steps", "3", "--images", "48", "--steps", "3", "--batch", "4",
          "--eval-prompts", "6"])
    results = json.loads((out / "toyeval.json").read_text())
    assert set(results) == {"1.0", "4.0"} and all(0.0 <= r["overall"] <= 1.0 for r in results.values())
    pipe = LensPipeline.from_pretrained(out / "model", device="cpu")
    assert pipe("a photo of a red circle", steps=2, width=128, height=96, seed=0).images[0].size == (128, 96)
    main(["grid", "--grid-model", str(out / "model"), "--grid", str(tmp_path / "grid.png")])
    settings = read_settings(tmp_path / "grid.png")
    assert settings["cfg"] == 4.0 and settings["model"] == str(out / "model")
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (4 * 264 + 8, 3 * 328 + 8)
