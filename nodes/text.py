"""The GPT-OSS feature encoder as a ComfyUI ``CLIP``.

``LensClip`` has the methods stock nodes call on a CLIP (``tokenize``,
``encode_from_tokens_scheduled``, ``encode_from_tokens``), so ``CLIPTextEncode`` works with it.
Its conditioning is the Lens layout described in :mod:`.lens_bridge`. llama.cpp GGUF encoders keep
their quantised weights and experts (see :mod:`.gguf`); their tokenizer comes from the GGUF metadata.
"""

from __future__ import annotations

import logging
from pathlib import Path

import comfy.model_management
import comfy.ops
import torch

from lens_core.loading import default_dtype, is_gguf, load_mmdit_config, load_text_encoder
from lens_core.pipeline import find_tokenizer
from lens_core.prompt import split_features, tokenize_prompts
from lens_core.text_encoder import DEFAULT_SELECTED_LAYERS

from .gguf import ComfyGGMLOps, LensModelPatcher
from .lens_bridge import conditioning_from_text

log = logging.getLogger("ComfyUI-Lens")

TOKENS_KEY = "lens"
DTYPES = {"default": None, "bf16": torch.bfloat16, "fp32": torch.float32}


def eager_ops(base=comfy.ops.disable_weight_init):
    """ComfyUI's casting layers, always allocated eagerly.

    lens_core builds models on the meta device and fills them from the file; ComfyUI's lazily
    allocated layers (dynamic VRAM) would hide their weights from that check, so the layers with
    a lazy path get the plain state-dict loader back.
    """

    class Linear(base.Linear):
        def _load_from_state_dict(self, *args, **kwargs):
            return torch.nn.Module._load_from_state_dict(self, *args, **kwargs)

    class Embedding(base.Embedding):
        def _load_from_state_dict(self, *args, **kwargs):
            return torch.nn.Module._load_from_state_dict(self, *args, **kwargs)

    return type("LensEagerOps", (base,), {"Linear": Linear, "Embedding": Embedding})


def _pick_dtype(choice: str, device: torch.device) -> torch.dtype:
    dtype = DTYPES[choice]
    if dtype is not None:
        return dtype
    if device.type == "cpu":
        return default_dtype(device)
    return torch.bfloat16 if comfy.model_management.should_use_bf16(device) else torch.float32


class LensClip:
    """GPT-OSS encoder + o200k_harmony tokenizer behind ComfyUI's CLIP interface."""

    def __init__(self, patcher, tokenizer, layers=DEFAULT_SELECTED_LAYERS, path: str | Path | None = None):
        self.patcher = patcher
        self.tokenizer = tokenizer
        self.layers = tuple(layers)
        self.path = Path(path) if path is not None else None  # the checkpoint: the local reasoner reads its LM head

    @property
    def encoder(self):
        return self.patcher.model

    def clone(self):
        return LensClip(self.patcher.clone(), self.tokenizer, self.layers, self.path)

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        return self.patcher.add_patches(patches, strength_patch, strength_model)

    def get_key_patches(self):
        return self.patcher.get_key_patches()

    def load_model(self, tokens=None):
        # Whole: the MXFP4 experts and attention sinks are not layers ComfyUI can stream.
        comfy.model_management.load_models_gpu([self.patcher], force_full_load=True)
        return self.patcher

    def tokenize(self, text, return_word_ids=False, **kwargs):
        """Harmony-rendered token ids; a blank prompt gives no tokens (the empty negative prompt)."""
        if not str(text).strip():
            return {TOKENS_KEY: [[]]}
        ids, _ = tokenize_prompts([str(text)], self.tokenizer)
        return {TOKENS_KEY: [[(int(i), 1.0) for i in ids[0].tolist()]]}

    @torch.inference_mode()
    def _encode(self, tokens) -> tuple[list[torch.Tensor], torch.Tensor]:
        rows = [[int(t[0]) for t in row] for row in tokens[TOKENS_KEY]]
        width = self.encoder.config.hidden_size
        out_device = comfy.model_management.intermediate_device()
        if all(len(r) == 0 for r in rows):
            b = len(rows)
            feats = [torch.zeros((b, 0, width), device=out_device) for _ in self.layers]
            return feats, torch.zeros((b, 0), dtype=torch.bool, device=out_device)
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = True
        self.load_model()
        device = self.patcher.load_device
        feats = self.encoder(ids.to(device), mask.to(device))
        feats, mask = split_features(feats, mask)
        return [f.to(out_device) for f in feats], mask.to(out_device)

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        feats, mask = self._encode(tokens)
        [[context, extras]] = conditioning_from_text(feats, mask, self.layers)
        if return_dict:
            return {"cond": context, **extras}
        if return_pooled:
            return context, None
        return context

    def encode_from_tokens_scheduled(self, tokens, unprojected=False, add_dict=None, show_pbar=True):
        feats, mask = self._encode(tokens)
        conditioning = conditioning_from_text(feats, mask, self.layers)
        if add_dict:
            conditioning[0][1].update(add_dict)
        return conditioning

    def encode(self, text):
        return self.encode_from_tokens_scheduled(self.tokenize(text))


def encoder_layers(path: Path) -> tuple[int, ...]:
    """The GPT-OSS layers to return: those the MMDiT of the same pipeline folder reads, when the
    encoder is a pipeline's ``text_encoder/`` (Lens-Toy, 4 layers, reads 0-3), else Lens' 5, 11, 17, 23.
    The Lens Text Encoder Loader does not see the MMDiT, so the folder is what pairs them."""
    root = path.parent
    if path.is_dir() and (root / "model_index.json").is_file() and (root / "transformer").is_dir():
        return tuple(load_mmdit_config(root / "transformer").selected_layer_index)
    return DEFAULT_SELECTED_LAYERS


def load_lens_clip(path: str | Path, weight_dtype: str = "default", device_choice: str = "default") -> LensClip:
    """A LensClip for a GPT-OSS file or HF folder (bf16 or MXFP4 experts), or a llama.cpp GGUF."""
    mm = comfy.model_management
    if device_choice == "cpu":
        load_device = offload_device = torch.device("cpu")
    else:
        load_device, offload_device = mm.text_encoder_device(), mm.text_encoder_offload_device()
    dtype = _pick_dtype(weight_dtype, load_device)
    path = Path(path)
    tokenizer = find_tokenizer(path)
    operations = ComfyGGMLOps if is_gguf(path) else eager_ops()
    layers = encoder_layers(path)
    encoder = load_text_encoder(path, layers, offload_device, dtype, operations=operations)
    patcher = LensModelPatcher(encoder, load_device=load_device, offload_device=offload_device)
    log.info("Lens text encoder %s: %s, layers %s, tokenizer %s", path, dtype, list(layers), tokenizer.source)
    return LensClip(patcher, tokenizer, layers, path)
