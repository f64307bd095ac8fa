"""The Lens-Toy recipe: its training settings, and an end-to-end run at a tiny scale (slow: about a minute)."""

from __future__ import annotations

import inspect
import json

import pytest
from PIL import Image

from lens_core.image_io import read_settings
from lens_core.pipeline import LensPipeline
from training.config import config_from_dict
from training.lens_toy import AREA, evaluate_model, main, train_config
from training.objective import TimestepConfig


def test_recipe_shift_option_trains_at_the_mu_of_its_eval_sampler(tmp_path):
    # Lens-Toy's 128^2 images are 64 MMDiT tokens; its ToyEval samples 20 steps. ``shift="sampler"``
    # must put the training timesteps where that sampler puts its steps (mu 1.83); the default, which
    # made the shipped model, is the paper's interpolation (mu 0.47).
    tokens = (AREA // 16) ** 2

    def mu(**kw) -> float:
        cfg = train_config(tmp_path / "init", tmp_path / "data", tmp_path / "run", 10, 4, 1e-3, 2, **kw)
        return config_from_dict(cfg).timesteps.build().mu_for(tokens)

    eval_steps = inspect.signature(evaluate_model).parameters["steps"].default
    assert mu(shift="sampler") == TimestepConfig(shift="sampler", sampler_steps=eval_steps).mu_for(tokens)
    assert mu(shift="sampler") == pytest.approx(1.83, abs=0.01)
    assert mu() == TimestepConfig().mu_for(tokens) == pytest.approx(0.47, abs=0.01)


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
