"""Read Lens LoRA files in every naming seen in the wild and merge them into a Lens MMDiT.

Pure torch + safetensors (no peft, no ComfyUI). Used by :class:`lens_core.pipeline.LensPipeline`
(``loras=``), the ``lens --lora`` flag, the ComfyUI Lens LoRA Loader (which turns the parsed
modules into ComfyUI weight patches instead of merging) and ``training`` (which writes the files).

Namings understood (see REFERENCE.md, "LoRA files in the wild"):

=============================  ==========================================================  ========
producer                       key of one module's down / up matrix                         alpha
=============================  ==========================================================  ========
ours, diffusers, PEFT          ``transformer.<path>.lora_A.weight`` / ``lora_B.weight``      metadata
ai-toolkit, diffusion-pipe     ``diffusion_model.<path>.lora_A.weight`` / ``lora_B``         tensor or metadata
OneTrainer                     ``transformer.<path>.lora_down.weight`` / ``lora_up``         ``.alpha``
musubi-tuner, kohya            ``lora_unet_<path with _>.lora_down.weight`` / ``lora_up``    ``.alpha``
=============================  ==========================================================  ========

``<path>`` is a lens_core module name such as ``transformer_blocks.0.attn.img_qkv``; any of the
prefixes ``transformer.``, ``diffusion_model.``, ``model.diffusion_model.``, ``base_model.model.``
or none is accepted, and PEFT adapter names (``lora_A.default.weight``) are dropped. LoRAs on
split projections (``attn.to_q/to_k/to_v`` for the image stream, ``attn.add_q_proj/add_k_proj/
add_v_proj`` for the text stream) are merged into the matching third of the fused ``img_qkv`` /
``txt_qkv`` weight. LyCORIS LoKr/LoHa and DoRA files are refused with a clear message.

Merging: ``W += scale * (alpha / rank) * up @ down`` computed in fp32 and rounded once to the
weight's dtype (the same function PEFT computes at run time: ``scaling = lora_alpha / r``). A
file without any alpha means ``alpha = rank`` (diffusers' convention).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

__all__ = [
    "KOHYA_PREFIXES",
    "LORA_TARGET_SUFFIXES",
    "METADATA_KEY",
    "OTHER_LINEARS",
    "PATH_PREFIXES",
    "LoraFormatError",
    "LoraModule",
    "LoraReport",
    "apply_lora",
    "check_shapes",
    "convert_lora_file",
    "kohya_name",
    "lens_lora_targets",
    "linear_module_names",
    "linear_weight_shapes",
    "load_lora_file",
    "merge_lora_",
    "parse_lora",
    "parse_lora_arg",
    "peft_metadata",
    "read_lora",
    "shapes_from_state_dict",
    "to_kohya_state_dict",
    "to_peft_state_dict",
]

LORA_TARGET_SUFFIXES: tuple[str, ...] = (
    "attn.img_qkv",
    "attn.txt_qkv",
    "attn.to_out.0",
    "attn.to_add_out",
    "img_mlp.w1",
    "img_mlp.w2",
    "img_mlp.w3",
    "txt_mlp.w1",
    "txt_mlp.w2",
    "txt_mlp.w3",
)
"""Per-block modules a Lens LoRA adapts: attention and MLP projections of both streams, not modulation."""

PATH_PREFIXES: tuple[str, ...] = (
    "base_model.model.",
    "model.diffusion_model.",
    "diffusion_model.",
    "transformer.",
)
KOHYA_PREFIXES: tuple[str, ...] = ("lora_unet_", "lora_transformer_", "lycoris_")
OTHER_LINEARS: tuple[str, ...] = (
    "txt_in",
    "img_in",
    "proj_out",
    "norm_out.linear",
    "time_text_embed.timestep_embedder.linear_1",
    "time_text_embed.timestep_embedder.linear_2",
)
"""Linears outside the blocks: not adapted by default, but a LoRA file may carry them."""
METADATA_KEY = "lora_adapter_metadata"  # diffusers' key for the JSON LoraConfig

_SPLIT_QKV = {
    "attn.to_q": ("attn.img_qkv", 0),
    "attn.to_k": ("attn.img_qkv", 1),
    "attn.to_v": ("attn.img_qkv", 2),
    "attn.add_q_proj": ("attn.txt_qkv", 0),
    "attn.add_k_proj": ("attn.txt_qkv", 1),
    "attn.add_v_proj": ("attn.txt_qkv", 2),
}
_SUFFIXES = {
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora_B.bias": "up_bias",
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".alpha": "alpha",
}
_ADAPTER_NAME = re.compile(r"\.(lora_[AB])\.[^.]+\.(weight|bias)$")
_UNSUPPORTED = {
    "lokr_w1": "LyCORIS LoKr",
    "lokr_w2": "LyCORIS LoKr",
    "hada_w1_a": "LyCORIS LoHa",
    "hada_w2_a": "LyCORIS LoHa",
    "dora_scale": "DoRA",
    "lora_magnitude_vector": "DoRA",
}


class LoraFormatError(ValueError):
    """A LoRA file that cannot be applied to this model (unknown naming, wrong shapes, unsupported type)."""


@dataclass
class LoraModule:
    """One adapted module: ``delta W = (alpha / rank) * up @ down`` on rows ``part`` of the weight.

    ``part`` is None for the whole weight, or 0/1/2 for the q/k/v third of a fused qkv weight.
    """

    target: str
    down: torch.Tensor  # [rank, in]
    up: torch.Tensor  # [out, rank]
    alpha: float | None = None
    part: int | None = None
    up_bias: torch.Tensor | None = None
    source_keys: list[str] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scaling(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


def lens_lora_targets(num_layers: int, suffixes: Iterable[str] = LORA_TARGET_SUFFIXES) -> list[str]:
    """Module names a full Lens LoRA adapts, in block order."""
    return [f"transformer_blocks.{i}.{s}" for i in range(num_layers) for s in suffixes]


def kohya_name(path: str, prefix: str = "lora_unet_") -> str:
    """``transformer_blocks.0.attn.img_qkv`` -> ``lora_unet_transformer_blocks_0_attn_img_qkv``."""
    return prefix + path.replace(".", "_")


def linear_module_names(model: nn.Module) -> list[str]:
    """Names of the modules with a 2-D ``weight`` (the ones a LoRA can adapt)."""
    return list(linear_weight_shapes(model))


def linear_weight_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{module name: (out, in)}`` of the modules with a 2-D ``weight`` (works on the meta device).

    PEFT's injected ``base_layer``/``lora_*`` sub-modules are left out (the wrapper keeps the name).
    """
    out = {}
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if w is None and hasattr(module, "add_lora"):  # quantised layer (quant.layers): logical shape
            out[name] = (int(module.out_features), int(module.in_features))
            continue
        if isinstance(w, torch.Tensor) and w.ndim == 2 and ".base_layer" not in name and ".lora_" not in name:
            out[name] = (int(w.shape[0]), int(w.shape[1]))
    return out


def shapes_from_state_dict(
    shapes: Mapping[str, Sequence[int]], prefix: str = ""
) -> dict[str, tuple[int, int]]:
    """``{module: (out, in)}`` from state-dict names ``<prefix><module>.weight`` -> shape (2-D only).

    For models whose modules cannot be walked (ComfyUI's ``diffusion_model.`` state dict).
    """
    out = {}
    for key, shape in shapes.items():
        if key.startswith(prefix) and key.endswith(".weight") and len(shape) == 2:
            out[key[len(prefix) : -len(".weight")]] = (int(shape[0]), int(shape[1]))
    return out


def _strip_path_prefix(path: str, known: set[str]) -> str | None:
    """The module name ``path`` refers to, trying the known prefixes (also stacked, e.g. ``transformer.diffusion_model.``)."""
    while True:
        if path in known:
            return path
        for p in PATH_PREFIXES:
            if path.startswith(p):
                path = path[len(p) :]
                break
        else:
            return None


def _split_target(path: str) -> tuple[str, int | None]:
    for split, (fused, part) in _SPLIT_QKV.items():
        if path.endswith("." + split):
            return path[: -len(split)] + fused, part
    return path, None


def parse_lora(
    tensors: Mapping[str, torch.Tensor],
    module_names: Iterable[str],
    metadata: Mapping[str, str] | None = None,
) -> tuple[dict[tuple[str, int | None], LoraModule], list[str]]:
    """Group a LoRA state dict by the model module it adapts.

    Args:
        tensors: the file's tensors, any naming of the module docstring.
        module_names: the model's linear module names (:func:`linear_module_names`).
        metadata: the safetensors metadata (diffusers/PEFT keep alpha there).
    Returns:
        ``({(module, part): LoraModule}, unmatched_keys)``.
    Raises:
        LoraFormatError for LoKr/LoHa/DoRA files and for a module with only one of its matrices.
    """
    known = set(module_names)
    kohya = {kohya_name(n, p): n for n in known for p in KOHYA_PREFIXES}
    for n in known:  # split q/k/v projections in kohya spelling
        if n.endswith(("attn.img_qkv", "attn.txt_qkv")):
            for split, (fused, _) in _SPLIT_QKV.items():
                if n.endswith(fused):
                    for p in KOHYA_PREFIXES:
                        kohya[kohya_name(n[: -len(fused)] + split, p)] = n[: -len(fused)] + split
    for key in tensors:
        for marker, what in _UNSUPPORTED.items():
            if marker in key:
                raise LoraFormatError(f"{what} files are not supported (tensor {key!r}); use a plain LoRA")

    default_alpha = _metadata_alpha(metadata or {})
    groups: dict[tuple[str, int | None], dict[str, torch.Tensor]] = {}
    keys_of: dict[tuple[str, int | None], list[str]] = {}
    unmatched: list[str] = []
    for key, tensor in tensors.items():
        norm = _ADAPTER_NAME.sub(r".\1.\2", key)
        suffix = next((s for s in _SUFFIXES if norm.endswith(s)), None)
        if suffix is None:
            unmatched.append(key)
            continue
        stem = norm[: -len(suffix)]
        path = kohya.get(stem) or _strip_path_prefix(stem, known | {s for s in _split_names(known)})
        if path is None:
            unmatched.append(key)
            continue
        target = _split_target(path)
        if target[0] not in known:
            unmatched.append(key)
            continue
        groups.setdefault(target, {})[_SUFFIXES[suffix]] = tensor
        keys_of.setdefault(target, []).append(key)

    modules: dict[tuple[str, int | None], LoraModule] = {}
    for target, parts in groups.items():
        if "down" not in parts or "up" not in parts:
            raise LoraFormatError(
                f"LoRA for {target[0]} has {sorted(parts)} but needs both down (lora_A) and up (lora_B) matrices"
            )
        down, up = parts["down"], parts["up"]
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise LoraFormatError(
                f"LoRA for {target[0]}: down {tuple(down.shape)} and up {tuple(up.shape)} do not form a low-rank pair"
            )
        alpha = float(parts["alpha"].float().item()) if "alpha" in parts else None
        if alpha is None:
            # diffusers/PEFT keep one lora_alpha for every module: scaling = lora_alpha / (module rank).
            alpha = default_alpha
        modules[target] = LoraModule(
            target[0], down, up, alpha, target[1], parts.get("up_bias"), keys_of[target]
        )
    return modules, unmatched


def _split_names(known: set[str]) -> list[str]:
    out = []
    for n in known:
        for split, (fused, _) in _SPLIT_QKV.items():
            if n.endswith(fused):
                out.append(n[: -len(fused)] + split)
    return out


def _metadata_alpha(metadata: Mapping[str, str]) -> float | None:
    """The file-wide ``lora_alpha`` from diffusers' ``lora_adapter_metadata`` JSON or flat keys."""
    raw = metadata.get(METADATA_KEY)
    if raw:
        try:
            cfg = json.loads(raw)
        except ValueError:
            cfg = {}
        alpha = cfg.get("transformer.lora_alpha", cfg.get("lora_alpha")) if isinstance(cfg, dict) else None
        if alpha is not None:
            return float(alpha)
    for key in ("lora_alpha", "ss_network_alpha"):
        if key in metadata:
            try:
                return float(metadata[key])
            except ValueError:
                continue
    return None


def load_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a ``.safetensors`` LoRA (pickle files are refused)."""
    from safetensors import safe_open

    path = Path(path).expanduser()
    if path.suffix.lower() != ".safetensors":
        raise LoraFormatError(f"{path}: LoRA files must be .safetensors (pickle files can run code)")
    if not path.is_file():
        raise LoraFormatError(f"{path}: LoRA file not found")
    with safe_open(str(path), framework="pt", device="cpu") as f:
        names = f.keys()  # safe_open handles are not iterable
        return {k: f.get_tensor(k) for k in names}, dict(f.metadata() or {})


def check_shapes(
    modules: Mapping[tuple[str, int | None], LoraModule], shapes: Mapping[str, Sequence[int]]
) -> None:
    """Raise LoraFormatError when a module's ``up @ down`` does not fit the weight (or its qkv third)."""
    for (name, part), lora in modules.items():
        out_features, in_features = shapes[name]
        rows = out_features // 3 if part is not None else out_features
        got = (int(lora.up.shape[0]), int(lora.down.shape[1]))
        if got != (rows, in_features):
            raise LoraFormatError(
                f"LoRA for {name}{'' if part is None else f' (qkv part {part})'} has shape "
                f"{got}, the model needs {(rows, in_features)}: a LoRA of another model size?"
            )
        if lora.up_bias is not None and tuple(lora.up_bias.shape) != (rows,):
            raise LoraFormatError(f"LoRA bias for {name} has shape {tuple(lora.up_bias.shape)}, expected {(rows,)}")


def read_lora(
    lora: str | os.PathLike | Mapping[str, torch.Tensor],
    shapes: Mapping[str, Sequence[int]],
    metadata: Mapping[str, str] | None = None,
    strict: bool = True,
) -> tuple[dict[tuple[str, int | None], LoraModule], list[str]]:
    """Read a LoRA (file or state dict, any naming) for a model whose 2-D weights have ``shapes``.

    ``shapes`` is ``{module name: (out, in)}`` (:func:`linear_weight_shapes`,
    :func:`shapes_from_state_dict`). Checks that something matched and every shape fits; with
    ``strict``, tensors that belong to no module of the model are an error, else only returned.

    Returns ``({(module, qkv part or None): LoraModule}, unmatched keys)``; nothing is merged.
    """
    if isinstance(lora, (str, os.PathLike)):
        tensors, file_meta = load_lora_file(lora)
        metadata = {**file_meta, **(metadata or {})}
        label = f"{Path(lora).name}: "
    else:
        tensors, label = dict(lora), ""
    modules, unmatched = parse_lora(tensors, shapes, metadata)
    if not modules:
        raise LoraFormatError(
            f"{label}no LoRA weights for this model found (first keys: {list(tensors)[:3]}): "
            "not a Lens LoRA, or an unknown naming"
        )
    if unmatched and strict:
        raise LoraFormatError(
            f"{label}{len(unmatched)} LoRA tensor(s) match no module of this model, e.g. {unmatched[:3]} "
            "(LoRA for another model? pass strict=False to apply the rest)"
        )
    check_shapes(modules, shapes)
    return modules, unmatched


@dataclass
class LoraReport:
    """What :func:`apply_lora` did: modules changed and keys it could not place."""

    applied: list[str]
    unmatched: list[str]


@torch.no_grad()
def merge_lora_(
    model: nn.Module, modules: Mapping[tuple[str, int | None], LoraModule], scale: float = 1.0
) -> list[str]:
    """Add every LoRA delta into the model's weights in place; returns the changed module names."""
    changed = []
    for (name, part), lora in modules.items():
        module = model.get_submodule(name)
        if hasattr(module, "add_lora"):  # quantised layer: the delta is added at each call instead
            third = module.out_features // 3
            rows = None if part is None else (part * third, (part + 1) * third)
            module.add_lora(lora.down, lora.up, lora.scaling * scale, rows, lora.up_bias)
            changed.append(name)
            continue
        weight = module.weight
        if not (isinstance(weight, torch.Tensor) and weight.is_floating_point()):
            raise LoraFormatError(
                f"{name}: weight is not a plain float tensor (quantised?); cannot merge a LoRA"
            )
        delta = (lora.up.to(weight.device, torch.float32) @ lora.down.to(weight.device, torch.float32)) * (
            lora.scaling * scale
        )
        rows = weight.shape[0] // 3 if part is not None else weight.shape[0]
        if delta.shape != (rows, weight.shape[1]):
            raise LoraFormatError(
                f"LoRA for {name}{'' if part is None else f' (qkv part {part})'} has shape "
                f"{tuple(delta.shape)}, the model needs {(rows, weight.shape[1])}: a LoRA of another model size?"
            )
        view = weight if part is None else weight[part * rows : (part + 1) * rows]
        view.copy_((view.float() + delta).to(weight.dtype))
        if lora.up_bias is not None:
            bias = module.bias
            if bias is None:
                raise LoraFormatError(f"{name}: LoRA has a bias but the layer has none")
            b = bias if part is None else bias[part * rows : (part + 1) * rows]
            b.copy_(
                (b.float() + lora.up_bias.to(b.device, torch.float32) * (lora.scaling * scale)).to(b.dtype)
            )
        changed.append(name)
    return changed


def apply_lora(
    model: nn.Module,
    lora: str | os.PathLike | Mapping[str, torch.Tensor],
    scale: float = 1.0,
    metadata: Mapping[str, str] | None = None,
    strict: bool = True,
) -> LoraReport:
    """Merge a LoRA (file path or state dict, any supported naming) into a lens_core LensMMDiT.

    ``scale`` multiplies the LoRA (ComfyUI's strength; negative values subtract it again).
    With ``strict`` any tensor that does not belong to a module of the model raises
    LoraFormatError (a LoRA for another model); otherwise such keys are only reported.
    """
    modules, unmatched = read_lora(lora, linear_weight_shapes(model), metadata, strict)
    return LoraReport(merge_lora_(model, modules, scale), unmatched)


# ---------------------------------------------------------------------------------------------
# Conversions between namings
# ---------------------------------------------------------------------------------------------


def to_peft_state_dict(
    modules: Mapping[tuple[str, int | None], LoraModule], prefix: str = "transformer."
) -> dict[str, torch.Tensor]:
    """diffusers/PEFT naming ``<prefix><path>.lora_A.weight`` / ``lora_B.weight`` (alpha goes in metadata)."""
    out = {}
    for (name, part), m in modules.items():
        if part is not None:
            name = _split_name(name, part)
        out[f"{prefix}{name}.lora_A.weight"] = m.down
        out[f"{prefix}{name}.lora_B.weight"] = m.up
        if m.up_bias is not None:
            out[f"{prefix}{name}.lora_B.bias"] = m.up_bias
    return out


def to_kohya_state_dict(
    modules: Mapping[tuple[str, int | None], LoraModule], prefix: str = "lora_unet_"
) -> dict[str, torch.Tensor]:
    """kohya/musubi naming: ``lora_unet_<path_>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``."""
    out = {}
    for (name, part), m in modules.items():
        if m.up_bias is not None:
            raise LoraFormatError(f"{name}: kohya LoRA files have no bias term")
        if part is not None:
            name = _split_name(name, part)
        k = kohya_name(name, prefix)
        out[f"{k}.lora_down.weight"] = m.down
        out[f"{k}.lora_up.weight"] = m.up
        out[f"{k}.alpha"] = torch.tensor(
            float(m.alpha if m.alpha is not None else m.rank), dtype=torch.float32
        )
    return out


def _split_name(fused_name: str, part: int) -> str:
    for split, (fused, p) in _SPLIT_QKV.items():
        if fused_name.endswith(fused) and p == part:
            return fused_name[: -len(fused)] + split
    raise LoraFormatError(f"{fused_name} has no split q/k/v names")


def convert_lora_file(
    src: str | os.PathLike, dst: str | os.PathLike, to: str, num_layers: int | None = None
) -> Path:
    """Rewrite a LoRA file in ``to`` = ``"kohya"`` or ``"peft"`` naming (atomically).

    The module names are taken from the file itself when ``num_layers`` is None.
    """
    from .safetensors_io import save_file_atomic

    tensors, metadata = load_lora_file(src)
    if num_layers is None:
        blocks = [int(m.group(1)) for k in tensors if (m := re.search(r"transformer_blocks[._](\d+)[._]", k))]
        if not blocks:
            raise LoraFormatError(f"{src}: no transformer_blocks.N modules found")
        num_layers = max(blocks) + 1
    names = lens_lora_targets(num_layers, (*LORA_TARGET_SUFFIXES, "img_mod.1", "txt_mod.1")) + list(
        OTHER_LINEARS
    )
    modules, unmatched = parse_lora(tensors, names, metadata)
    if unmatched:
        raise LoraFormatError(f"{src}: {len(unmatched)} tensor(s) of unknown naming, e.g. {unmatched[:3]}")
    if to == "kohya":
        out = to_kohya_state_dict(modules)
        meta = {"ss_network_module": "networks.lora", "lens_lora_source": Path(src).name}
    elif to == "peft":
        out = to_peft_state_dict(modules)
        ranks = {m.rank for m in modules.values()}
        alphas = {m.alpha for m in modules.values()}
        if len(ranks) != 1 or len(alphas) != 1:
            raise LoraFormatError("PEFT naming keeps one rank and alpha per file; this LoRA mixes several")
        rank, alpha = ranks.pop(), alphas.pop()
        meta = peft_metadata(rank, alpha if alpha is not None else rank, sorted({n for n, _ in modules}))
    else:
        raise ValueError(f"unknown LoRA naming {to!r}; choose 'kohya' or 'peft'")
    return save_file_atomic(out, dst, meta)


def parse_lora_arg(text: str) -> tuple[str, float]:
    """``FILE[:SCALE]`` (the CLI's ``--lora``) -> ``(FILE, SCALE)``; no scale means 1.0.

    Only a final ``:<number>`` is a scale, so paths with colons (``C:\\x.safetensors``) still work.
    """
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            scale = float(tail)
        except ValueError:
            pass
        else:
            if math.isfinite(scale):
                return path, scale
            raise ValueError(f"LoRA scale must be a finite number, got {tail!r} in {text!r}")
    return text, 1.0


def peft_metadata(rank: int, alpha: float, target_modules: Iterable[str]) -> dict[str, str]:
    """safetensors metadata diffusers reads back (``lora_adapter_metadata``) plus flat copies."""
    cfg = {
        "transformer.r": int(rank),
        "transformer.lora_alpha": float(alpha),
        "transformer.target_modules": sorted(set(target_modules)),
        "transformer.bias": "none",
        "transformer.use_dora": False,
        "transformer.use_rslora": False,
    }
    return {
        "format": "pt",
        METADATA_KEY: json.dumps(cfg, sort_keys=True),
        "lora_rank": str(int(rank)),
        "lora_alpha": str(float(alpha)),
        "modelspec.architecture": "lens/lora",
    }
