"""The Lens text-to-image pipeline: prompt -> GPT-OSS features -> MMDiT flow sampling -> FLUX.2 VAE.

Components are loaded lazily from disk on first use. With ``offload=True`` (the default) only the
component at work sits on the accelerator: the encoder runs, goes back to host memory, then the
MMDiT, then the VAE, so peak accelerator memory is about the largest component, not the sum.
"""

from __future__ import annotations

import contextlib
import gc
import json
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from PIL import Image

from . import __version__
from .errors import CheckpointError
from .image_io import to_pil
from .loading import component_path, default_dtype, load_mmdit, load_mmdit_config, load_text_encoder, load_vae
from .lora import LoraModule, linear_weight_shapes, merge_lora_, read_lora
from .mmdit import LensMMDiT
from .ops import DEFAULT_OPS
from .prompt import empty_features, pad_to_length, split_features, tokenize_prompts
from .reasoner import PipelineLocalReasoner, ReasonerSettings, refine
from .resolution import scaled_bucket, validate_size
from .safetensors_io import TensorSource
from .sampling import PRESETS, euler_sample, initial_noise
from .schedule import lens_sigmas
from .tokenizer import Tokenizer, load_tokenizer
from .vae import unpack_latents

DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"
COMPONENTS = ("text_encoder", "transformer", "vae")
StepCallback = Callable[[int, int, torch.Tensor], None]
LoraSpec = str | Path | tuple[str | Path, float]


@dataclass
class TextConditioning:
    """Encoder features after the 97-token prefix: ``feats`` = list of ``[B, S, 2880]``, ``mask`` ``[B, S]``."""

    feats: list[torch.Tensor]
    mask: torch.Tensor


@dataclass
class LensOutput:
    """What one call produced: PIL images, final latent tokens ``[B, N, 128]`` and per-image settings."""

    images: list[Image.Image]
    latents: torch.Tensor
    settings: list[dict[str, Any]] = field(default_factory=list)


def pick_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def declared_resolution(transformer_path: Path) -> int:
    """The base resolution a pipeline folder declares (``default_resolution`` in its
    ``model_index.json``: a small model trained at another size, such as Lens-Toy's 128), else 1024."""
    index = transformer_path.parent / "model_index.json" if transformer_path.is_dir() else None
    if index is None or not index.is_file():
        return 1024
    try:
        value = json.loads(index.read_text()).get("default_resolution", 1024)
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(index, f"unreadable model_index.json ({e})") from e
    if not isinstance(value, int) or value < 16:
        raise CheckpointError(index, f"default_resolution must be an integer >= 16, got {value!r}")
    return value


def find_tokenizer(encoder_path: Path) -> Tokenizer:
    """The tokenizer shipped with the encoder checkpoint, else the bundled o200k_harmony.

    A tokenizer that is present but broken raises (TokenizerError); only a missing one falls back.
    """
    if encoder_path.is_dir():
        candidates = [encoder_path / "tokenizer.json", encoder_path / "tokenizer" / "tokenizer.json",
                      encoder_path.parent / "tokenizer" / "tokenizer.json"]
        if any(c.is_file() for c in candidates):
            return load_tokenizer(encoder_path)
    elif encoder_path.suffix.lower() == ".gguf":
        from quant.gpt_oss_gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(encoder_path)
    elif encoder_path.suffix == ".safetensors":
        if any(k == "tokenizer_json" or k.endswith(".tokenizer_json") for k in TensorSource.open(encoder_path)):
            return load_tokenizer(encoder_path)
        if (encoder_path.parent / "tokenizer.json").is_file():
            return load_tokenizer(encoder_path.parent / "tokenizer.json")
    return load_tokenizer(None)


class LensPipeline:
    """Generate images with Lens from the checkpoint files users have.

    Args:
        transformer, text_encoder, vae: a file or folder for each component, or a pipeline root
            (diffusers layout) for any of them; None uses the default model shipped in the package.
        tokenizer: a ``tokenizer.json`` (or folder / safetensors with an embedded one); None looks
            beside the encoder, then falls back to the bundled o200k_harmony.
        device: ``cuda``/``cpu``/...; default: CUDA when available.
        dtype: weights and compute dtype; default bf16 on accelerators, fp32 on CPU.
        offload: on by default. On an accelerator, idle components wait in host memory; on the
            CPU, each component is dropped once its stage is done (reloaded from disk next call).
        operations: the layer factory for all three models (``quant`` swaps in quantised layers).
        loras: LoRA files to merge into the MMDiT, each ``(path, scale)`` (or a path: scale 1), in
            any naming :mod:`lens_core.lora` reads. They are read and checked against the MMDiT's
            shapes here, before anything heavy loads, and merged every time the MMDiT is loaded
            (so a reload after offloading has them too). Needs plain float weights (not quantised
            ``operations``). The file names and scales go into each image's settings.
        fp8_matmul: run the MMDiT's per-tensor-scaled fp8 matrices (fp8 / scaled-fp8 files) with fp8
            matmul kernels instead of decoding them (:func:`quant.layers.set_fp8_matmul`; CUDA with
            sm >= 8.9, elsewhere they keep decoding). Faster, but activations are rounded to fp8.
    """

    def __init__(
        self,
        transformer: str | Path | None = None,
        text_encoder: str | Path | None = None,
        vae: str | Path | None = None,
        tokenizer: str | Path | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        offload: bool = True,
        operations=DEFAULT_OPS,
        loras: Sequence[LoraSpec] = (),
        fp8_matmul: bool = False,
    ) -> None:
        self.device = pick_device(device)
        self.dtype = dtype or default_dtype(self.device)
        self.offload = offload
        self.operations = operations
        self.fp8_matmul = fp8_matmul
        given = {"transformer": transformer, "text_encoder": text_encoder, "vae": vae}
        self.paths = {c: component_path(p if p is not None else DEFAULT_MODEL_DIR, c) for c, p in given.items()}
        self.mmdit_config = load_mmdit_config(self.paths["transformer"])  # headers only
        self.tokenizer = load_tokenizer(tokenizer) if tokenizer is not None else find_tokenizer(self.paths["text_encoder"])
        self._models: dict[str, nn.Module] = {}
        self.default_resolution = declared_resolution(self.paths["transformer"])
        self._local_reasoner: PipelineLocalReasoner | None = None
        self.loras: list[tuple[Path, float]] = []
        self._lora_modules: list[dict[tuple[str, int | None], LoraModule]] = []
        if loras:
            with torch.device("meta"):
                shapes = linear_weight_shapes(LensMMDiT(self.mmdit_config))
            for spec in loras:
                path, scale = (spec, 1.0) if isinstance(spec, (str, Path)) else spec
                path, scale = Path(path).expanduser(), float(scale)
                modules, _ = read_lora(path, shapes)  # strict: a LoRA for another model is an error
                self.loras.append((path, scale))
                self._lora_modules.append(modules)

    @classmethod
    def from_pretrained(cls, root: str | Path, **kwargs: Any) -> LensPipeline:
        """Load all components from one pipeline folder (``transformer/``, ``text_encoder/``, ``vae/``)."""
        return cls(transformer=root, text_encoder=root, vae=root, **kwargs)

    # -- component management ---------------------------------------------------------------

    def _load(self, name: str) -> nn.Module:
        where = "cpu" if self.offload else self.device
        if name == "transformer":
            mmdit = load_mmdit(self.paths[name], where, self.dtype, self.operations)
            for modules, (_, scale) in zip(self._lora_modules, self.loras, strict=True):
                merge_lora_(mmdit, modules, scale)
            if self.fp8_matmul:
                from quant.layers import set_fp8_matmul

                set_fp8_matmul(mmdit, True)
            return mmdit
        if name == "text_encoder":
            return load_text_encoder(
                self.paths[name], tuple(self.mmdit_config.selected_layer_index), where, self.dtype, self.operations
            )
        return load_vae(self.paths[name], where, self.dtype, self.operations)

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[nn.Module]:
        """The component ``name`` on the compute device for the duration of the block."""
        model = self._models.get(name)
        if model is None:
            model = self._models[name] = self._load(name)
        moves = self.offload and self.device.type != "cpu"
        if moves:
            model.to(self.device)
        try:
            yield model
        finally:
            if moves:
                model.to("cpu")
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    def _stage_done(self, name: str) -> None:
        """With offload on the CPU, free a component as soon as its stage is over."""
        if self.offload and self.device.type == "cpu":
            self.release(name)

    def release(self, name: str | None = None) -> None:
        """Drop a component (or all) from memory; it is reloaded from disk when next needed."""
        for n in [name] if name else list(self._models):
            self._models.pop(n, None)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- stages ------------------------------------------------------------------------------

    @torch.inference_mode()
    def encode_prompt(self, prompts: Sequence[str]) -> TextConditioning:
        """Encoder features for ``prompts`` (each encoded once), prefix dropped."""
        ids, mask = tokenize_prompts(list(prompts), self.tokenizer)
        with self.use("text_encoder") as encoder:
            feats = encoder(ids.to(self.device), mask.to(self.device))
        feats, mask = split_features(feats, mask.to(self.device))
        return TextConditioning([f.to(self.dtype) for f in feats], mask)

    @torch.inference_mode()
    def denoise(
        self,
        cond: TextConditioning,
        uncond: TextConditioning | None,
        noise: torch.Tensor,
        grid_hw: tuple[int, int],
        steps: int,
        cfg: float,
        callback: StepCallback | None = None,
    ) -> torch.Tensor:
        """Sample latent tokens ``[B, N, 128]`` from ``noise`` with the empirical-mu Euler schedule.

        With ``cfg != 1`` cond and uncond run as one ``[2B]`` batch per step; ``uncond`` may be None
        only when ``cfg == 1``.
        """
        sigmas = lens_sigmas(steps, grid_hw[0] * grid_hw[1])
        if cfg != 1.0:
            if uncond is None:
                raise ValueError("cfg != 1 needs unconditional text features")
            length = max(cond.mask.shape[1], uncond.mask.shape[1])
            c_feats, c_mask = pad_to_length(cond.feats, cond.mask, length)
            u_feats, u_mask = pad_to_length(uncond.feats, uncond.mask, length)
            feats = [torch.cat([c, u]) for c, u in zip(c_feats, u_feats, strict=True)]
            mask = torch.cat([c_mask, u_mask])
        else:
            feats, mask = cond.feats, cond.mask
        with self.use("transformer") as mmdit:

            def velocity(x: torch.Tensor, sigma: torch.Tensor, _uncond: bool) -> torch.Tensor:
                return mmdit(x.to(self.dtype), sigma, feats, mask, grid_hw)

            return euler_sample(velocity, noise.to(self.device), sigmas, cfg, callback)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        """Latent tokens ``[B, N, 128]`` -> images ``[B, 3, 16h, 16w]`` in [-1, 1], one image at a time."""
        with self.use("vae") as vae:
            return torch.cat([vae.decode(unpack_latents(t[None].to(self.device), *grid_hw)).cpu() for t in latents])

    # -- the whole thing ---------------------------------------------------------------------

    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] = "",
        preset: str = "lens",
        steps: int | None = None,
        cfg: float | None = None,
        width: int | None = None,
        height: int | None = None,
        base: int | None = None,
        aspect_ratio: str = "1:1",
        seed: int | None = None,
        num_images_per_prompt: int = 1,
        callback: StepCallback | None = None,
        reasoner: ReasonerSettings | None = None,
    ) -> LensOutput:
        """Generate ``len(prompts) * num_images_per_prompt`` images (ordered p0, p0, ..., p1, ...).

        Size: ``width``/``height`` (multiples of 16) or a bucket ``base`` x ``aspect_ratio`` (W:H);
        ``base`` None = the model's own (:attr:`default_resolution`).
        ``seed`` fixes the noise exactly as the reference does (CPU generator); None draws one,
        reported in the settings. ``reasoner`` rewrites the prompts first (``local``: with this
        pipeline's GPT-OSS weights; ``api``: an OpenAI-compatible server); the text actually encoded
        is reported as ``refined_prompt``.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if not prompts or len(negatives) != len(prompts):
            raise ValueError("give one or more prompts and either one negative prompt or one per prompt")
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        steps = steps if steps is not None else PRESETS[preset].steps
        cfg = cfg if cfg is not None else PRESETS[preset].cfg
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        if (width is None) != (height is None):
            raise ValueError("give both width and height, or neither (then base and aspect_ratio pick a bucket)")
        if width is None:
            width, height = scaled_bucket(base or self.default_resolution, aspect_ratio)
        validate_size(width, height)
        seed = seed if seed is not None else random.randrange(2**63)
        n = int(num_images_per_prompt)
        grid_hw = (height // 16, width // 16)

        refined = self.refine(prompts, reasoner)
        cond = self.encode_prompt([r.text for r in refined])
        uncond = None
        if cfg != 1.0:
            uncond = self._negative_conditioning(negatives, cond)
        cond = _repeat(cond, n)
        uncond = _repeat(uncond, n) if uncond is not None else None
        self._stage_done("text_encoder")

        noise = initial_noise(len(prompts) * n, height, width, seed)
        latents = self.denoise(cond, uncond, noise, grid_hw, steps, cfg, callback)
        self._stage_done("transformer")
        images = to_pil(self.decode(latents, grid_hw))
        self._stage_done("vae")
        settings = [
            {
                "prompt": prompts[i // n],
                "negative_prompt": negatives[i // n],
                "preset": preset,
                "steps": steps,
                "cfg": cfg,
                "width": width,
                "height": height,
                "seed": seed,
                "batch_index": i,
                **_reasoner_settings(refined[i // n], reasoner),
                **self._lora_settings(),
                **({"fp8_matmul": True} if self.fp8_matmul else {}),
                "sampler": "euler (flow matching, empirical-mu schedule)",
                "models": {c: str(p) for c, p in self.paths.items()},
                "lens_core": __version__,
            }
            for i in range(len(images))
        ]
        return LensOutput(images, latents.cpu(), settings)

    def _lora_settings(self) -> dict[str, Any]:
        """What the PNG records of the LoRAs: file names and scales, in merge order."""
        if not self.loras:
            return {}
        return {"loras": [{"name": p.name, "scale": s} for p, s in self.loras]}

    def refine(self, prompts: list[str], settings: ReasonerSettings | None):
        """The prompts after the reasoner (passed through when ``settings`` is None or mode ``off``)."""
        settings = settings or ReasonerSettings()
        backend = None
        if settings.mode == "local":
            if self._local_reasoner is None:
                self._local_reasoner = PipelineLocalReasoner(self)
            backend = self._local_reasoner
        return refine(prompts, settings, backend)

    def _negative_conditioning(self, negatives: list[str], cond: TextConditioning) -> TextConditioning:
        """Empty negatives get zero features and an all-False mask; others are encoded."""
        if all(not neg.strip() for neg in negatives):
            return TextConditioning(*empty_features(cond.feats, cond.mask))
        return self.encode_prompt(negatives)


def _reasoner_settings(refined, settings: ReasonerSettings | None) -> dict[str, Any]:
    """What the PNG records of the reasoner: its mode, model and the text actually encoded (never a key)."""
    if settings is None or settings.mode == "off":
        return {}
    out = {"reasoner": settings.mode, "refined_prompt": refined.text}
    if settings.mode == "api":
        out["reasoner_model"] = settings.api_model
    if refined.fell_back:
        out["reasoner_warnings"] = list(refined.warnings)
    return out


def _repeat(c: TextConditioning, n: int) -> TextConditioning:
    if n == 1:
        return c
    return TextConditioning([f.repeat_interleave(n, 0) for f in c.feats], c.mask.repeat_interleave(n, 0))
