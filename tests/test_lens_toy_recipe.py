"""The Lens-Toy recipe runs end to end at a tiny scale (slow: about a minute)."""

from __future__ import annotations

import json

import pytest

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
