"""Flow-matching objective and the shifted logit-normal timestep sampler (training/objective.py)."""

from __future__ import annotations

import math

import pytest
import torch

from lens_core.mmdit import LensMMDiT
from lens_core.random_weights import randomize_, tiny_configs
from lens_core.schedule import lens_sigmas
from training.config import TimestepSection
from training.objective import (
    TimestepConfig,
    add_noise,
    drop_captions,
    flow_matching_loss,
    interpolate_mu,
    noise_batch,
    sample_sigmas,
    shift_sigmas,
)


def test_mu_interpolation_points():
    assert interpolate_mu(256) == pytest.approx(0.5)
    assert interpolate_mu(4096) == pytest.approx(1.15)
    assert interpolate_mu(1024) == pytest.approx(0.5 + 0.65 * 768 / 3840)  # the low-res stage
    assert interpolate_mu(8100) == pytest.approx(0.5 + 0.65 * 7844 / 3840)  # 1440^2: extended linearly
    cfg = TimestepConfig(shift="fixed", mu=0.7)
    assert cfg.mu_for(64) == cfg.mu_for(9999) == 0.7
    assert TimestepConfig(shift="none").mu_for(4096) == 0.0


def test_sampler_shift_trains_at_the_mu_of_the_inference_schedule():
    # lens_sigmas(20, n) evaluates linspace(1, 1/20, 20) shifted by the sampler's mu; its 11th
    # entry is the shift of 0.5, e^mu / (e^mu + 1), so logit(sigma) recovers that mu.
    for tokens, steps in ((64, 20), (1024, 20), (4096, 50)):
        n, idx = steps, steps // 2
        grid = torch.linspace(1.0, 1.0 / n, n, dtype=torch.float64)
        sigma = float(lens_sigmas(n, tokens)[idx].double())
        g = float(grid[idx])
        mu = math.log(sigma / (1 - sigma)) - math.log(g / (1 - g))
        assert TimestepConfig(shift="sampler", sampler_steps=steps).mu_for(tokens) == pytest.approx(mu, abs=1e-5)
    assert TimestepConfig(shift="sampler").mu_for(64) == pytest.approx(1.83, abs=0.01)  # vs 0.47 interpolated
    section = TimestepSection(shift="sampler", sampler_steps=4).build()
    assert section.shift == "sampler" and section.mu_for(256) == TimestepConfig(shift="sampler", sampler_steps=4).mu_for(256)
    with pytest.raises(ValueError, match="sampler_steps"):
        TimestepConfig(shift="sampler", sampler_steps=0)
    with pytest.raises(ValueError, match="'sampler'"):
        TimestepConfig(shift="bogus")


def test_shift_has_inference_form_and_adds_mu_in_logit_space():
    s = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    mu = 1.15
    expected = [0.0] + [math.exp(mu) / (math.exp(mu) + (1 / v - 1)) for v in (0.1, 0.5, 0.9)] + [1.0]
    torch.testing.assert_close(shift_sigmas(s, mu), torch.tensor(expected, dtype=torch.float64))
    inner = s[1:-1]
    logit = torch.log(inner / (1 - inner))
    shifted = shift_sigmas(inner, mu)
    torch.testing.assert_close(torch.log(shifted / (1 - shifted)), logit + mu)


@pytest.mark.parametrize("tokens, mean, std", [(256, 0.0, 1.0), (4096, 0.0, 1.0), (1024, -0.5, 0.8)])
def test_timestep_distribution(tokens, mean, std):
    """logit(sigma) ~ N(mean + mu(tokens), std): checked on 200k draws with a fixed seed."""
    cfg = TimestepConfig(logit_mean=mean, logit_std=std)
    s = sample_sigmas(200_000, tokens, cfg, torch.Generator().manual_seed(0)).double()
    assert float(s.min()) > 0 and float(s.max()) < 1
    logit = torch.log(s / (1 - s))
    mu = interpolate_mu(tokens)
    se = std / math.sqrt(len(s))
    assert abs(float(logit.mean()) - (mean + mu)) < 5 * se
    assert float(logit.std()) == pytest.approx(std, rel=0.01)
    # Kolmogorov-Smirnov distance to the normal CDF (critical value at 1e-6 is about 0.0055 for n = 2e5)
    z = torch.sort((logit - mean - mu) / std).values
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    n = len(z)
    ks = max(float((torch.arange(1, n + 1) / n - cdf).max()), float((cdf - torch.arange(n) / n).max()))
    assert ks < 0.0055
    # larger images are pushed towards noise
    if tokens == 4096:
        small = sample_sigmas(200_000, 256, cfg, torch.Generator().manual_seed(0))
        assert float(s.median()) > float(small.median()) + 0.1


def test_noise_and_target_definitions():
    x0 = torch.randn(3, 8, 128)
    batch = noise_batch(x0, TimestepConfig(), torch.Generator().manual_seed(1))
    noise = batch.target + x0
    torch.testing.assert_close(
        batch.x_t, (1 - batch.sigmas[:, None, None]) * x0 + batch.sigmas[:, None, None] * noise
    )
    torch.testing.assert_close(add_noise(x0, noise, torch.zeros(3)), x0)
    torch.testing.assert_close(add_noise(x0, noise, torch.ones(3)), noise)
    again = noise_batch(x0, TimestepConfig(), torch.Generator().manual_seed(1))
    assert torch.equal(again.x_t, batch.x_t)  # a batch's draws depend only on its generator


def test_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    model = randomize_(LensMMDiT(tiny_configs()[0]), 0).train()
    x0 = torch.randn(2, 4, 128)
    feats = [torch.randn(2, 5, 32) for _ in range(4)]
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        batch = noise_batch(x0, TimestepConfig(), torch.Generator().manual_seed(7))  # same noise every step
        loss = flow_matching_loss(model(batch.x_t, batch.sigmas, feats, mask, (2, 2)), batch.target)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert sum(losses[-5:]) < sum(losses[:5])


def test_caption_dropout_gives_the_empty_prompt_at_rate_p():
    """Dropped rows become the sampler's empty negative (zero features, all-False mask); kept rows are untouched."""
    from lens_core.prompt import empty_features

    b = 4000
    feats = [torch.randn(b, 5, 3) + 1.0 for _ in range(2)]
    mask = torch.ones(b, 5, dtype=torch.bool)
    mask[:, 4] = False
    out, out_mask = drop_captions(feats, mask, 0.1, torch.Generator().manual_seed(0))
    dropped = ~out_mask.any(dim=1)
    assert abs(dropped.float().mean().item() - 0.1) < 0.015
    empty_feats, empty_mask = empty_features([f[dropped] for f in feats], mask[dropped])
    assert torch.equal(out_mask[dropped], empty_mask)
    for f, o, e in zip(feats, out, empty_feats, strict=True):
        assert torch.equal(o[dropped], e)
        assert torch.equal(o[~dropped], f[~dropped])
    assert torch.equal(out_mask[~dropped], mask[~dropped])
    # Same generator seed, same draws (resume and multi-process runs rely on it); p = 0 draws nothing.
    again, _ = drop_captions(feats, mask, 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], out[0])
    gen = torch.Generator().manual_seed(0)
    same, same_mask = drop_captions(feats, mask, 0.0, gen)
    assert same_mask is mask and all(s is f for s, f in zip(same, feats, strict=True))
    assert torch.equal(gen.get_state(), torch.Generator().manual_seed(0).get_state())
