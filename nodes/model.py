"""The Lens MMDiT as a ComfyUI ``MODEL``: a ModelPatcher around a ``BaseModel`` subclass.

The network is ``lens_core.mmdit.LensMMDiT`` built with the layer classes ComfyUI picks
(``comfy.ops``), so ComfyUI's weight casting, offloading and LoRA patching apply to it. Files whose
weights ``lens_core`` keeps packed (GGUF; fp8, scaled fp8 and ComfyUI's ``comfy_quant``
float8/mxfp8/nvfp4 safetensors) are loaded by ``lens_core`` into ``quant``'s GGML layers instead
(see :mod:`.gguf`). ComfyUI sees a flow-matching model (``ModelType.FLUX``: sigma in [0, 1], timestep = sigma, denoised =
x - sigma * v), so KSampler, SamplerCustomAdvanced and the stock samplers work with it.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import comfy.cli_args
import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models_base
import comfy.utils
import torch
import torch.nn.functional as F

from lens_core.errors import CheckpointError
from lens_core.loading import MMDIT_ANCHOR, is_packed_mmdit, load_mmdit, load_mmdit_config
from lens_core.mmdit import LensMMDiT, MMDiTConfig
from lens_core.safetensors_io import find_weight_files
from lens_core.sampling import cfg_combine
from lens_core.schedule import empirical_mu
from quant.layers import set_fp8_matmul

from .gguf import ComfyGGMLOps, LensModelPatcher
from .lens_bridge import (
    LATENT_CHANNELS,
    PATCH,
    context_to_features,
    make_norms_device_safe,
    pack_latents,
    unpack_latents,
)

log = logging.getLogger("ComfyUI-Lens")

SUPPORTED_DTYPES = [torch.bfloat16, torch.float32]  # float16 overflows in Lens
WEIGHT_DTYPES = {"default": None, "bf16": torch.bfloat16, "fp32": torch.float32}
# KSampler's schedulers need one fixed shift; Lens' own (Lens Scheduler) depends on size and steps.
DEFAULT_SHIFT = empirical_mu(64 * 64, 20)  # 1024x1024, 20 steps


class LensLatentFormat(comfy.latent_formats.LatentFormat):
    """128 channels at 1/16 of the image size; the VAE already normalises, so no scaling."""

    latent_channels = LATENT_CHANNELS
    spacial_downscale_ratio = PATCH
    scale_factor = 1.0


class LensTextCond(comfy.conds.CONDRegular):
    """Text features or mask ``[B, S, ...]`` that batch with other lengths by right-padding with
    zeros (features) / 0 (mask), as the Lens reference pads cond and uncond to one length."""

    def can_concat(self, other):
        a, b = self.cond, other.cond
        return (
            isinstance(other, LensTextCond)
            and a.ndim == b.ndim
            and a.shape[0] == b.shape[0]
            and a.shape[2:] == b.shape[2:]
            and a.device == b.device
        )

    def concat(self, others):
        conds = [self.cond] + [o.cond for o in others]
        length = max(c.shape[1] for c in conds)
        padded = []
        for c in conds:
            pad = [0, 0] * (c.ndim - 2) + [0, length - c.shape[1]]
            padded.append(F.pad(c, pad) if length != c.shape[1] else c)
        return torch.cat(padded)


class LensModelConfig(comfy.supported_models_base.BASE):
    """What ComfyUI needs to know about a Lens MMDiT (no detection: our loader builds it)."""

    unet_config = {"image_model": "lens_core"}
    unet_extra_config = {}
    sampling_settings = {"shift": DEFAULT_SHIFT}
    latent_format = LensLatentFormat
    memory_usage_factor = 4.0
    supported_inference_dtypes = SUPPORTED_DTYPES

    def set_inference_dtype(self, dtype, manual_cast_dtype, device=None):
        super().set_inference_dtype(dtype, manual_cast_dtype)
        self.unet_config["compute_dtype"] = manual_cast_dtype or dtype

    def get_model(self, state_dict, prefix="", device=None):
        return LensBaseModel(self, device=device)


class LensDiffusionModel(LensMMDiT):
    """ComfyUI's ``diffusion_model``: the LensMMDiT with ComfyUI's call signature.

    Parameter names are the checkpoint's own, so weights and LoRA keys map one to one. Activations
    run in ComfyUI's inference dtype (``compute_dtype``: the manual-cast dtype when ComfyUI stores
    weights in a dtype it does not compute in).
    """

    def __init__(self, image_model=None, dtype=None, compute_dtype=None, device=None, operations=None, **config):
        super().__init__(MMDiTConfig(**config), operations=operations, device=device, dtype=dtype)
        self._comfy_setup(dtype, compute_dtype)

    def _comfy_setup(self, dtype, compute_dtype) -> None:
        self.dtype = dtype
        self._compute_dtype = compute_dtype
        make_norms_device_safe(self)

    @classmethod
    def adopt(cls, mmdit: LensMMDiT, dtype: torch.dtype) -> LensDiffusionModel:
        """An already loaded LensMMDiT (a packed model, built and filled by ``lens_core``) turned into
        this class in place: same modules and weights, ComfyUI's call signature."""
        mmdit.__class__ = cls
        mmdit._comfy_setup(dtype, dtype)
        return mmdit

    @property
    def compute_dtype(self) -> torch.dtype:
        return self._compute_dtype or super().compute_dtype

    def velocity(self, tokens, sigma, txt_feats, txt_mask, grid_hw) -> torch.Tensor:
        """lens_core's forward: tokens ``[B, N, 128]`` -> velocity tokens."""
        return LensMMDiT.forward(self, tokens, sigma, txt_feats, txt_mask, grid_hw)

    def forward(self, x, timestep, context=None, attention_mask=None, control=None, transformer_options=None, **kwargs):
        b, c, h, w = x.shape
        if c != self.config.in_channels:
            raise ValueError(f"Lens needs a {self.config.in_channels}-channel latent at 1/16 size, got {tuple(x.shape)}")
        if context is None:
            raise ValueError("Lens needs text conditioning from a Lens text encoder")
        feats = context_to_features(context, self.config.num_text_layers)
        if attention_mask is None:
            mask = torch.ones(context.shape[:2], dtype=torch.bool, device=x.device)
        else:
            mask = attention_mask.to(x.device) > 0.5
        sigma = timestep.float().reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(b)
        return unpack_latents(self.velocity(pack_latents(x), sigma, feats, mask, (h, w)), h, w)


class LensBaseModel(comfy.model_base.BaseModel):
    """Flow-matching ``BaseModel`` whose conditioning is the Lens text context and mask."""

    def __init__(self, model_config, model_type=comfy.model_base.ModelType.FLUX, device=None):
        super().__init__(model_config, model_type, device=device, unet_model=LensDiffusionModel)

    def encode_adm(self, **kwargs):
        return None

    def extra_conds(self, **kwargs):
        out = super().extra_conds(**kwargs)
        context = kwargs.get("cross_attn")
        check_layers(kwargs.get("lens_layers"), self.diffusion_model.config)
        if context is not None:
            out["c_crossattn"] = LensTextCond(context)
            mask = kwargs.get("attention_mask")
            if mask is None:
                mask = torch.ones(context.shape[:2], dtype=torch.long, device=context.device)
            out["attention_mask"] = LensTextCond(mask.to(torch.long))
        return out


def check_layers(layers, config: MMDiTConfig) -> None:
    """Conditioning from a Lens text encoder names the GPT-OSS layers it holds; they must be the
    ones this MMDiT was trained on."""
    if layers is not None and tuple(layers) != tuple(config.selected_layer_index):
        raise ValueError(
            f"the conditioning holds GPT-OSS layers {list(layers)} but this Lens MMDiT reads layers "
            f"{list(config.selected_layer_index)}"
        )


def lens_cfg_function(args: dict) -> torch.Tensor:
    """``sampler_cfg_function`` giving Lens' norm-rescaled guidance in ComfyUI's samplers.

    ComfyUI hands ``x - denoised`` = ``sigma * v`` for cond and uncond; the per-token rescale is
    scale-invariant, so guiding these equals sigma times the guided velocity.
    """
    cond, uncond = args["cond"], args["uncond"]
    return cfg_combine(cond.movedim(1, -1), uncond.movedim(1, -1), float(args["cond_scale"])).movedim(-1, 1)


def _read_state_dict(path: str) -> dict:
    """A file's tensors through ComfyUI's loader, or those of every weight file of a diffusers
    ``transformer/`` folder (the built-in Lens-Toy is one)."""
    files = find_weight_files(Path(path)) if Path(path).is_dir() else [path]
    sd = {}
    for file in files:
        sd.update(comfy.utils.load_torch_file(str(file), safe_load=True))
    return sd


def _strip_prefix(sd: dict, path) -> dict:
    hits = [k for k in sd if k == MMDIT_ANCHOR or k.endswith("." + MMDIT_ANCHOR)]
    if not hits:
        raise CheckpointError(path, f"no tensor named '*{MMDIT_ANCHOR}': not a Lens MMDiT")
    prefix = min(hits, key=len)[: -len(MMDIT_ANCHOR)]
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _check_tensors(sd: dict, config: MMDiTConfig, path) -> None:
    """Names and shapes against the architecture, before anything is allocated."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in LensMMDiT(config).state_dict().items()}
    missing = [k for k in expected if k not in sd]
    extra = [k for k in sd if k not in expected]
    wrong = [k for k in expected if k in sd and tuple(sd[k].shape) != expected[k]]
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensor(s) missing, e.g. {', '.join(missing[:3])}")
        if extra:
            parts.append(f"{len(extra)} unexpected, e.g. {', '.join(extra[:3])}")
        if wrong:
            k = wrong[0]
            parts.append(f"'{k}' has shape {tuple(sd[k].shape)}, expected {expected[k]}")
        raise CheckpointError(path, "not a complete Lens MMDiT: " + "; ".join(parts))


def _pick_dtype(choice: str, parameters: int, file_dtype, load_device) -> torch.dtype:
    mm = comfy.model_management
    dtype = WEIGHT_DTYPES[choice]
    if dtype is None:
        dtype = mm.unet_dtype(model_params=parameters, supported_dtypes=SUPPORTED_DTYPES, weight_dtype=file_dtype)
        if dtype == torch.float16:  # e.g. --fp16-unet: Lens overflows in fp16
            dtype = torch.bfloat16 if mm.should_use_bf16(load_device) else torch.float32
    return dtype


def _model_config(config: MMDiTConfig, dtype: torch.dtype, manual_cast, **extra) -> LensModelConfig:
    unet_config = {f: getattr(config, f) for f in MMDiTConfig.__dataclass_fields__}
    unet_config.update(image_model="lens_core", **extra)
    model_config = LensModelConfig(unet_config)
    model_config.set_inference_dtype(dtype, manual_cast)
    return model_config


def _packed_formats(model: torch.nn.Module) -> str:
    """How many layers hold each packed format, e.g. ``"24 mxfp8"`` (for the log)."""
    counts = Counter(str(getattr(m.weight_type, "name", m.weight_type))
                     for m in model.modules() if getattr(m, "is_quantized", False))
    return ", ".join(f"{n} {fmt}" for fmt, n in sorted(counts.items())) or "none"


def fp8_matmul_requested() -> bool:
    """Whether ComfyUI was started with ``--fast fp8_matrix_mult`` (or plain ``--fast``): its switch
    for fp8 matmuls, which packed fp8 MMDiTs then follow (:func:`quant.layers.set_fp8_matmul`)."""
    return comfy.cli_args.PerformanceFeature.Fp8MatrixMultiplication in comfy.cli_args.args.fast


def _load_packed_model(path: str, config: MMDiTConfig, weight_dtype: str):
    """The MODEL for a file whose weights lens_core keeps packed (GGUF, fp8, ComfyUI quantised):
    they stay packed (decoded to ``weight_dtype`` at each call), ComfyUI's weight patches are
    applied on the fly (see :mod:`.gguf`)."""
    mm = comfy.model_management
    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    dtype = WEIGHT_DTYPES[weight_dtype] or (torch.bfloat16 if mm.should_use_bf16(load_device) else torch.float32)
    # BaseModel would allocate a dense network; lens_core builds it on the meta device and fills it instead.
    model = _model_config(config, dtype, None, disable_unet_model_creation=True).get_model({})
    mmdit = load_mmdit(path, offload_device, dtype, operations=ComfyGGMLOps)
    fp8_mm = fp8_matmul_requested()
    if fp8_mm:
        set_fp8_matmul(mmdit, True)
    model.diffusion_model = LensDiffusionModel.adopt(mmdit, dtype)
    patcher = LensModelPatcher(model, load_device=load_device, offload_device=offload_device)
    patcher.set_model_sampler_cfg_function(lens_cfg_function)
    log.info("Lens MMDiT %s: %d layers, packed layers: %s, compute %s%s", path, config.num_layers,
             _packed_formats(mmdit), dtype, ", fp8 matmul where supported" if fp8_mm else "")
    return patcher


def load_lens_model(path: str, weight_dtype: str = "default"):
    """A ComfyUI MODEL (ModelPatcher) for the Lens MMDiT file (safetensors or GGUF) or diffusers
    ``transformer/`` folder at ``path``.

    Plain float files take ComfyUI's own loading (its casting, offloading and patching); packed ones
    go through lens_core (:func:`_load_packed_model`).
    """
    mm = comfy.model_management
    config = load_mmdit_config(path)  # headers only; raises CheckpointError for other architectures
    if is_packed_mmdit(path):
        return _load_packed_model(path, config, weight_dtype)
    sd = _strip_prefix(_read_state_dict(path), path)
    _check_tensors(sd, config, path)

    load_device = mm.get_torch_device()
    offload_device = mm.unet_offload_device()
    parameters = comfy.utils.calculate_parameters(sd)
    dtype = _pick_dtype(weight_dtype, parameters, comfy.utils.weight_dtype(sd), load_device)
    manual_cast = mm.unet_manual_cast(dtype, load_device, SUPPORTED_DTYPES)

    model = _model_config(config, dtype, manual_cast).get_model(sd)

    patcher_cls = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
    patcher = patcher_cls(model, load_device=load_device, offload_device=offload_device)
    if not mm.is_device_cpu(offload_device):
        model.to(offload_device)
    dynamic = bool(getattr(patcher, "is_dynamic", lambda: False)())
    model.load_model_weights(sd, "", assign=dynamic)
    patcher.set_model_sampler_cfg_function(lens_cfg_function)
    log.info("Lens MMDiT %s: %d layers, weights %s, compute %s", path, config.num_layers, dtype, manual_cast or dtype)
    return patcher


def lens_diffusion_model(model_patcher) -> LensDiffusionModel:
    """The Lens network inside a MODEL, or a clear error for other models."""
    dm = getattr(model_patcher.model, "diffusion_model", None)
    if not isinstance(dm, LensDiffusionModel):
        raise ValueError(
            "this MODEL is not a Lens model from the Lens Model Loader "
            f"(got {type(model_patcher.model).__name__}); load it with Lens Model Loader"
        )
    return dm
