"""Lens models from GGUF files, with their weights left quantised.

* :func:`load_mmdit_gguf`: a Lens MMDiT GGUF in the ComfyUI-GGUF convention (tensors keep the
  safetensors names, ``general.architecture`` = ``"lens"``, small/1-D tensors F32/F16) - what
  :mod:`quant.convert` writes and community Lens GGUFs hold;
* :func:`load_gpt_oss_gguf`: the GPT-OSS feature encoder from a llama.cpp gpt-oss GGUF
  (``token_embd``, ``blk.N.*``; MXFP4 or other expert types), see :mod:`quant.gpt_oss_gguf`;
* :func:`load_gguf_tokenizer` (re-exported): the tokenizer embedded in such a file.

Models are built on the meta device with :class:`~quant.layers.GGMLOps` and filled from the memory
map: quantised linear/embedding weights stay in their ggml blocks, float tensors become ordinary
parameters in the requested dtype.  On the CPU both are zero-copy views of the map by default
(float tensors when the file stores them in that dtype), so a BF16 GGUF loaded in bf16 costs the
file, not the file twice.  Whatever is copied (a dtype conversion, an accelerator, ``copy=True``)
is copied tensor by tensor, releasing the file pages of each tensor once it is copied, so resident
memory is the model plus one tensor.  GGUF experts stay quantised and only the experts the router
picks are decoded, one at a time (:class:`GGUFExperts`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn as nn

from lens_core.errors import CheckpointError
from lens_core.mmdit import LensMMDiT, MMDiTConfig
from lens_core.text_encoder import GptOssConfig, GptOssEncoder, GptOssExperts

from .dequant import _FLOAT_TYPES as STORED_DTYPES
from .dequant import BLOCK_INFO, OUTPUT_DTYPES
from .dequant import dequantize as _dequantize
from .ggml_types import GGMLType, type_name
from .gguf_reader import GGUFError, GGUFFile, GGUFTensorInfo
from .gpt_oss_gguf import ARCH as GPT_OSS_ARCH
from .gpt_oss_gguf import gguf_tensor_names, gpt_oss_config_from_gguf, load_gguf_tokenizer
from .layers import FLOAT_TYPES, GGMLOps, QuantizedWeight, _GGMLWeightMixin

__all__ = [
    "LENS_ARCH",
    "GGUFExperts",
    "GGUFSource",
    "is_gguf",
    "load_gguf_tokenizer",
    "load_gpt_oss_gguf",
    "load_mmdit_gguf",
    "load_mmdit_gguf_config",
]

LENS_ARCH = "lens"
CONFIG_KEY = "lens.config"
MMDIT_ANCHOR = "transformer_blocks.0.attn.img_qkv.weight"


def is_gguf(path: str | os.PathLike[str]) -> bool:
    """True for a ``.gguf`` file (by suffix, or by magic for other names)."""
    p = Path(path)
    if p.suffix.lower() == ".gguf":
        return True
    try:
        with p.open("rb") as f:
            return p.is_file() and f.read(4) == b"GGUF"
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# A GGUF file as a lens_core tensor source
# ---------------------------------------------------------------------------------------------


class GGUFSource(Mapping[str, torch.Tensor]):
    """The tensors of an open GGUF under (possibly renamed) model names.

    Same interface as :class:`lens_core.safetensors_io.TensorSource` (``shapes`` in torch order,
    ``root``, ``file_of``, ``renamed``); ``source[name]`` decodes to a dense fp32 tensor, while
    :meth:`quantized` gives the undecoded :class:`~quant.layers.QuantizedWeight`.
    """

    def __init__(self, file: GGUFFile, names: Mapping[str, str] | None = None) -> None:
        self.file = file
        self.root = file.path
        self.files = [file.path]
        self.metadata = file.metadata
        self._where = dict(names) if names is not None else {n: n for n in file.tensors}
        self.shapes = {k: file.tensors[v].shape for k, v in self._where.items()}

    def renamed(self, mapping: Mapping[str, str]) -> GGUFSource:
        """A view where ``mapping[old] = new``; tensors not in ``mapping`` are dropped."""
        return GGUFSource(self.file, {new: self._where[old] for old, new in mapping.items()})

    def info(self, name: str) -> GGUFTensorInfo:
        return self.file.tensors[self._where[name]]

    def file_name(self, name: str) -> str:
        """The tensor's name inside the GGUF file."""
        return self._where[name]

    def file_of(self, name: str) -> Path:
        return self.file.path

    def quantized(self, name: str) -> QuantizedWeight:
        return _quantized_view(self.file, self.info(name))

    def decode(
        self, name: str, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Decode to ``dtype`` (any float dtype; decoded in fp32 first if not fp32/16/bf16)."""
        return _decode(self.file, self.info(name), dtype, device)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.decode(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where


def check_decodable(file: GGUFFile, info: GGUFTensorInfo) -> None:
    if int(info.ggml_type) not in BLOCK_INFO:
        raise GGUFError(
            file.path,
            f"tensor {info.name!r} is stored as {type_name(info.ggml_type)}, which has no dequantisation "
            f"kernel (supported: {', '.join(GGMLType(t).name for t in BLOCK_INFO)})",
        )


# ---------------------------------------------------------------------------------------------
# Generic loader
# ---------------------------------------------------------------------------------------------


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype == torch.float16:
        raise ValueError("float16 is not supported by Lens (it overflows to NaN); use bfloat16 or float32")


def _default_dtype(device: torch.device | str) -> torch.dtype:
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def _decode(
    file: GGUFFile, info: GGUFTensorInfo, dtype: torch.dtype, device: torch.device | str | None
) -> torch.Tensor:
    check_decodable(file, info)
    target = dtype if dtype in OUTPUT_DTYPES else torch.float32
    return file.dequantize(info.name, target, device).to(dtype)


def _quantized_view(file: GGUFFile, info: GGUFTensorInfo) -> QuantizedWeight:
    return QuantizedWeight(file.raw(info.name), info.ggml_type, info.shape)


def _quantized_for(file: GGUFFile, info: GGUFTensorInfo, device: torch.device, copy: bool) -> QuantizedWeight:
    """The tensor still in its ggml type, on ``device``: a view of the map on the CPU unless
    ``copy``, else a copy, after which the tensor's file pages are released."""
    q = _quantized_view(file, info)
    if q.device == device and not copy:
        return q
    q = q.to(device) if q.device != device else q.clone()
    file.release(info.name)
    return q


def _dense_for(
    file: GGUFFile, info: GGUFTensorInfo, dtype: torch.dtype, device: torch.device, copy: bool
) -> torch.Tensor:
    """The tensor as a dense ``dtype`` tensor on ``device``: a view of the map on the CPU when the
    file stores exactly ``dtype`` (unless ``copy``), else decoded into new memory, after which the
    tensor's file pages are released (a converting load never holds the file beside the copies)."""
    check_decodable(file, info)
    stored = STORED_DTYPES.get(info.ggml_type)
    if not copy and device.type == "cpu" and stored == dtype and info.offset % dtype.itemsize == 0:
        return file.raw(info.name).view(dtype).view(info.shape)
    t = _decode(file, info, dtype, device)
    file.release(info.name)
    return t


def load_state_from_gguf(
    model: nn.Module,
    source: GGUFSource,
    what: str,
    device: torch.device | str,
    ignore: Callable[[str], bool] = lambda k: False,
    copy: bool = False,
    skip: frozenset[str] | set[str] = frozenset(),
) -> nn.Module:
    """Fill ``model`` (built on the meta device) from ``source``.

    Names and shapes are checked first (CheckpointError naming the tensor); weights of GGML layers
    stay quantised, every other tensor gets the dtype the module declared.  On the CPU, quantised
    weights and float tensors already in that dtype are zero-copy views of the file map; ``copy``
    detaches them.  ``skip``: model keys the caller fills itself (left untouched here).
    """
    device = torch.device(device)
    expected = {k: v for k, v in model.state_dict().items() if k not in skip}
    missing = [k for k in expected if k not in source]
    if missing:
        raise CheckpointError(
            source.root, f"incomplete {what}: {len(missing)} tensor(s) missing, e.g. {', '.join(missing[:4])}"
        )
    unexpected = [k for k in source if k not in expected and not ignore(k)]
    if unexpected:
        raise CheckpointError(
            source.root,
            f"{len(unexpected)} tensor(s) that {what} does not have, e.g. "
            f"{', '.join(source.file_name(k) for k in unexpected[:4])}: wrong or newer architecture?",
        )
    for k, meta in expected.items():
        if tuple(source.shapes[k]) != tuple(meta.shape):
            raise CheckpointError(
                source.root,
                f"tensor {source.file_name(k)!r} has shape {tuple(source.shapes[k])} but {what} expects "
                f"{tuple(meta.shape)} for '{k}'",
            )
    quantisable = {
        (f"{name}.weight" if name else "weight")
        for name, m in model.named_modules()
        if isinstance(m, _GGMLWeightMixin)
    }
    state: dict[str, object] = {}
    for k, meta in expected.items():
        info = source.info(k)
        check_decodable(source.file, info)
        if k in quantisable and info.ggml_type not in FLOAT_TYPES:
            state[k] = _quantized_for(source.file, info, device, copy)
        else:
            dtype = meta.dtype if meta.is_floating_point() else torch.float32
            state[k] = _dense_for(source.file, info, dtype, device, copy)
    result = model.load_state_dict(state, strict=not skip, assign=True)
    if skip:
        wrong = [k for k in result.missing_keys if k not in skip] + list(result.unexpected_keys)
        if wrong:
            raise CheckpointError(source.root, f"tensors do not fit {what}: {', '.join(wrong[:4])}")
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# MMDiT
# ---------------------------------------------------------------------------------------------


def _open_mmdit_gguf(path: str | os.PathLike[str]) -> tuple[GGUFSource, MMDiTConfig]:
    f = GGUFFile(path)
    try:
        hits = [
            n
            for n in f.tensors
            if n.endswith(MMDIT_ANCHOR) and (n == MMDIT_ANCHOR or n[-len(MMDIT_ANCHOR) - 1] == ".")
        ]
        if not hits:
            arch = f.metadata.get("general.architecture")
            raise CheckpointError(
                f.path,
                f"this is not a Lens MMDiT GGUF: general.architecture is {arch!r} and there is no tensor "
                f"named '*{MMDIT_ANCHOR}'",
            )
        prefix = min(hits, key=len)[: -len(MMDIT_ANCHOR)]
        source = GGUFSource(f, {n[len(prefix) :]: n for n in f.tensors if n.startswith(prefix)})
        try:
            config = MMDiTConfig.from_state_dict_shapes(source.shapes)
        except ValueError as e:
            raise CheckpointError(f.path, f"not a Lens MMDiT: {e}") from e
        declared = f.metadata.get(CONFIG_KEY)
        if isinstance(declared, str):
            try:
                d = json.loads(declared)
            except ValueError as e:
                raise GGUFError(f.path, f"metadata {CONFIG_KEY!r} is not valid JSON ({e})") from e
            if "selected_layer_index" in d:
                config.selected_layer_index = tuple(int(i) for i in d["selected_layer_index"])
        return source, config
    except BaseException:
        f.close()  # no view has escaped yet
        raise


def load_mmdit_gguf_config(path: str | os.PathLike[str]) -> MMDiTConfig:
    """Only the config (header read, no weights)."""
    source, config = _open_mmdit_gguf(path)
    source.file.close()
    return config


def load_mmdit_gguf(
    path: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    *,
    operations=GGMLOps,
    copy: bool = False,
) -> LensMMDiT:
    """A :class:`LensMMDiT` with its quantised linears kept in ggml format.

    ``dtype`` (default fp32 on CPU, bf16 elsewhere) is the compute dtype: norms and F32/F16/BF16
    tensors are stored in it, quantised weights are decoded to it at every call.  ``operations``
    must build GGML layers (``GGMLOps`` or a subclass).
    """
    dtype = dtype or _default_dtype(device)
    _check_dtype(dtype)
    source, config = _open_mmdit_gguf(path)
    try:
        with torch.device("meta"):
            model = LensMMDiT(config, operations=operations, dtype=dtype)
        return load_state_from_gguf(model, source, "the Lens MMDiT", device, copy=copy)
    finally:
        # Not closed: GGUFFile.close() unmaps the file even while weight views are alive (the
        # views hold a reference to the map object, not a buffer export).  Dropping the file
        # object is safe: the views keep the map until the last of them is freed.
        del source


# ---------------------------------------------------------------------------------------------
# GPT-OSS encoder
# ---------------------------------------------------------------------------------------------


class GGUFExperts(GptOssExperts):
    """The experts of one MoE layer as llama.cpp stores them, decoded one expert at a time.

    Holds ``gate`` and ``up`` (``[E, I, H]`` each, or a fused ``gate_up`` ``[E, 2I, H]``) and ``down``
    ``[E, H, I]`` in any ggml type (non-persistent uint8 buffers), plus the dense biases.
    :meth:`expert_weights` rebuilds the HF layout (interleaved ``gate_up`` ``[H, 2I]``, ``down``
    ``[I, H]``), so the forward pass is :class:`GptOssExperts`' own.
    """

    def __init__(self, config: GptOssConfig, device=None, dtype=None) -> None:
        nn.Module.__init__(self)
        e, h, i = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.expert_format = "gguf"
        self.num_experts = e
        self.hidden_size = h
        self.intermediate_size = i
        self.limit = config.swiglu_limit
        self.alpha = config.swiglu_alpha
        self.fused = False
        self._types: dict[str, GGMLType] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self.gate_up_proj_bias = nn.Parameter(
            torch.empty(e, 2 * i, device=device, dtype=dtype), requires_grad=False
        )
        self.down_proj_bias = nn.Parameter(torch.empty(e, h, device=device, dtype=dtype), requires_grad=False)

    def set_weight(self, part: str, q: QuantizedWeight) -> None:
        """Store ``part`` (``gate``, ``up``, ``gate_up`` or ``down``) after checking its shape."""
        e, h, i = self.num_experts, self.hidden_size, self.intermediate_size
        expected = {"gate": (e, i, h), "up": (e, i, h), "gate_up": (e, 2 * i, h), "down": (e, h, i)}[part]
        if tuple(q.shape) != expected:
            raise ValueError(f"expert tensor '{part}' has shape {tuple(q.shape)}, expected {expected}")
        self.register_buffer(f"{part}_raw", q.raw, persistent=False)
        self._types[part] = q.ggml_type
        self._shapes[part] = tuple(q.shape)
        if part == "gate_up":
            self.fused = True

    def quantized(self, part: str) -> QuantizedWeight:
        return QuantizedWeight(getattr(self, f"{part}_raw"), self._types[part], self._shapes[part])

    def _expert(self, part: str, expert: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        raw = getattr(self, f"{part}_raw")
        per = raw.numel() // self.num_experts
        rows, cols = self._shapes[part][1:]
        chunk = raw[expert * per : (expert + 1) * per]
        if chunk.device != device:
            chunk = chunk.to(device)
        target = dtype if dtype in OUTPUT_DTYPES else torch.float32
        return _dequantize(chunk, self._types[part], (rows, cols), target).to(dtype)

    def expert_weights(
        self, expert: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        i = self.intermediate_size
        if self.fused:
            gu = self._expert("gate_up", expert, device, dtype)
            gate, up = gu[:i], gu[i:]
        else:
            gate = self._expert("gate", expert, device, dtype)
            up = self._expert("up", expert, device, dtype)
        # Rows (out features) interleaved gate/up, then transposed: HF's [H, 2I] with gate = even columns.
        gate_up = torch.stack((gate, up), dim=1).reshape(2 * i, -1).t().contiguous()
        down = self._expert("down", expert, device, dtype).t().contiguous()
        bias = self.gate_up_proj_bias[expert].to(device=device, dtype=dtype)
        return gate_up, bias, down, self.down_proj_bias[expert].to(device=device, dtype=dtype)

    def extra_repr(self) -> str:
        kinds = ", ".join(f"{p}={t.name}" for p, t in self._types.items())
        return f"experts={self.num_experts}, {kinds}"


def _expert_tensor(f: GGUFFile, layer: int, part: str, kind: str = "weight") -> GGUFTensorInfo | None:
    return f.tensors.get(f"blk.{layer}.ffn_{part}_exps.{kind}")


def load_gpt_oss_gguf(
    path: str | os.PathLike[str],
    selected_layers: Sequence[int] = (5, 11, 17, 23),
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    *,
    operations=GGMLOps,
    copy: bool = False,
) -> GptOssEncoder:
    """The GPT-OSS feature encoder from a llama.cpp gpt-oss GGUF.

    Only layers up to ``max(selected_layers)`` are read (``output_norm``/``output`` are never
    built).  Attention, router and embedding weights stay quantised if the file quantised them;
    experts stay in their ggml type (MXFP4 in the usual files) and are decoded per routed expert.
    Features are exactly those of the HF-layout encoder holding the same values.
    """
    dtype = dtype or _default_dtype(device)
    _check_dtype(dtype)
    device = torch.device(device)
    f = GGUFFile(path)
    try:
        arch = f.metadata.get("general.architecture")
        if arch != GPT_OSS_ARCH and "blk.0.ffn_gate_inp.weight" not in f.tensors:
            raise CheckpointError(
                f.path, f"this is not a llama.cpp GPT-OSS GGUF (general.architecture {arch!r})"
            )
        config = gpt_oss_config_from_gguf(f)
        selected = tuple(int(i) for i in selected_layers)
        if max(selected) >= config.num_hidden_layers:
            raise CheckpointError(
                f.path,
                f"the MMDiT reads encoder layers {list(selected)} but this encoder has only "
                f"{config.num_hidden_layers} layers",
            )
        last = max(selected)
        with torch.device("meta"):
            model = GptOssEncoder(
                config, selected_layers=selected, expert_format="dense", operations=operations, dtype=dtype
            )
            for layer in model.model.layers:
                layer.mlp.experts = GGUFExperts(config, dtype=dtype)
        names = gguf_tensor_names(last + 1)
        sinks = [k for k, v in names.items() if v.endswith("attn_sinks.weight")]
        for k in sinks:  # some conversions drop the ".weight" suffix of the sinks
            if names[k] not in f.tensors and names[k][: -len(".weight")] in f.tensors:
                names[k] = names[k][: -len(".weight")]
        expert_keys = {k for k in model.state_dict() if ".mlp.experts." in k}
        missing = [v for k, v in names.items() if v not in f.tensors]
        if missing:
            raise CheckpointError(
                f.path, f"incomplete GPT-OSS GGUF: tensor(s) missing, e.g. {', '.join(missing[:4])}"
            )
        source = GGUFSource(f, {k: v for k, v in names.items()})
        # The experts (weights and biases) are filled below, from their own tensors.
        loaded = load_state_from_gguf(
            model, source, "the GPT-OSS text encoder", device, copy=copy, skip=expert_keys
        )
        for i, layer in enumerate(loaded.model.layers):
            _fill_experts(f, i, layer.mlp.experts, config, device, dtype, copy)
        return loaded.eval().requires_grad_(False)
    finally:
        del f  # see load_mmdit_gguf: never close a file whose views the model holds


def _fill_experts(
    f: GGUFFile,
    layer: int,
    experts: GGUFExperts,
    config: GptOssConfig,
    device: torch.device,
    dtype: torch.dtype,
    copy: bool,
) -> None:
    fused = _expert_tensor(f, layer, "gate_up")
    parts = ["gate_up", "down"] if fused is not None else ["gate", "up", "down"]
    for part in parts:
        info = _expert_tensor(f, layer, part)
        if info is None:
            raise CheckpointError(
                f.path, f"incomplete GPT-OSS GGUF: tensor 'blk.{layer}.ffn_{part}_exps.weight' is missing"
            )
        check_decodable(f, info)
        if info.ggml_type == GGMLType.F32 and dtype != torch.float32:
            # Dense fp32 experts in a low-precision model: keep them in the model dtype.
            dense = _dense_for(f, info, dtype, device, copy)
            q = QuantizedWeight(
                dense.reshape(-1).view(torch.uint8),
                GGMLType.BF16 if dtype == torch.bfloat16 else GGMLType.F16,
                info.shape,
            )
        else:
            q = _quantized_for(f, info, device, copy)
        try:
            experts.set_weight(part, q)
        except ValueError as e:
            raise CheckpointError(f.path, f"tensor {info.name!r}: {e}") from e

    def bias(part: str, length: int) -> torch.Tensor:
        info = _expert_tensor(f, layer, part, "bias")
        if info is None:
            return torch.zeros(config.num_local_experts, length, dtype=dtype, device=device)
        if info.shape != (config.num_local_experts, length):
            raise CheckpointError(
                f.path,
                f"tensor {info.name!r} has shape {info.shape}, expected {(config.num_local_experts, length)}",
            )
        return _dense_for(f, info, dtype, device, copy)

    i, h = config.intermediate_size, config.hidden_size
    if fused is not None:
        gu = bias("gate_up", 2 * i)
        gate_b, up_b = gu[:, :i], gu[:, i:]
    else:
        gate_b, up_b = bias("gate", i), bias("up", i)
    interleaved = torch.stack((gate_b, up_b), dim=-1).reshape(config.num_local_experts, 2 * i)
    experts.gate_up_proj_bias = nn.Parameter(interleaved.contiguous(), requires_grad=False)
    experts.down_proj_bias = nn.Parameter(bias("down", h), requires_grad=False)


def gguf_summary(path: str | os.PathLike[str]) -> dict[str, int]:
    """Tensor count per ggml type name (for tools and messages)."""
    counts: dict[str, int] = {}
    with GGUFFile(path) as f:
        for info in f.tensors.values():
            counts[info.ggml_type.name] = counts.get(info.ggml_type.name, 0) + 1
    return counts
