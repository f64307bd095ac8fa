"""The per-noise-level loss report (training.diagnostics)."""

import json
import math

import pytest
import torch

from lens_core.loading import load_mmdit
from lens_core.schedule import lens_sigmas
from training.diagnostics import diagnose, format_report, level_bins, loss_profile, main, timestep_coverage
from training.objective import TimestepConfig
from training.testing import write_tiny_folder


def test_level_bins_partition_zero_to_one():
    bins = level_bins([0.5, 0.1, 1.0])
    assert bins[0][0] == 0.0 and bins[-1][1] > 1.0
    assert [b[1] for b in bins[:-1]] == [b[0] for b in bins[1:]]
    assert bins[0] == (0.0, 0.3) and bins[1] == (0.3, 0.75)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        level_bins([0.0, 0.5])


def test_coverage_counts_every_draw_and_every_sampler_step():
    levels = [0.1, 0.5, 0.9, 1.0]
    share, steps = timestep_coverage(levels, 64, TimestepConfig(), steps=20, draws=20000)
    assert math.isclose(sum(share), 1.0, abs_tol=1e-9)
    assert sum(steps) == 20
    sampler = lens_sigmas(20, 64)[:-1]
    assert steps[-1] == int((sampler >= 0.95).sum()) and steps[-1] >= 5  # Lens' mu ~1.83 at 64 tokens
    # The paper's interpolated shift (mu ~0.47 at 64 tokens) rarely trains there; a fixed mu 2 does.
    assert share[-1] < 0.01
    shifted, _ = timestep_coverage(levels, 64, TimestepConfig(shift="fixed", mu=2.0), steps=20, draws=20000)
    assert shifted[-1] > 0.1


def test_loss_profile_of_a_zero_output_model_is_the_target_energy(tiny_pipeline):
    mmdit = load_mmdit(tiny_pipeline / "transformer", dtype=torch.float32)
    grid = (2, 3)
    x0 = torch.randn(3, 6, mmdit.config.in_channels, generator=torch.Generator().manual_seed(1))
    feats = [torch.randn(3, 5, mmdit.config.enc_hidden_dim) for _ in mmdit.config.selected_layer_index]
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 3:] = False
    rows = loss_profile(mmdit, x0, grid, feats, mask, levels=(0.2, 1.0), seed=3)
    assert [r["sigma"] for r in rows] == [0.2, 1.0]
    # A random model reads its text: own, other and no caption give different losses.
    assert len({rows[0]["cond"], rows[0]["other"], rows[0]["none"]}) == 3
    # With the output layer zeroed the prediction is 0, so every loss is mean((noise - x0)^2).
    with torch.no_grad():
        mmdit.proj_out.weight.zero_()
        mmdit.proj_out.bias.zero_()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    energy = float(((noise - x0) ** 2).mean())
    for row in loss_profile(mmdit, x0, grid, feats, mask, levels=(0.2, 1.0), seed=3):
        for key in ("cond", "other", "none"):
            assert row[key] == pytest.approx(energy, rel=1e-6)


def test_same_caption_everywhere_means_no_text_gain(tiny_pipeline):
    mmdit = load_mmdit(tiny_pipeline / "transformer", dtype=torch.float32)
    x0 = torch.randn(4, 4, mmdit.config.in_channels)
    feats = [torch.randn(1, 5, mmdit.config.enc_hidden_dim).expand(4, -1, -1) for _ in mmdit.config.selected_layer_index]
    rows = loss_profile(mmdit, x0, (2, 2), feats, torch.ones(4, 5, dtype=torch.bool), levels=(0.5,))
    assert rows[0]["other"] == pytest.approx(rows[0]["cond"], rel=1e-6)


def test_diagnose_reports_a_pipeline_on_an_image_folder(tiny_pipeline, tmp_path):
    data = write_tiny_folder(tmp_path / "data", n=5, sizes=[(40, 36)])
    rows = diagnose(tiny_pipeline, data, width=32, height=32, limit=4, levels=(0.5, 1.0), steps=10, device="cpu")
    assert len(rows) == 2 and all(r["cond"] > 0 and r["none"] > 0 for r in rows)
    assert sum(r["steps"] for r in rows) == 10
    table = format_report(rows)
    assert table.splitlines()[0].split() == ["sigma", "cond", "other", "none", "gain", "train", "steps"]
    with pytest.raises(ValueError, match="multiple of 16"):
        diagnose(tiny_pipeline, data, width=40, height=32, device="cpu")


def test_cli_prints_the_table_and_writes_json(tiny_pipeline, tmp_path, capsys):
    data = write_tiny_folder(tmp_path / "data", n=3, sizes=[(32, 32)])
    out = tmp_path / "report.json"
    main(["--model", str(tiny_pipeline), "--data", str(data), "--width", "32", "--height", "32",
          "--levels", "0.3", "1.0", "--mu", "2.0", "--json", str(out), "--device", "cpu"])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("sigma") and len(printed) == 3
    rows = json.loads(out.read_text())
    assert [r["sigma"] for r in rows] == [0.3, 1.0] and rows[1]["train"] > 0.1  # mu 2 trains near sigma 1


def test_cli_shift_sampler_reports_the_training_share_of_a_sampler_shift_run(tiny_pipeline, tmp_path, capsys):
    data = write_tiny_folder(tmp_path / "data", n=3, sizes=[(32, 32)])
    reports = {}
    for shift in ("interpolate", "sampler"):
        out = tmp_path / f"{shift}.json"
        main(["--model", str(tiny_pipeline), "--data", str(data), "--width", "32", "--height", "32",
              "--levels", "0.3", "1.0", "--shift", shift, "--steps", "20", "--json", str(out), "--device", "cpu"])
        reports[shift] = json.loads(out.read_text())
    capsys.readouterr()
    want, _ = timestep_coverage([0.3, 1.0], 4, TimestepConfig(shift="sampler", sampler_steps=20), 20)
    assert [r["train"] for r in reports["sampler"]] == pytest.approx(want)
    assert reports["sampler"][1]["train"] > reports["interpolate"][1]["train"]
