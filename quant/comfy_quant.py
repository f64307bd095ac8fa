"""ComfyUI's quantised safetensors checkpoints: read them with their weights kept packed, write them.

What ComfyUI files hold (all read here, weights kept in their packed format, :mod:`quant.fp_formats`):

* **plain fp8**: ``<layer>.weight`` stored as ``F8_E4M3``/``F8_E5M2``, nothing else (value = fp8);
* **scaled fp8** (ComfyUI's older ``*_fp8_scaled`` files): a marker tensor ``scaled_fp8`` (under
  the model prefix) and ``<layer>.scale_weight`` (value = fp8 * scale); ``<layer>.scale_input`` is
  only used by fp8 matmuls and is ignored;
* **mixed precision** (``comfy_quant``): per quantised layer a uint8 tensor ``<layer>.comfy_quant``
  holding JSON ``{"format": ...}`` (or one ``_quantization_metadata`` JSON entry in the file
  metadata, ``{"layers": {layer: {"format": ...}}}``).  Formats: ``float8_e4m3fn`` /
  ``float8_e5m2`` (``weight`` + fp32 ``weight_scale``), ``mxfp8`` (``weight`` fp8 + tiled E8M0
  ``weight_scale``), ``nvfp4`` (``weight`` uint8 + tiled fp8 ``weight_scale`` + fp32
  ``weight_scale_2``); ``input_scale`` is ignored.  Layers without ``comfy_quant`` are plain
  bf16/fp32.  ComfyUI's GPT-OSS keeps its experts as banks ``mlp.experts.gate_up_proj.weight``
  ``[E, 2I, H]`` and ``down_proj.weight`` ``[E, H, I]`` (``[out, in]`` per expert, with ``.bias``;
  ``comfy_quant`` adds ``num_experts``), loaded here by :class:`ExpertBanks`.

:class:`PackedSource` presents such a file to :func:`lens_core.loading.build_and_load`: every
quantised layer is one ``<layer>.weight`` entry whose value is a packed weight (its scale tensors
are folded in), so the usual name/shape checks and the one-tensor-at-a-time loading apply.
MXFP8/NVFP4 matrices are stored zero-padded to multiples of 32/16 and the file does not say by how
much, so their sizes are read as the padded ones (Lens's sizes are all multiples of 32).

Writers: :func:`convert_mmdit_comfy` (``lens-quantize --type fp8_e4m3fn|fp8_scaled|mxfp8|nvfp4``,
streaming) and :func:`write_gpt_oss_comfy` (a GPT-OSS encoder with packed expert banks and an
embedded ``tokenizer_json``, the layout of Comfy-Org's ``gpt_oss_20b_nvfp4``).
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lens_core.errors import CheckpointError
from lens_core.safetensors_io import SAFETENSORS_DTYPES, TensorSource, save_file_atomic
from lens_core.text_encoder import GptOssConfig, GptOssEncoder, GptOssExperts

from .fp_formats import (
    Fp8Weight,
    MXFP8Weight,
    NVFP4Weight,
    quantize_fp8,
    quantize_mxfp8,
    quantize_nvfp4,
)
from .layers import PackedWeight, _GGMLWeightMixin
from .safetensors_writer import write_streaming

__all__ = [
    "LAYER_FORMATS",
    "MMDIT_TYPES",
    "ExpertBank",
    "ExpertBanks",
    "PackedSource",
    "convert_mmdit_comfy",
    "gpt_oss_config_shapes",
    "layer_formats",
    "pack_weight",
    "use_expert_banks",
    "write_gpt_oss_comfy",
]

LAYER_FORMATS = ("float8_e4m3fn", "float8_e5m2", "mxfp8", "nvfp4")
"""``comfy_quant`` formats read here."""
MMDIT_TYPES = ("fp8_e4m3fn", "fp8_scaled", "mxfp8", "nvfp4")
"""``lens-quantize --type`` values written as ComfyUI safetensors."""

_STORED_AS = {
    "float8_e4m3fn": ("F8_E4M3",),
    "float8_e5m2": ("F8_E5M2",),
    "mxfp8": ("F8_E4M3", "F8_E5M2"),
    "nvfp4": ("U8",),
}
_FP8_NAMES = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
MARKER = "scaled_fp8"
METADATA_KEY = "_quantization_metadata"
BANK_SUFFIX = "mlp.experts.gate_up_proj.weight"


# ---------------------------------------------------------------------------------------------
# Which layers are quantised, and how
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layer:
    """One quantised layer: its format, the file's names of its weight and scale tensors, and every
    tensor it accounts for (scales, ``comfy_quant``, ignored activation scales)."""

    format: str
    weight: str
    scale: str | None
    scale_2: str | None
    consumed: frozenset[str]


@dataclass(frozen=True)
class _Declared:
    format: Any
    by: str
    """Where the format comes from, for messages."""
    kind: str
    """``comfy_quant`` (weight_scale), ``scaled_fp8`` (legacy scale_weight) or ``dtype`` (plain fp8)."""


def _json_tensor(source: TensorSource, name: str) -> dict:
    try:
        conf = json.loads(bytes(source[name].to(torch.uint8).tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        problem = f"tensor '{name}' is not ComfyUI comfy_quant JSON ({e})"
        raise CheckpointError(source.file_of(name), problem) from e
    if not isinstance(conf, dict):
        raise CheckpointError(source.file_of(name), f"tensor '{name}' is not a comfy_quant JSON object")
    return conf


def _declared_formats(source: TensorSource) -> dict[str, _Declared]:
    """Per layer, the format the file declares: ``comfy_quant`` tensors, the ``_quantization_metadata``
    entry, the legacy ``scaled_fp8`` marker with ``scale_weight``s, else an fp8 weight dtype."""
    declared: dict[str, _Declared] = {}
    meta = source.metadata.get(METADATA_KEY)
    if meta is not None:
        try:
            layers = json.loads(meta)["layers"]
            for layer, conf in layers.items():
                declared[layer] = _Declared(conf.get("format"), f"metadata {METADATA_KEY}", "comfy_quant")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(source.files[0], f"corrupt {METADATA_KEY} metadata ({e})") from e
    for k in source:
        if k.endswith(".comfy_quant"):
            fmt = _json_tensor(source, k).get("format")
            declared[k[: -len(".comfy_quant")]] = _Declared(fmt, f"tensor '{k}'", "comfy_quant")
    marker = next((k for k in source if k == MARKER or k.endswith("." + MARKER)), None)
    if marker is not None:  # as ComfyUI: the marker's dtype names the fp8 type (fp32: e4m3fn)
        fmt = "float8_e5m2" if source.dtypes[marker] == "F8_E5M2" else "float8_e4m3fn"
        for k in source:
            layer = k[: -len(".scale_weight")]
            if k.endswith(".scale_weight") and layer not in declared:
                declared[layer] = _Declared(fmt, f"tensor '{k}' with the '{marker}' marker", "scaled_fp8")
    for k, dtype in source.dtypes.items():
        layer = k[: -len(".weight")]
        matrix = k.endswith(".weight") and len(source.shapes[k]) >= 2
        if matrix and dtype in _FP8_NAMES and layer not in declared:
            declared[layer] = _Declared(_FP8_NAMES[dtype], f"the {dtype} dtype of '{k}'", "dtype")
    return declared


def layer_formats(source: TensorSource) -> dict[str, _Layer]:
    """Every quantised layer of ``source`` (by the file's names): declared ones and plain fp8 weights.

    Raises CheckpointError naming the tensor and file for an unknown format, a weight stored in the
    wrong dtype, a missing weight or scale tensor, or an unsupported extra (``pre_quant_scale``).
    """
    layers = {}
    for layer, d in _declared_formats(source).items():
        weight = layer + ".weight"
        where = source.file_of(weight) if weight in source else source.root
        if d.format not in LAYER_FORMATS:
            raise CheckpointError(
                where,
                f"layer '{layer}' is quantised as {d.format!r} ({d.by}); this loader reads "
                f"{', '.join(LAYER_FORMATS)} (dequantise it in ComfyUI or use another file)",
            )

        def need(suffix: str, layer: str = layer, d: _Declared = d, where: Path = where) -> str:
            name = f"{layer}.{suffix}"
            if name not in source:
                problem = f"layer '{layer}' is {d.format} ({d.by}) but tensor '{name}' is missing"
                raise CheckpointError(where, problem)
            return name

        need("weight")
        if source.dtypes[weight] not in _STORED_AS[d.format]:
            raise CheckpointError(
                where,
                f"tensor '{weight}' is stored as {source.dtypes[weight]}, but its format {d.format} ({d.by}) "
                f"needs {' or '.join(_STORED_AS[d.format])}",
            )
        if layer + ".pre_quant_scale" in source:
            raise CheckpointError(where, f"tensor '{layer}.pre_quant_scale' (AWQ smoothing) is not supported")
        if d.kind == "comfy_quant":
            scale, scale_2 = need("weight_scale"), need("weight_scale_2") if d.format == "nvfp4" else None
            extra = ("comfy_quant", "input_scale")
        elif d.kind == "scaled_fp8":
            scale, scale_2, extra = need("scale_weight"), None, ("scale_input",)
        else:  # plain fp8: nothing else belongs to it (a stray weight_scale is reported, not ignored)
            scale, scale_2, extra = None, None, ()
        consumed = frozenset(n for n in (scale, scale_2, *(f"{layer}.{x}" for x in extra)) if n)
        layers[layer] = _Layer(d.format, weight, scale, scale_2, consumed)
    return layers


def _packed(layer: _Layer, get: Callable[[str], torch.Tensor]) -> PackedWeight:
    """The packed weight of ``layer`` from its tensors (``get`` returns them by file name)."""
    data = get(layer.weight)
    if layer.format == "nvfp4":
        return NVFP4Weight(data, get(layer.scale), get(layer.scale_2))  # type: ignore[arg-type]
    if layer.format == "mxfp8":
        return MXFP8Weight(data, get(layer.scale))  # type: ignore[arg-type]
    return Fp8Weight(data, None if layer.scale is None else get(layer.scale))


class PackedSource(Mapping[str, Any]):
    """A ComfyUI quantised checkpoint as a tensor source whose quantised weights stay packed.

    Same interface as :class:`~lens_core.safetensors_io.TensorSource` (``shapes``, ``dtypes``,
    ``root``, ``files``, ``metadata``, ``file_of``, ``renamed``); ``source["<layer>.weight"]`` of a
    quantised layer is a :class:`~quant.layers.PackedWeight` and ``shapes`` gives its logical shape.
    Scale tensors, ``comfy_quant`` entries and the ``scaled_fp8`` marker are folded in and hidden.
    Layouts are checked from the headers when the source is made (no data read but the small
    ``comfy_quant`` JSON), so a bad file fails before anything large is loaded.
    """

    def __init__(self, raw: TensorSource) -> None:
        self.raw = raw
        self.root, self.files, self.metadata = raw.root, raw.files, raw.metadata
        layers = layer_formats(raw)
        hidden = {k for k in raw if k == MARKER or k.endswith("." + MARKER)}
        hidden = hidden.union(*(info.consumed for info in layers.values()))
        self._layers = {info.weight: info for info in layers.values()}
        self._names = {k: k for k in raw if k not in hidden}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for k in self._names:
            self.shapes[k] = self._logical_shape(k) if k in self._layers else tuple(raw.shapes[k])
            self.dtypes[k] = raw.dtypes[k]

    def _logical_shape(self, name: str) -> tuple[int, ...]:
        """Build the packed weight on storage-free meta tensors: validates the layout, gives the shape."""
        raw = self.raw

        def meta(n: str) -> torch.Tensor:
            return torch.empty(raw.shapes[n], dtype=SAFETENSORS_DTYPES[raw.dtypes[n]], device="meta")

        info = self._layers[name]
        try:
            return _packed(info, meta).shape
        except ValueError as e:
            names = ", ".join(f"'{n}' {list(raw.shapes[n])}" for n in (info.weight, info.scale, info.scale_2) if n)
            problem = f"{info.format} tensors {names} do not fit together: {e}"
            raise CheckpointError(raw.file_of(name), problem) from e

    def renamed(self, mapping: Mapping[str, str]) -> PackedSource:
        """A view where ``mapping[old] = new``; entries not in ``mapping`` are dropped."""
        view = PackedSource.__new__(PackedSource)
        view.raw, view.root, view.files, view.metadata = self.raw, self.root, self.files, self.metadata
        view._layers = self._layers
        view._names = {new: self._names[old] for old, new in mapping.items()}
        view.shapes = {new: self.shapes[old] for old, new in mapping.items()}
        view.dtypes = {new: self.dtypes[old] for old, new in mapping.items()}
        return view

    @property
    def packed_names(self) -> list[str]:
        """The entries that are packed weights."""
        return [k for k, v in self._names.items() if v in self._layers]

    def file_of(self, name: str) -> Path:
        return self.raw.file_of(self._names[name])

    def __getitem__(self, name: str) -> Any:
        file_name = self._names[name]
        info = self._layers.get(file_name)
        if info is None:
            return self.raw[file_name]
        try:
            return _packed(info, self.raw.__getitem__)
        except ValueError as e:
            raise CheckpointError(self.file_of(name), f"tensor '{file_name}' ({info.format}): {e}") from e

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def close(self) -> None:
        self.raw.close()


# ---------------------------------------------------------------------------------------------
# GPT-OSS expert banks (ComfyUI's layout)
# ---------------------------------------------------------------------------------------------


class ExpertBank(_GGMLWeightMixin, nn.Module):
    """``E`` expert matrices ``weight`` ``[E, out, in]`` (dense or packed) and ``bias`` ``[E, out]``.

    A packed bank stays packed; :meth:`expert_weight` decodes one expert at a time.
    """

    cache_values = 0

    def __init__(self, num_experts: int, in_features: int, out_features: int, device=None, dtype=None) -> None:
        nn.Module.__init__(self)
        self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
        shape = (num_experts, out_features, in_features)
        self.weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(
            torch.empty(num_experts, out_features, device=device, dtype=dtype), requires_grad=False
        )
        self._init_ggml()

    def _expected_weight_shape(self) -> tuple[int, ...]:
        return (self.num_experts, self.out_features, self.in_features)

    def expert_weight(self, index: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Expert ``index``'s ``[out, in]`` matrix in ``dtype`` on ``device``."""
        q = self.qweight
        if q is None:
            assert self.weight is not None
            return self.weight[index].to(device=device, dtype=dtype)
        return q.expert(index).to(device).dequantize(dtype)  # type: ignore[attr-defined]

    def extra_repr(self) -> str:
        sizes = f"experts={self.num_experts}, in={self.in_features}, out={self.out_features}"
        return sizes + self._packed_repr()


class ExpertBanks(GptOssExperts):
    """GPT-OSS experts in ComfyUI's layout: banks ``gate_up_proj`` (``[E, 2I, H]``, gate/up rows
    interleaved) and ``down_proj`` (``[E, H, I]``), each with a bias; the forward pass is
    :class:`~lens_core.text_encoder.GptOssExperts`' own, on the transposed (HF) matrices."""

    def __init__(self, config: GptOssConfig, device=None, dtype=None) -> None:
        nn.Module.__init__(self)
        e, h, i = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.expert_format = "comfy"
        self.num_experts = e
        self.limit = config.swiglu_limit
        self.alpha = config.swiglu_alpha
        self.gate_up_proj = ExpertBank(e, h, 2 * i, device=device, dtype=dtype)
        self.down_proj = ExpertBank(e, i, h, device=device, dtype=dtype)

    def expert_weights(
        self, expert: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        gate_up, down = self.gate_up_proj, self.down_proj
        return (
            gate_up.expert_weight(expert, device, dtype).t().contiguous(),
            gate_up.bias[expert].to(device=device, dtype=dtype),
            down.expert_weight(expert, device, dtype).t().contiguous(),
            down.bias[expert].to(device=device, dtype=dtype),
        )


def gpt_oss_config_shapes(shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
    """``shapes`` plus the HF name and layout (``experts.gate_up_proj`` ``[E, H, 2I]``) of each
    ComfyUI expert bank, which :meth:`GptOssConfig.from_state_dict_shapes` reads the sizes from."""
    out = {k: tuple(v) for k, v in shapes.items()}
    for k, v in shapes.items():
        if k.endswith(BANK_SUFFIX) and len(v) == 3:
            out[k[: -len(".weight")]] = (v[0], v[2], v[1])
    return out


def use_expert_banks(
    encoder: GptOssEncoder, names: Iterable[str], device=None, dtype: torch.dtype | None = None
) -> GptOssEncoder:
    """Give ``encoder`` :class:`ExpertBanks` where ``names`` (a checkpoint's) hold ComfyUI banks."""
    names = set(names)
    for i, layer in enumerate(encoder.model.layers):
        if f"model.layers.{i}.{BANK_SUFFIX}" in names:
            layer.mlp.experts = ExpertBanks(encoder.config, device=device, dtype=dtype)
    return encoder


# ---------------------------------------------------------------------------------------------
# Writing ComfyUI layouts
# ---------------------------------------------------------------------------------------------

_LEGACY = {"fp8_e4m3fn", "fp8_scaled"}


def _comfy_quant(conf: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


def _stack(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([p[k] for p in parts]) for k in parts[0]}


def _pack_matrix(w: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    if fmt == "mxfp8":
        data, scale = quantize_mxfp8(w)
        return {"weight": data, "weight_scale": scale.view(torch.float8_e8m0fnu)}
    if fmt == "nvfp4":
        data, block, tensor = quantize_nvfp4(w)
        return {"weight": data, "weight_scale": block, "weight_scale_2": tensor}
    fp8 = torch.float8_e5m2 if fmt == "float8_e5m2" else torch.float8_e4m3fn
    data, scale = quantize_fp8(w, fp8, scaled=fmt != "fp8_e4m3fn")
    if fmt == "fp8_e4m3fn":
        return {"weight": data}
    return {"weight": data, "scale_weight" if fmt == "fp8_scaled" else "weight_scale": scale}


def pack_weight(w: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    """The tensors ComfyUI stores for weight ``w`` (``[out, in]``, or an expert bank ``[E, out, in]``)
    in ``fmt``, keyed by suffix (``weight``, ``weight_scale`` ...).

    ``fmt``: a ``comfy_quant`` format (:data:`LAYER_FORMATS`; a ``comfy_quant`` entry is included),
    ``fp8_scaled`` (legacy ``scale_weight``; the file also needs the ``scaled_fp8`` marker) or
    ``fp8_e4m3fn`` (plain, unscaled fp8).
    """
    if fmt not in (*LAYER_FORMATS, *_LEGACY):
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join((*LAYER_FORMATS, *_LEGACY))}")
    if w.ndim == 3:
        if fmt in _LEGACY:
            raise ValueError(f"{fmt} has no per-expert scales; use a comfy_quant format for expert banks")
        out = _stack([_pack_matrix(m, fmt) for m in w])
        return {**out, "comfy_quant": _comfy_quant({"format": fmt, "num_experts": w.shape[0]})}
    out = _pack_matrix(w, fmt)
    return out if fmt in _LEGACY else {**out, "comfy_quant": _comfy_quant({"format": fmt})}


def _layer_format(name: str, shape: Sequence[int], qtype: str) -> str | None:
    """The format of MMDiT tensor ``name`` under ``lens-quantize --type qtype`` (None: kept as is).

    Matrices are quantised; with ``mxfp8``/``nvfp4`` the modulation, input/output and timestep
    layers stay in the source precision (Comfy-Org's ``lens_mxfp8`` keeps its modulation in bf16).
    """
    from .convert import SENSITIVE

    if len(shape) != 2 or not name.endswith(".weight"):
        return None
    if qtype in ("mxfp8", "nvfp4") and SENSITIVE.match(name):
        return None
    return qtype


@functools.lru_cache(maxsize=64)
def _packed_layout(shape: tuple[int, ...], fmt: str) -> tuple[tuple[str, torch.dtype, tuple[int, ...]], ...]:
    """``(suffix, dtype, shape)`` of what :func:`pack_weight` returns for a ``shape`` weight (probed
    once per shape on zeros, so the file header can be written before any tensor is quantised)."""
    probe = pack_weight(torch.zeros(shape), fmt)
    return tuple((k, v.dtype, tuple(v.shape)) for k, v in probe.items())


def convert_mmdit_comfy(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    qtype: str = "mxfp8",
    *,
    progress: Callable[[int, int, str], None] | None = None,
):
    """Write the Lens MMDiT ``src`` (any layout :mod:`lens_core.loading` reads, float weights) as a
    ComfyUI safetensors file at ``dst`` in ``qtype`` (:data:`MMDIT_TYPES`).

    Tensors are read, quantised and written one at a time.  The MMDiT config goes into the file
    metadata (``config``), so a checkpoint with a non-default ``selected_layer_index`` keeps it.
    Returns a :class:`quant.convert.ConversionReport`.
    """
    from .convert import ConversionReport, _config_json, plan_mmdit
    from .ggml_types import GGMLType

    if qtype not in MMDIT_TYPES:
        raise ValueError(f"unknown type {qtype!r}; choose one of {', '.join(MMDIT_TYPES)}")
    start = time.perf_counter()
    source, config, plan = plan_mmdit(src, "F32", policy=lambda *a: GGMLType.F32)  # checks only
    try:
        layer_fmt = {name: _layer_format(name, shape, qtype) for name, shape, _ in plan}
        fp8_probe = torch.empty(0, dtype=torch.float8_e4m3fn)
        layout: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        if qtype == "fp8_scaled":
            layout.append((MARKER, fp8_probe.dtype, (0,)))
        for name, shape, _ in plan:
            fmt = layer_fmt[name]
            if fmt is None:
                layout.append((name, SAFETENSORS_DTYPES[source.dtypes[name]], tuple(shape)))
            else:
                stem = name[: -len("weight")]
                layout.extend((stem + k, d, s) for k, d, s in _packed_layout(tuple(shape), fmt))
        counts: dict[str, int] = {}
        sizes = {"in": 0, "out": 0}

        def tensors() -> Iterator[dict[str, torch.Tensor]]:
            if qtype == "fp8_scaled":
                yield {MARKER: fp8_probe}
            for i, (name, _, _) in enumerate(plan):
                if progress is not None:
                    progress(i, len(plan), name)
                t = source[name]
                sizes["in"] += t.numel() * t.element_size()
                fmt = layer_fmt[name]
                counts[fmt or "kept"] = counts.get(fmt or "kept", 0) + 1
                group = {name: t} if fmt is None else {
                    name[: -len("weight")] + k: v for k, v in pack_weight(t, fmt).items()
                }
                sizes["out"] += sum(v.numel() * v.element_size() for v in group.values())
                yield group

        metadata = {"config": _config_json(config), "lens.quantization": qtype}
        write_streaming(dst, layout, tensors(), metadata)
    finally:
        source.close()
    return ConversionReport(Path(dst), len(plan), sizes["in"], sizes["out"], counts, time.perf_counter() - start)


def write_gpt_oss_comfy(
    state: Mapping[str, torch.Tensor],
    config: GptOssConfig,
    path: str | os.PathLike[str],
    expert_format: str | None = "nvfp4",
    tokenizer_json: str | os.PathLike[str] | None = None,
) -> Path:
    """Write a GPT-OSS encoder in ComfyUI's layout (Comfy-Org's ``gpt_oss_20b_nvfp4``).

    ``state``: HF names (``model.`` prefix, dense experts ``gate_up_proj`` ``[E, H, 2I]``), e.g.
    :func:`lens_core.random_weights.random_state_dicts`.  Written without the ``model.`` prefix;
    experts become banks ``[E, out, in]`` packed in ``expert_format`` (a ``comfy_quant`` format, or
    None for dense banks), everything else keeps its dtype.  ``tokenizer_json`` is embedded as the
    uint8 tensor ``tokenizer_json``; the config goes into the metadata (``config``).
    """
    from lens_core.random_weights import encoder_config_json

    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        name = k.removeprefix("model.")
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            bank = v.transpose(1, 2).contiguous()  # [E, in, out] -> [E, out, in]
            if expert_format is None:
                out[name + ".weight"] = bank
            else:
                out.update({f"{name}.{s}": t for s, t in pack_weight(bank.float(), expert_format).items()})
        elif name.endswith(("experts.gate_up_proj_bias", "experts.down_proj_bias")):
            out[name[: -len("_bias")] + ".bias"] = v
        else:
            out[name] = v
    if tokenizer_json is not None:
        out["tokenizer_json"] = torch.frombuffer(bytearray(Path(tokenizer_json).read_bytes()), dtype=torch.uint8)
    return save_file_atomic(out, path, {"config": json.dumps(encoder_config_json(config))})
