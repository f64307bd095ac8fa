"""The FLUX.2 VAE (with Lens' latent normalisation) as a ComfyUI ``VAE``.

``LensVAE`` has the methods stock nodes call on a VAE (``decode``, ``encode``, their tiled
variants and the compression queries), so VAEDecode / VAEEncode / VAEDecodeTiled work with it.
Images are ComfyUI IMAGE tensors ``[B, H, W, 3]`` in [0, 1]; latents are ``[B, 128, H/16, W/16]``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import comfy.model_management
import comfy.model_patcher
import comfy.utils
import torch

from lens_core.loading import load_vae

from .lens_bridge import LATENT_CHANNELS, PATCH
from .text import DTYPES, _pick_dtype, eager_ops

log = logging.getLogger("ComfyUI-Lens")

# Rough activation memory of the decoder per output pixel (bytes per dtype byte); only a hint
# for ComfyUI's memory manager.
_BYTES_PER_PIXEL = 1200


class LensVAE:
    """FLUX.2 autoencoder behind ComfyUI's VAE interface."""

    latent_channels = LATENT_CHANNELS
    latent_dim = 2
    output_channels = 3
    downscale_ratio = PATCH
    upscale_ratio = PATCH

    def __init__(self, patcher, dtype: torch.dtype):
        self.patcher = patcher
        self.dtype = dtype
        self.vae_dtype = dtype

    @property
    def model(self):
        return self.patcher.model

    # -- what stock nodes query ---------------------------------------------------------------
    def throw_exception_if_invalid(self):
        return None

    def spacial_compression_decode(self):
        return PATCH

    def spacial_compression_encode(self):
        return PATCH

    def temporal_compression_decode(self):
        return None

    def temporal_compression_encode(self):
        return None

    def get_sd(self):
        return self.model.state_dict()

    # -- decode / encode ---------------------------------------------------------------------
    def _load(self, pixels: int) -> torch.device:
        size = torch.tensor([], dtype=self.dtype).element_size()
        comfy.model_management.load_models_gpu([self.patcher], memory_required=pixels * _BYTES_PER_PIXEL * size,
                                               force_full_load=True)
        return self.patcher.load_device

    @torch.inference_mode()
    def _decode(self, latent: torch.Tensor) -> torch.Tensor:
        """``[B, 128, h, w]`` -> ``[B, 3, 16h, 16w]`` in [0, 1], one image at a time."""
        if latent.ndim != 4 or latent.shape[1] != LATENT_CHANNELS:
            raise ValueError(
                f"the Lens VAE decodes 128-channel latents [B, 128, H/16, W/16], got {tuple(latent.shape)}"
            )
        device = self._load(latent.shape[-2] * latent.shape[-1] * PATCH * PATCH)
        out = [self.model.decode(z[None].to(device)).float().to(comfy.model_management.intermediate_device())
               for z in latent]
        return (torch.cat(out) + 1.0) * 0.5

    def decode(self, samples, vae_options=None):
        return self._decode(samples).movedim(1, -1)

    def decode_tiled(self, samples, tile_x=64, tile_y=64, overlap=16, **kwargs):
        device = self._load(tile_x * tile_y * PATCH * PATCH)

        def run(z):
            return (self.model.decode(z.to(device)).float() + 1.0) * 0.5

        with torch.inference_mode():
            out = comfy.utils.tiled_scale(
                samples, run, tile_x=tile_x, tile_y=tile_y, overlap=overlap, upscale_amount=PATCH,
                out_channels=3, output_device=comfy.model_management.intermediate_device(),
            )
        return out.movedim(1, -1)

    @staticmethod
    def _crop(pixels: torch.Tensor) -> torch.Tensor:
        """Centre-crop ``[B, H, W, C]`` to multiples of 16 (the VAE needs them)."""
        h, w = (pixels.shape[1] // PATCH) * PATCH, (pixels.shape[2] // PATCH) * PATCH
        if h == 0 or w == 0:
            raise ValueError(f"image {pixels.shape[2]}x{pixels.shape[1]} is smaller than 16 pixels")
        top, left = (pixels.shape[1] - h) // 2, (pixels.shape[2] - w) // 2
        return pixels[:, top:top + h, left:left + w]

    @torch.inference_mode()
    def encode(self, pixels):
        pixels = self._crop(pixels[..., :3])
        device = self._load(pixels.shape[1] * pixels.shape[2])
        out = [self.model.encode(p[None].movedim(-1, 1).to(device, torch.float32) * 2.0 - 1.0)
               .to(comfy.model_management.intermediate_device()) for p in pixels]
        return torch.cat(out)

    def encode_tiled(self, pixels, tile_x=None, tile_y=None, overlap=None, **kwargs):
        log.info("Lens VAE: tiled encoding is not implemented; encoding the whole image")
        return self.encode(pixels)


def load_lens_vae(path: str | Path, weight_dtype: str = "default") -> LensVAE:
    """A LensVAE for a FLUX.2 VAE file or folder (BFL/ComfyUI or diffusers names)."""
    mm = comfy.model_management
    load_device, offload_device = mm.vae_device(), mm.vae_offload_device()
    dtype = _pick_dtype(weight_dtype, load_device)
    module = load_vae(Path(path), offload_device, dtype, operations=eager_ops())
    patcher = comfy.model_patcher.ModelPatcher(module, load_device=load_device, offload_device=offload_device)
    log.info("Lens VAE %s: %s", path, dtype)
    return LensVAE(patcher, dtype)


__all__ = ["DTYPES", "LensVAE", "load_lens_vae"]
