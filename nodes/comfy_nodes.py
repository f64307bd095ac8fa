"""The Lens nodes (ComfyUI V3 API). Each one translates ComfyUI types into one lens_core call."""

from __future__ import annotations

import logging
import warnings

import comfy.model_management
import torch
from comfy_api.latest import ComfyExtension, io, ui
from typing_extensions import override

from lens_core.pipeline import DEFAULT_MODEL_DIR, declared_resolution
from lens_core.reasoner import MODES as REASONER_MODES
from lens_core.reasoner import ON_ERROR as REASONER_ON_ERROR
from lens_core.reasoner import ReasonerSettings
from lens_core.resolution import (
    ASPECT_RATIOS,
    BASE_RESOLUTIONS,
    LensResolutionWarning,
    aspect_label,
    scaled_bucket,
    snap_to_multiple,
    validate_size,
)
from lens_core.sampling import PRESETS

from . import files
from .lens_bridge import LATENT_CHANNELS, PATCH
from .lora import load_lens_lora
from .model import WEIGHT_DTYPES, load_lens_model
from .reasoner import preview_text, refine_prompt
from .sampling import LensGuider, LensNoise, latent_grid, resolve_preset, sample, schedule
from .text import DTYPES, load_lens_clip
from .vae import load_lens_vae

log = logging.getLogger("ComfyUI-Lens")

CATEGORY = "Lens"
SEED_MAX = 0xFFFFFFFFFFFFFFFF
ASPECT_CHOICES = [aspect_label(a) for a in ASPECT_RATIOS]
MODES = ["bucket", "custom"]
# Lens Resolution's base choices: the official bucket families, then the base Lens-Toy was trained at.
TOY_BASE = declared_resolution(DEFAULT_MODEL_DIR / "transformer")
BASE_CHOICES = {str(b): b for b in BASE_RESOLUTIONS} | {f"{TOY_BASE} (Lens-Toy)": TOY_BASE}


class LensModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LensModelLoader",
            display_name="Lens Model Loader",
            category=CATEGORY,
            description="Loads a Lens MMDiT (lens_bf16 / lens_turbo_bf16, or a GGUF such as lens-Q4_K.gguf) as a "
                        "MODEL that KSampler, SamplerCustomAdvanced and Lens Sampler can use.",
            inputs=[
                io.Combo.Input("unet_name", options=files.model_choices("diffusion_models", gguf=True),
                               default=files.BUILTIN,
                               tooltip=f"Lens MMDiT: {files.BUILTIN} is Lens-Toy, the small model that ships with "
                                       "this extension (128x128 flat shapes, nothing to download); or a file in "
                                       "models/diffusion_models (or models/unet): safetensors, or GGUF (made with "
                                       "lens-quantize; quantised weights stay quantised and are decoded layer by "
                                       "layer, LoRAs apply on top)."),
                io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPES), default="default",
                               tooltip="Dtype to hold the weights in (GGUF: to decode them to). default: ComfyUI's "
                                       "choice for this device (bf16 on recent GPUs, fp32 on CPU). fp16 is never "
                                       "used: Lens overflows in it."),
            ],
            outputs=[io.Model.Output(tooltip="The Lens denoiser.")],
        )

    @classmethod
    def execute(cls, unet_name, weight_dtype) -> io.NodeOutput:
        return io.NodeOutput(load_lens_model(str(files.resolve("diffusion_models", unet_name)), weight_dtype))


class LensTextEncoderLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LensTextEncoderLoader",
            display_name="Lens Text Encoder Loader",
            category=CATEGORY,
            description="Loads the GPT-OSS-20B feature encoder Lens reads its prompt features from.",
            inputs=[
                io.Combo.Input("text_encoder_name",
                               options=files.model_choices("text_encoders", folders=True, gguf=True),
                               default=files.BUILTIN,
                               tooltip=f"GPT-OSS encoder: {files.BUILTIN} is Lens-Toy's (use it with the Lens-Toy "
                                       "model); or one in models/text_encoders: a safetensors file, a Hugging Face "
                                       "folder (listed with a trailing '/', e.g. gpt-oss-20b/; MXFP4 experts are kept "
                                       "MXFP4), or a llama.cpp GGUF (e.g. gpt-oss-20b-Q4_K_M.gguf; stays quantised, "
                                       "tokenizer from the file). Reads only the layers the MMDiT uses: 5, 11, 17 and 23 for "
                                       "Lens (so layers 0-23 are loaded), those of its own pipeline for Lens-Toy."),
                io.Combo.Input("weight_dtype", options=list(DTYPES), default="default",
                               tooltip="Dtype of the non-MXFP4 weights. default: bf16 on GPUs that support it, else fp32."),
                io.Combo.Input("device", options=["default", "cpu"], default="default",
                               tooltip="Where the encoder runs. cpu keeps the 20B encoder out of GPU memory (slow)."),
            ],
            outputs=[io.Clip.Output(tooltip="The Lens text encoder; use it with Lens Text Encode or CLIP Text Encode.")],
        )

    @classmethod
    def execute(cls, text_encoder_name, weight_dtype, device) -> io.NodeOutput:
        path = files.resolve("text_encoders", text_encoder_name)
        return io.NodeOutput(load_lens_clip(path, weight_dtype, device))


class LensVAELoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LensVAELoader",
            display_name="Lens VAE Loader",
            category=CATEGORY,
            description="Loads the FLUX.2 VAE with Lens' latent normalisation; works with VAE Decode / VAE Encode.",
            inputs=[
                io.Combo.Input("vae_name", options=files.model_choices("vae", folders=True), default=files.BUILTIN,
                               tooltip=f"FLUX.2-architecture VAE: {files.BUILTIN} is Lens-Toy's; or one in models/vae "
                                       "(flux2-vae.safetensors, ae.safetensors, or a diffusers vae/ folder); both "
                                       "naming schemes load."),
                io.Combo.Input("weight_dtype", options=list(DTYPES), default="default",
                               tooltip="default: bf16 on GPUs that support it, else fp32."),
            ],
            outputs=[io.Vae.Output(tooltip="The Lens VAE (128-channel latents at 1/16 size).")],
        )

    @classmethod
    def execute(cls, vae_name, weight_dtype) -> io.NodeOutput:
        return io.NodeOutput(load_lens_vae(files.resolve("vae", vae_name), weight_dtype))


class LensTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LensTextEncode",
            display_name="Lens Text Encode",
            category=CATEGORY,
            description="Encodes a prompt into the four GPT-OSS layer features Lens is conditioned on. "
                        "An empty prompt gives the empty negative (no text).",
            inputs=[
                io.Clip.Input("clip", tooltip="The Lens text encoder (Lens Text Encoder Loader)."),
                io.String.Input("prompt", multiline=True, dynamic_prompts=True, default="",
                                tooltip="The prompt. Lens wraps it in its fixed GPT-OSS conversation; long prompts are "
                                        "cut at 512 tokens including that wrapper."),
            ],
            outputs=[io.Conditioning.Output(tooltip="Layer features [B, S, 4 x 2880] and their attention mask.")],
        )

    @classmethod
    def execute(cls, clip, prompt) -> io.NodeOutput:
        if clip is None:
            raise RuntimeError("Lens Text Encode: the clip input is empty; connect a Lens Text Encoder Loader")
        return io.NodeOutput(clip.encode_from_tokens_scheduled(clip.tokenize(prompt)))


class LensResolution(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LensResolution",
            display_name="Lens Resolution",
            category=CATEGORY,
            description="Picks one of the sizes Lens was trained on (or a custom one) and makes the empty latent.",
            inputs=[
                io.Combo.Input("mode", options=MODES, default="bucket",
                               tooltip="bucket: a trained size from base resolution x aspect ratio. custom: width and "
                                       "height below, snapped to multiples of 16."),
                io.Combo.Input("base_resolution", options=list(BASE_CHOICES), default="1024",
                               tooltip=f"Bucket family (about 1024x1024 or 1440x1440 pixels); {TOY_BASE} for the "
                                       f"built-in Lens-Toy, trained at {TOY_BASE}x{TOY_BASE} (its buckets are Lens' "
                                       "1024 ones scaled down)."),
                io.Combo.Input("aspect_ratio", options=ASPECT_CHOICES, default=aspect_label("1:1"),
                               tooltip="Width:height of the bucket."),
                io.Int.Input("width", default=1024, min=16, max=8192, step=16,
                             tooltip="custom mode only: image width, snapped to a multiple of 16."),
                io.Int.Input("height", default=1024, min=16, max=8192, step=16,
                             tooltip="custom mode only: image height, snapped to a multiple of 16."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Images per run."),
            ],
            outputs=[
                io.Int.Output(display_name="width", tooltip="Image width in pixels."),
                io.Int.Output(display_name="height", tooltip="Image height in pixels."),
                io.Latent.Output(display_name="latent", tooltip="Empty 128-channel latent at 1/16 of the size."),
            ],
        )

    @classmethod
    def execute(cls, mode, base_resolution, aspect_ratio, width, height, batch_size) -> io.NodeOutput:
        if mode == "custom":
            width, height = snap_to_multiple(width), snap_to_multiple(height)
        else:
            width, height = scaled_bucket(BASE_CHOICES[base_resolution], aspect_ratio)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", LensResolutionWarning)
            validate_size(width, height)
        for w in caught:
            log.warning("Lens Resolution: %s", w.message)
        latent = torch.zeros([batch_size, LATENT_CHANNELS, height // PATCH, width // PATCH],
                             device=comfy.model_management.intermediate_device())
        return io.NodeOutput(width, height, {"samples": latent})


class LensScheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LensScheduler",
            display_name="Lens Scheduler",
            category=CATEGORY,
            description="Lens' noise schedule: evenly spaced sigmas shifted by the empirical mu for this "
                        "latent's token count and step count.",
            inputs=[
                io.Latent.Input("latent", tooltip="The latent to be sampled (its size sets the shift)."),
                io.Int.Input("steps", default=20, min=1, max=1000, tooltip="Sampling steps (lens 20, base 50, turbo 4)."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Below 1, only the last part of a longer schedule is run."),
            ],
            outputs=[io.Sigmas.Output(tooltip="steps + 1 sigmas from 1 to 0.")],
        )

    @classmethod
    def execute(cls, latent, steps, denoise) -> io.NodeOutput:
        _, h, w = latent_grid(latent["samples"])
        return io.NodeOutput(schedule(steps, (h, w), denoise))


class LensGuiderNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LensGuider",
            display_name="Lens Guider",
            category=CATEGORY,
            description="Classifier-free guidance as Lens does it: cond and uncond in one batch, the guided "
                        "velocity rescaled per token to the conditional one's norm.",
            inputs=[
                io.Model.Input("model", tooltip="A Lens MODEL."),
                io.Conditioning.Input("positive", tooltip="The prompt's conditioning."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Negative prompt; left unconnected it is the empty prompt (no text)."),
                io.Float.Input("cfg", default=5.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Guidance scale (lens 5, base 4, turbo 1 = no uncond pass)."),
            ],
            outputs=[io.Guider.Output(tooltip="For SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, model, positive, cfg, negative=None) -> io.NodeOutput:
        guider = LensGuider(model)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        return io.NodeOutput(guider)


class LensNoiseNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LensNoise",
            display_name="Lens Noise",
            category=CATEGORY,
            description="Seeded noise drawn exactly as the lens CLI draws it, so a seed gives the same image.",
            inputs=[
                io.Int.Input("noise_seed", default=0, min=0, max=SEED_MAX, control_after_generate=True,
                             tooltip="The seed."),
            ],
            outputs=[io.Noise.Output(tooltip="For SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, noise_seed) -> io.NodeOutput:
        return io.NodeOutput(LensNoise(noise_seed))


class LensSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LensSampler",
            display_name="Lens Sampler",
            category=CATEGORY,
            description="Text to image with Lens' own sampler (Euler, empirical-mu schedule, norm-rescaled CFG). "
                        "The same seed, steps, cfg and size give the same image as the lens command line.",
            inputs=[
                io.Model.Input("model", tooltip="A Lens MODEL (Lens Model Loader)."),
                io.Conditioning.Input("positive", tooltip="The prompt's conditioning (Lens Text Encode)."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Negative prompt; left unconnected it is the empty prompt (zero features, "
                                              "no visible tokens). Unused when cfg is 1."),
                io.Latent.Input("latent", tooltip="Empty latent from Lens Resolution: only its size and batch are used."),
                io.Combo.Input("preset", options=list(PRESETS), default="lens",
                               tooltip="Defaults for steps/cfg left at 0: lens 20 steps cfg 5, base 50 steps cfg 4, "
                                       "turbo 4 steps cfg 1 (for lens_turbo)."),
                io.Int.Input("steps", default=20, min=0, max=1000, tooltip="Sampling steps; 0 = the preset's."),
                io.Float.Input("cfg", default=5.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Guidance scale; 1 skips the unconditional pass; 0 = the preset's."),
                io.Int.Input("seed", default=0, min=0, max=SEED_MAX, control_after_generate=True,
                             tooltip="Noise seed (the lens CLI's --seed)."),
            ],
            outputs=[io.Latent.Output(tooltip="The sampled latent; decode it with VAE Decode and the Lens VAE.")],
        )

    @classmethod
    def execute(cls, model, positive, latent, preset, steps, cfg, seed, negative=None) -> io.NodeOutput:
        steps, cfg = resolve_preset(preset, steps, cfg)
        return io.NodeOutput(sample(model, positive, negative, latent, steps, cfg, seed))


class LensLoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LensLoraLoader",
            display_name="Lens LoRA Loader",
            category=CATEGORY,
            description="Applies a Lens LoRA to a Lens MODEL as ComfyUI weight patches (unpatched again when "
                        "the model is unloaded). Reads every common naming: diffusers/PEFT and OneTrainer "
                        "('transformer.'), ai-toolkit ('diffusion_model.'), kohya/musubi ('lora_unet_'), split "
                        "q/k/v. LoRAs trained on base Lens also work on Lens Turbo.",
            inputs=[
                io.Model.Input("model", tooltip="A Lens MODEL (Lens Model Loader, or ComfyUI's Load Diffusion Model "
                                                "for a Lens file)."),
                io.Combo.Input("lora_name", options=files.model_choices("loras"),
                               tooltip="LoRA safetensors file in models/loras."),
                io.Float.Input("strength", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="LoRA strength: 0 leaves the model as it is, negative values subtract it."),
            ],
            outputs=[io.Model.Output(tooltip="The MODEL with the LoRA patched in.")],
        )

    @classmethod
    def execute(cls, model, lora_name, strength) -> io.NodeOutput:
        if strength == 0:
            return io.NodeOutput(model)
        return io.NodeOutput(load_lens_lora(model, files.resolve("loras", lora_name), strength))


def _reasoner_key(**kw) -> tuple:
    """The widget values that decide a rewrite (not the CLIP object)."""
    names = ("prompt", "mode", "api_base_url", "api_model", "api_key_env", "system_prompt", "seed",
             "temperature", "max_new_tokens", "on_error")
    return tuple(str(kw.get(n, "")) for n in names)


_REASONER_FALLBACKS: dict[tuple, int] = {}  # widget values -> times the rewrite fell back


class LensReasoner(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LensReasoner",
            display_name="Lens Reasoner",
            category=CATEGORY,
            description="Rewrites a short prompt into the dense description Lens was trained on, with the "
                        "GPT-OSS weights of the Lens text encoder (local) or an OpenAI-compatible server (api). "
                        "Connect its STRING to Lens Text Encode's prompt. Rewrites are cached.",
            inputs=[
                io.String.Input("prompt", multiline=True, dynamic_prompts=True, default="",
                                tooltip="Your prompt; an empty prompt stays empty."),
                io.Combo.Input("mode", options=list(REASONER_MODES), default="local",
                               tooltip="off: pass the prompt through. local: generate with the connected Lens CLIP's "
                                       "GPT-OSS weights (needs the full gpt-oss-20b checkpoint with its LM head). "
                                       "api: POST {api_base_url}/chat/completions."),
                io.Clip.Input("clip", optional=True,
                              tooltip="The Lens text encoder (Lens Text Encoder Loader); needed for local mode."),
                io.String.Input("api_base_url", default="",
                                tooltip="api mode: server root, e.g. https://api.openai.com/v1 or "
                                        "http://127.0.0.1:8000/v1. Nothing is contacted in the other modes."),
                io.String.Input("api_model", default="", tooltip="api mode: model name the server expects."),
                io.String.Input("api_key_env", default="OPENAI_API_KEY",
                                tooltip="api mode: NAME of the environment variable that holds the API key (the "
                                        "key itself never goes into the workflow). Unset variable = no key sent."),
                io.String.Input("system_prompt", multiline=True, default="", optional=True,
                                tooltip="Instructions for the rewriter; empty = Lens' built-in system prompt."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF,
                             control_after_generate=io.ControlAfterGenerate.fixed,
                             tooltip="Sampling seed: the same seed and settings give the same rewrite (cached). "
                                     "Set the control to randomize for a new rewrite every run."),
                io.Float.Input("temperature", default=0.7, min=0.0, max=2.0, step=0.05,
                               tooltip="Sampling temperature; 0 = greedy (local mode)."),
                io.Int.Input("max_new_tokens", default=4096, min=1, max=32768,
                             tooltip="Most tokens to generate, the reasoning (analysis channel) included."),
                io.Combo.Input("on_error", options=list(REASONER_ON_ERROR), default="fail",
                               tooltip="fail: stop the workflow with the reasoner's error. passthrough: use the prompt "
                                       "unchanged (the node shows why); re-queueing then tries again."),
            ],
            outputs=[io.String.Output(display_name="refined_prompt",
                                      tooltip="The rewritten prompt; connect it to Lens Text Encode's prompt.")],
        )

    @classmethod
    def fingerprint_inputs(cls, **kw):
        # ComfyUI re-runs the node when this changes: after a fallback, so that re-queueing retries.
        return _REASONER_FALLBACKS.get(_reasoner_key(**kw), 0)

    @classmethod
    def execute(cls, prompt, mode, api_base_url, api_model, api_key_env, seed, temperature, max_new_tokens,
                on_error, clip=None, system_prompt="") -> io.NodeOutput:
        settings = ReasonerSettings(
            mode=mode, system_prompt=system_prompt or None, on_error=on_error, temperature=float(temperature),
            max_new_tokens=int(max_new_tokens), seed=int(seed), api_base_url=api_base_url.strip(),
            api_model=api_model.strip(), api_key_env=api_key_env.strip() or "OPENAI_API_KEY",
        )
        result = refine_prompt(prompt, settings, clip)
        if result.fell_back:
            key = _reasoner_key(prompt=prompt, mode=mode, api_base_url=api_base_url, api_model=api_model,
                                api_key_env=api_key_env, system_prompt=system_prompt, seed=seed,
                                temperature=temperature, max_new_tokens=max_new_tokens, on_error=on_error)
            _REASONER_FALLBACKS[key] = _REASONER_FALLBACKS.get(key, 0) + 1
        elif result.mode != "off":
            log.info("Lens Reasoner (%s%s): %s", result.mode, ", cached" if result.cached else "", result.text)
        return io.NodeOutput(result.text, ui=ui.PreviewText(preview_text(result)))


NODES = [
    LensModelLoader,
    LensTextEncoderLoader,
    LensVAELoader,
    LensTextEncode,
    LensResolution,
    LensScheduler,
    LensGuiderNode,
    LensNoiseNode,
    LensSampler,
    LensLoraLoader,
    LensReasoner,
]


class LensExtension(ComfyExtension):
    @override
    async def on_load(self) -> None:
        files.register_gguf_folders()

    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
