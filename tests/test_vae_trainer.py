"""The small-VAE trainer used for Lens-Toy: it learns, fits the latent BatchNorm, and saves a loadable VAE."""

from __future__ import annotations

import torch

from lens_core.loading import load_vae
from lens_core.vae import VAEConfig
from training.vae_trainer import fit_latent_stats, save_vae, toy_image_batches, train_vae, vae_loss


def test_training_reduces_loss_and_saves_a_loadable_vae(tmp_path):
    config = VAEConfig(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8)
    fixed = next(toy_image_batches(4, 32, seed=0))
    losses = []
    vae = train_vae(config, iter([fixed] * 40), steps=36, lr=2e-3, stats_batches=4, warmup=4,
                    log=lambda step, s: losses.append(s["loss"]))
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    # Latent statistics: normalised latents of the data are ~zero-mean, unit-variance per channel.
    with torch.no_grad():
        z = vae.encode(fixed)
    assert z.mean(dim=(0, 2, 3)).abs().max() < 1e-3
    var = vae.bn.running_var
    expected = var / (var + config.batch_norm_eps)  # unit variance up to the BatchNorm eps
    torch.testing.assert_close(z.var(dim=(0, 2, 3), unbiased=False), expected, atol=1e-4, rtol=1e-3)
    loaded = load_vae(save_vae(vae, tmp_path / "vae"))
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(z), vae.decode(z))


def test_fit_latent_stats_matches_direct_computation():
    config = VAEConfig(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8)
    torch.manual_seed(0)
    from training.vae_trainer import Flux2VAE, patchify_latents, posterior

    vae = Flux2VAE(config).eval()
    batches = [torch.rand(2, 3, 32, 32) * 2 - 1 for _ in range(3)]
    fit_latent_stats(vae, iter(batches))
    with torch.no_grad():
        z = torch.cat([patchify_latents(posterior(vae, b)[0], 2) for b in batches])
    torch.testing.assert_close(vae.bn.running_mean, z.mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vae.bn.running_var, z.var(dim=(0, 2, 3), unbiased=False), atol=1e-5, rtol=1e-4)
    loss, stats = vae_loss(vae, batches[0], kl_weight=1e-3)
    assert loss.item() == stats["loss"] and stats["kl"] >= 0


def test_crops_are_windows_of_the_full_scenes():
    """Crops keep the objects' scale: a crop is a window of the scene the same seed renders in full."""
    full = next(toy_image_batches(1, 64, seed=5))[0]
    crops = next(toy_image_batches(3, 64, seed=5, crop=32))
    assert crops.shape == (3, 3, 32, 32)
    windows = full.unfold(1, 32, 1).unfold(2, 32, 1)  # [3, 33, 33, 32, 32]
    assert (windows == crops[0][:, None, None]).all(dim=0).flatten(2).all(dim=-1).any()
