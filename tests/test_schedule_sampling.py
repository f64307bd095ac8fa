"""Schedule and sampler maths against diffusers' FlowMatchEulerDiscreteScheduler and explicit formulas."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from lens_core.sampling import PRESETS, Preset, cfg_combine, euler_sample, initial_noise
from lens_core.schedule import empirical_mu, lens_sigmas

SCHEDULER_CONFIG = Path(__file__).resolve().parents[1] / "lens_core" / "configs" / "scheduler_config.json"


def reference_scheduler(num_steps: int, seq_len: int) -> FlowMatchEulerDiscreteScheduler:
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        FlowMatchEulerDiscreteScheduler.load_config(SCHEDULER_CONFIG)
    )
    sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps)
    scheduler.set_timesteps(sigmas=sigmas, mu=empirical_mu(seq_len, num_steps))
    return scheduler


# (image tokens, steps, mu) worked out by hand from the two fitted lines:
#   m200 = 0.00016927 L + 0.45666666,  m10 = 8.73809524e-5 L + 1.89833333,
#   mu = m200 + (m200 - m10) / 190 * (N - 200)  for L <= 4300, else m200.
HAND_MU = [
    (4096, 20, 2.1980221),  # 1024^2, the paper's default: ~2.2 (FLUX's shift would give 1.15)
    (4096, 50, 2.0233512),
    (1024, 4, 2.0306897),
    (4300, 1, 2.3256814),
    (4301, 20, 1.1846969),  # past 4300 tokens the step count no longer matters
    (8100, 20, 1.8277537),  # 1440^2
    (8100, 4, 1.8277537),
]


@pytest.mark.parametrize(("seq_len", "steps", "mu"), HAND_MU)
def test_empirical_mu_matches_hand_values(seq_len: int, steps: int, mu: float) -> None:
    assert empirical_mu(seq_len, steps) == pytest.approx(mu, abs=2e-7)


@pytest.mark.parametrize("steps", [1, 4, 20, 50])
@pytest.mark.parametrize("seq_len", [256, 1024, 4096, 4300, 4301, 6000, 8100])
def test_sigmas_match_diffusers(steps: int, seq_len: int) -> None:
    ours = lens_sigmas(steps, seq_len)
    ref = reference_scheduler(steps, seq_len).sigmas
    assert ours.dtype == torch.float32 and ours.shape == (steps + 1,)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)
    assert ours[0] == 1.0 and ours[-1] == 0.0
    assert torch.all(ours[1:] < ours[:-1])


def test_invalid_schedule_arguments() -> None:
    with pytest.raises(ValueError):
        lens_sigmas(0, 4096)
    with pytest.raises(ValueError):
        empirical_mu(0, 20)


def test_euler_matches_scheduler_step() -> None:
    steps, seq_len = 6, 4096
    scheduler = reference_scheduler(steps, seq_len)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 12, 8, generator=gen)
    velocities = [torch.randn(2, 12, 8, generator=gen) for _ in range(steps)]

    expected = noise.clone()
    for t, v in zip(scheduler.timesteps, velocities, strict=True):
        expected = scheduler.step(v, t, expected, return_dict=False)[0]

    seen_sigmas = []

    def velocity_fn(x: torch.Tensor, sigma: torch.Tensor, uncond: bool) -> torch.Tensor:
        assert not uncond and x.shape == noise.shape and x.dtype == torch.float32
        seen_sigmas.append(sigma)
        return velocities[len(seen_sigmas) - 1]

    got = euler_sample(velocity_fn, noise, lens_sigmas(steps, seq_len), cfg=1.0)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    # The model sees the scheduler's sigmas, one per sample.
    for sigma, t in zip(seen_sigmas, scheduler.timesteps, strict=True):
        assert sigma.shape == (2,)
        torch.testing.assert_close(sigma, (t / 1000).expand(2), rtol=1e-6, atol=1e-7)


def explicit_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    out = torch.empty_like(cond)
    for b in range(cond.shape[0]):
        for n in range(cond.shape[1]):
            c, u = cond[b, n].double(), uncond[b, n].double()
            comb = u + scale * (c - u)
            norm = comb.square().sum().sqrt()
            out[b, n] = comb if norm == 0 else comb * c.square().sum().sqrt() / norm
    return out


def test_cfg_combine_matches_per_token_formula() -> None:
    gen = torch.Generator().manual_seed(1)
    cond = torch.randn(2, 5, 16, generator=gen)
    uncond = torch.randn(2, 5, 16, generator=gen)
    # A token where the guided velocity is exactly zero: u + 5 (c - u) = 5c - 4u = 0.
    uncond[1, 2] = 5 * torch.arange(16.0)
    cond[1, 2] = 4 * torch.arange(16.0)
    got = cfg_combine(cond, uncond, 5.0)
    torch.testing.assert_close(got, explicit_cfg(cond, uncond, 5.0), rtol=1e-5, atol=1e-6)
    assert torch.all(got[1, 2] == 0)
    # Every other token keeps the conditional velocity's norm.
    torch.testing.assert_close(got[0].norm(dim=-1), cond[0].norm(dim=-1), rtol=1e-5, atol=1e-6)
    # Scale 1 is the conditional velocity itself; bf16 in, bf16 out.
    torch.testing.assert_close(cfg_combine(cond, uncond, 1.0), cond, rtol=1e-6, atol=1e-6)
    assert cfg_combine(cond.bfloat16(), uncond.bfloat16(), 4.0).dtype == torch.bfloat16


def test_cfg_combine_all_zero() -> None:
    zeros = torch.zeros(1, 3, 4)
    assert torch.equal(cfg_combine(zeros, zeros, 5.0), zeros)


class CountingModel:
    """A fake model whose cond and uncond velocities differ, recording every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[int, ...], tuple[int, ...], bool]] = []

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, uncond: bool) -> torch.Tensor:
        self.calls.append((tuple(x.shape), tuple(sigma.shape), uncond))
        v = torch.sin(x) * sigma.view(-1, 1, 1)
        if uncond:
            half = x.shape[0] // 2
            v = torch.cat([v[:half], 0.3 * v[half:] - 0.1])
        return v.bfloat16()  # models typically answer in their own dtype


def test_guided_sampling_uses_one_batched_call_per_step() -> None:
    noise = initial_noise(3, 64, 32, seed=7)
    sigmas = lens_sigmas(5, noise.shape[1])
    model = CountingModel()
    steps_seen = []
    out = euler_sample(
        model, noise, sigmas, cfg=4.0, callback=lambda i, n, x: steps_seen.append((i, n, x.dtype))
    )
    assert model.calls == [((6, 8, 128), (6,), True)] * 5
    assert steps_seen == [(i, 5, torch.float32) for i in range(5)]
    assert out.dtype == torch.float32 and out.shape == noise.shape

    # Same result from an explicit loop.
    x = noise.clone()
    for i in range(5):
        v = CountingModel()(torch.cat([x, x]), sigmas[i].expand(6), True).float()
        x = x + (sigmas[i + 1] - sigmas[i]) * cfg_combine(v[:3], v[3:], 4.0)
    torch.testing.assert_close(out, x)


def test_unguided_sampling_runs_only_the_cond_half() -> None:
    noise = initial_noise(2, 32, 32, seed=3)
    model = CountingModel()
    euler_sample(model, noise, lens_sigmas(4, noise.shape[1]), cfg=1.0)
    assert model.calls == [((2, 4, 128), (2,), False)] * 4


def test_wrong_velocity_batch_is_reported() -> None:
    noise = torch.zeros(2, 4, 8)
    with pytest.raises(ValueError, match=r"\(2, 4, 8\), expected \(4, 4, 8\)"):
        euler_sample(lambda x, s, uncond: x[:2], noise, lens_sigmas(2, 4), cfg=3.0)


def test_initial_noise_follows_reference_convention() -> None:
    got = initial_noise(2, 1376, 768, seed=1234)
    expected = torch.randn(
        (2, (1376 // 16) * (768 // 16), 128), generator=torch.Generator("cpu").manual_seed(1234)
    )
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    assert torch.equal(got, expected)
    assert initial_noise(1, 32, 48, seed=0, channels=4).shape == (1, 6, 4)


def test_presets() -> None:
    assert {"lens": Preset(20, 5.0), "base": Preset(50, 4.0), "turbo": Preset(4, 1.0)} == PRESETS
    with pytest.raises(AttributeError):
        PRESETS["lens"].steps = 10  # type: ignore[misc]
