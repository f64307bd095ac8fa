"""TOML training config: defaults, relative paths, validation, command-line overrides."""

from __future__ import annotations

import pytest

from training.cli import _override
from training.config import load_config


def test_load_config_resolves_paths_and_keeps_defaults(tmp_path):
    (tmp_path / "run.toml").write_text(
        """
[model]
path = "models/lens"
[data]
kind = "tar"
shards = ["shards/a-{000..003}.tar", "/abs/b.tar"]
[train]
output_dir = "out"
learning_rate = 3e-5
max_steps = 10
[timesteps]
shift_points = [[256, 0.4], [4096, 1.2]]
"""
    )
    cfg = load_config(tmp_path / "run.toml")
    assert cfg.model.component("vae") == str(tmp_path / "models" / "lens")
    assert cfg.data.shards == [str(tmp_path / "shards/a-{000..003}.tar"), "/abs/b.tar"]
    assert cfg.train.output_dir == str(tmp_path / "out") and cfg.train.learning_rate == 3e-5
    assert cfg.train.grad_clip == 1.0 and cfg.train.mode == "lora" and cfg.buckets.stage == "mixed"
    ts = cfg.timesteps.build()
    assert ts.mu_for(256) == pytest.approx(0.4) and ts.mu_for(4096) == pytest.approx(1.2)


@pytest.mark.parametrize(
    "text, message",
    [
        ("[train]\nlearning_rte = 1e-4\n", "unknown option"),
        ("[trian]\nmax_steps = 1\n", "unknown option"),
        ("[train]\nmax_steps = 'many'\n", "must be int"),
        ("[train]\nmode = 'dora'\n", "mode must be"),
        ("[buckets]\naspect_ratios = ['5:4']\n", "not one of"),
        ("[train\n", "invalid TOML"),
    ],
)
def test_bad_configs_name_the_problem(tmp_path, text, message):
    (tmp_path / "bad.toml").write_text(text)
    with pytest.raises(ValueError, match=message):
        load_config(tmp_path / "bad.toml")


def test_model_path_required(tmp_path):
    (tmp_path / "run.toml").write_text("[train]\nmax_steps = 1\n")
    with pytest.raises(ValueError, match="needs 'path'"):
        load_config(tmp_path / "run.toml").model.component("transformer")


def test_command_line_override(tmp_path):
    (tmp_path / "run.toml").write_text("[model]\npath = '/m'\n")
    cfg = load_config(tmp_path / "run.toml")
    _override(cfg, "train.learning_rate=2e-5")
    _override(cfg, 'sample.prompts=["a cat", "a dog"]')
    assert cfg.train.learning_rate == 2e-5 and cfg.sample.prompts == ["a cat", "a dog"]
    with pytest.raises(SystemExit, match="unknown option"):
        _override(cfg, "train.nope=1")
