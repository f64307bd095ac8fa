"""Layers that keep weights in a packed format (GGUF blocks, fp8, MXFP8, NVFP4) and decode them on every call.

:class:`GGMLOps` is an ``operations`` factory (see :mod:`lens_core.ops`): a model built with
``LensMMDiT(config, operations=GGMLOps)`` or ``GptOssEncoder(..., operations=GGMLOps)`` gets
:class:`GGMLLinear` / :class:`GGMLEmbedding` layers, everything else stays plain torch.  Like
ComfyUI-GGUF's custom operations, the quantised weight of a layer is only its raw bytes (a uint8
buffer, the ggml type and the logical shape); each forward pass decodes it to the input's dtype on
the input's device (only the compressed bytes cross the bus when the layer lives elsewhere) and
runs a dense ``F.linear``.  F32/F16/BF16 tensors are loaded as ordinary dense parameters.  The
same layers hold the safetensors formats of :mod:`quant.fp_formats` (any :class:`PackedWeight`).

Quantised weights enter a layer through ``load_state_dict``: a value that is a
:class:`PackedWeight` (rather than a tensor) is taken over as it is (always by reference, as
with ``assign=True``), and ``state_dict()`` gives it back the same way.  ``load_state_dict`` with a
plain tensor turns the layer back into a dense one.

Decoding cost and memory:

* on the CPU, a fresh multi-megabyte tensor per call costs page faults (about a third of the
  decode time); layers therefore decode into one shared scratch buffer per (size, dtype, device),
  reused by every layer of that size.  A buffer is only reused when autograd cannot be holding the
  previous weight (no grad mode, or an input that needs no gradient); see :func:`set_buffer_reuse`;
* tensors of at most :attr:`GGMLLinear.cache_values` values (biases-sized matrices, routers) are
  decoded once per (dtype, device) and kept.

LoRA: :meth:`GGMLLinear.add_lora` (or :func:`apply_lora_patches` for a parsed LoRA file) adds
``scale * up @ down`` to the decoded weight on every call, in fp32, so LoRAs work on quantised
models without ever materialising a dense copy of the model.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dequant import BLOCK_INFO, OUTPUT_DTYPES
from .dequant import dequantize as _dequantize
from .ggml_types import GGMLType, tensor_nbytes, type_name

__all__ = [
    "FLOAT_TYPES",
    "GGMLEmbedding",
    "GGMLLinear",
    "GGMLOps",
    "LoraPatch",
    "PackedWeight",
    "QuantizedWeight",
    "apply_lora_file",
    "apply_lora_patches",
    "clear_lora_patches",
    "ggml_linear_names",
    "ggml_linear_shapes",
    "quantized_bytes",
    "release_buffers",
    "set_buffer_reuse",
    "set_fp8_matmul",
]

FLOAT_TYPES = frozenset({GGMLType.F32, GGMLType.F16, GGMLType.BF16})
"""ggml types that are plain floats: loaded as dense parameters, never decoded per call."""


# ---------------------------------------------------------------------------------------------
# The quantised tensor
# ---------------------------------------------------------------------------------------------


class PackedWeight:
    """A weight kept in a compressed storage format and decoded at use.

    Subclasses hold one or more storage tensors (:meth:`tensors`, e.g. codes and block scales) and
    a logical ``shape``; :meth:`dequantize` turns them into a dense tensor.  The layers below store
    the tensors as non-persistent buffers ``weight_<name>`` (so ``module.to(device)`` moves them)
    and rebuild the object with :meth:`with_tensors`.  :class:`QuantizedWeight` is the ggml kind;
    :mod:`quant.fp_formats` adds fp8, MXFP8 and NVFP4.

    ``to(device)`` moves the storage; a ``dtype`` argument is accepted for code that casts every
    tensor it loads, and ignored: the data keeps its format and is decoded to the dtype of the
    input at use.
    """

    shape: tuple[int, ...]
    is_float = False
    """Plain float storage: a layer turns it into an ordinary dense parameter."""
    decodable = True
    row_access = False
    """:meth:`rows` works (needed to keep an embedding table packed)."""

    @property
    def kind(self) -> str:
        """Short format name for messages and ``repr``."""
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        """The storage tensors by name."""
        raise NotImplementedError

    def with_tensors(self, tensors: Mapping[str, torch.Tensor]) -> PackedWeight:
        """The same weight on other storage tensors (moved or copied versions of :meth:`tensors`)."""
        raise NotImplementedError

    def dequantize(
        self,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        *,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The dense weight in ``dtype`` (fp32 default) on ``device`` (default: where the data is);
        ``out``, a 1-D buffer of ``numel()`` values of that dtype, may receive it."""
        raise NotImplementedError

    def packed_linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        """``F.linear(x, weight, bias)`` by a kernel that reads the packed format itself (with its own
        rounding), or None where there is none for this format, shape or device.  Only layers with
        :attr:`GGMLLinear.fp8_matmul` set ask."""
        return None

    def rows(self, index: torch.Tensor) -> PackedWeight:
        """The rows ``index`` (first axis) of a 2-D weight, still packed (see :attr:`row_access`)."""
        raise NotImplementedError(f"{self.kind} weights have no row access")

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors().values())).device

    @property
    def dtype(self) -> torch.dtype:
        """The storage dtype of the main tensor; the decoded dtype is chosen at use."""
        return next(iter(self.tensors().values())).dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def size(self, dim: int | None = None) -> torch.Size | int:
        return torch.Size(self.shape) if dim is None else self.shape[dim]

    def to(self, *args: Any, **kwargs: Any) -> PackedWeight:
        """Move the storage (``to(device)``, ``to(device=..., dtype=...)``); dtypes are ignored."""
        device = kwargs.get("device")
        for a in args:
            if isinstance(a, (str, torch.device)):
                device = a
        if device is None or torch.device(device) == self.device:
            return self
        non_blocking = bool(kwargs.get("non_blocking", False))
        return self.with_tensors({k: t.to(device, non_blocking=non_blocking) for k, t in self.tensors().items()})

    def clone(self) -> PackedWeight:
        """A copy whose storage is ordinary writable memory (e.g. detached from a file map)."""
        return self.with_tensors({k: t.clone() for k, t in self.tensors().items()})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.kind}, shape={self.shape}, {self.nbytes} bytes on {self.device})"


class QuantizedWeight(PackedWeight):
    """One tensor in ggml block format: ``raw`` bytes (1-D uint8), ``ggml_type``, logical ``shape``.

    ``shape`` is in torch order (rows last-axis-contiguous, as ggml stores them).  The bytes may be
    a read-only view of a memory-mapped GGUF file: never write into ``raw``.
    """

    row_access = True

    def __init__(self, raw: torch.Tensor, ggml_type: int, shape: Sequence[int]) -> None:
        shape = tuple(int(s) for s in shape)
        try:
            gtype = GGMLType(int(ggml_type))
        except ValueError:
            raise ValueError(f"unknown ggml type id {ggml_type}") from None
        if raw.dtype != torch.uint8 or raw.dim() != 1:
            raise ValueError(f"raw ggml data must be 1-D uint8, got {raw.dtype} {tuple(raw.shape)}")
        n_bytes = tensor_nbytes(gtype, shape)
        if raw.numel() != n_bytes:
            raise ValueError(f"{gtype.name} tensor of shape {shape} needs {n_bytes} bytes, got {raw.numel()}")
        self.raw = raw
        self.ggml_type = gtype
        self.shape = shape

    @property
    def kind(self) -> str:
        return self.ggml_type.name

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"raw": self.raw}

    def with_tensors(self, tensors: Mapping[str, torch.Tensor]) -> QuantizedWeight:
        return QuantizedWeight(tensors["raw"], self.ggml_type, self.shape)

    @property
    def device(self) -> torch.device:
        return self.raw.device

    @property
    def dtype(self) -> torch.dtype:
        """The storage dtype (uint8); the decoded dtype is chosen at use."""
        return torch.uint8

    @property
    def is_float(self) -> bool:  # type: ignore[override]
        return self.ggml_type in FLOAT_TYPES

    @property
    def decodable(self) -> bool:  # type: ignore[override]
        return int(self.ggml_type) in BLOCK_INFO

    @property
    def nbytes(self) -> int:
        return self.raw.numel()

    def dequantize(
        self,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        *,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decode to ``dtype`` (fp32 default, fp16, bf16) on ``device`` (default: where the bytes are)."""
        raw = self.raw
        if device is not None and torch.device(device) != raw.device:
            raw = raw.to(device)
        return _dequantize(raw, self.ggml_type, self.shape, dtype, out=out)

    def rows(self, index: torch.Tensor) -> QuantizedWeight:
        """The rows ``index`` (along the first axis) of a 2-D tensor, still quantised."""
        if len(self.shape) != 2:
            raise ValueError("rows() needs a 2-D tensor")
        row_bytes = self.raw.numel() // self.shape[0]
        picked = self.raw.view(self.shape[0], row_bytes).index_select(
            0, index.reshape(-1).to(self.raw.device)
        )
        return QuantizedWeight(picked.reshape(-1), self.ggml_type, (picked.shape[0], self.shape[1]))


def quantized_bytes(ggml_type: int, shape: Sequence[int]) -> int:
    """Bytes a tensor of ``shape`` takes in ``ggml_type``."""
    return tensor_nbytes(GGMLType(ggml_type), tuple(shape))


# ---------------------------------------------------------------------------------------------
# Shared decode buffers
# ---------------------------------------------------------------------------------------------

_buffers: dict[tuple[int, torch.dtype, torch.device, int, bool], torch.Tensor] = {}
_reuse = {"enabled": True}


def set_buffer_reuse(enabled: bool) -> None:
    """Turn the shared decode buffers on (default) or off.

    With reuse on, a layer's decoded weight lives in a scratch buffer that the next layer of the
    same size overwrites; that is safe for sequential inference in one thread (reuse is skipped
    automatically when autograd records the call).  Turn it off when several threads run quantised
    models at once.
    """
    _reuse["enabled"] = bool(enabled)
    if not enabled:
        release_buffers()


def release_buffers() -> None:
    """Free the shared decode buffers (they are re-created on the next call)."""
    _buffers.clear()


def _scratch(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Separate buffers inside and outside torch.inference_mode: an inference tensor cannot be
    # written to outside it.
    key = (numel, dtype, device, threading.get_ident(), torch.is_inference_mode_enabled())
    buf = _buffers.get(key)
    if buf is None:
        buf = _buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf


def _may_reuse(x: torch.Tensor) -> bool:
    return _reuse["enabled"] and not (torch.is_grad_enabled() and x.requires_grad)


# ---------------------------------------------------------------------------------------------
# LoRA patches
# ---------------------------------------------------------------------------------------------


@dataclass
class LoraPatch:
    """``weight[rows] += scale * up @ down`` (and ``bias[rows] += scale * up_bias``), added at use.

    ``down`` ``[r, in]``, ``up`` ``[n_rows, r]``; ``rows`` = ``(start, stop)`` of the output rows it
    adapts (a q/k/v third of a fused qkv weight), ``None`` for the whole weight.
    """

    down: torch.Tensor
    up: torch.Tensor
    scale: float = 1.0
    rows: tuple[int, int] | None = None
    up_bias: torch.Tensor | None = None


def _as_patch(p: LoraPatch | Sequence[Any]) -> LoraPatch:
    if isinstance(p, LoraPatch):
        return p
    return LoraPatch(*p)


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """``t``'s storage as 1-D uint8 (``t`` itself when it already is)."""
    if t.dtype == torch.uint8 and t.dim() == 1:
        return t
    return t.contiguous().reshape(-1).view(torch.uint8)


def _from_bytes(raw: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_as_bytes` for a tensor of ``like``'s dtype and shape."""
    if raw.dtype == like.dtype and raw.shape == like.shape:
        return raw
    return raw.view(like.dtype).view(like.shape)


class _GGMLWeightMixin:
    """Holds the packed weight of a layer (``weight`` is then None) and loads/saves it.

    The packed weight's storage tensors live in non-persistent uint8 buffers ``weight_<name>``
    (``weight_raw`` for ggml blocks), immune to ``module.to(dtype)``; ``_packed`` keeps the format,
    the logical shape and each tensor's dtype and shape (on the meta device).
    """

    weight: nn.Parameter | None
    _packed: PackedWeight | None = None

    def _init_ggml(self) -> None:
        self._packed = None
        self._cache: tuple[torch.dtype, torch.device, torch.Tensor] | None = None

    @property
    def is_quantized(self) -> bool:
        return self._packed is not None

    @property
    def weight_type(self) -> GGMLType | str | None:
        """The ggml type of a GGUF weight, the format name of another packed weight, None if dense."""
        q = self._packed
        if q is None:
            return None
        return q.ggml_type if isinstance(q, QuantizedWeight) else q.kind

    @property
    def weight_shape(self) -> tuple[int, ...] | None:
        return None if self._packed is None else self._packed.shape

    @property
    def qweight(self) -> PackedWeight | None:
        """The packed weight (on the layer's current storage), or None for a dense layer."""
        q = self._packed
        if q is None:
            return None
        stored = {name: _from_bytes(getattr(self, f"weight_{name}"), like) for name, like in q.tensors().items()}
        return q.with_tensors(stored)

    def logical_weight_shape(self) -> tuple[int, ...]:
        if self._packed is not None:
            return self._packed.shape
        assert self.weight is not None
        return tuple(self.weight.shape)

    def set_quantized_weight(self, q: PackedWeight) -> None:
        """Replace the weight by ``q`` (no copy).  Float types become a dense parameter instead."""
        expected = self._expected_weight_shape()
        if tuple(q.shape) != expected:
            raise ValueError(f"quantised weight has shape {tuple(q.shape)}, the layer expects {expected}")
        if not q.decodable:
            raise NotImplementedError(
                f"no dequantisation kernel for ggml type {type_name(q.ggml_type)} ({int(q.ggml_type)})"
                if isinstance(q, QuantizedWeight)
                else f"no decoder for {q.kind} weights"
            )
        self._cache = None
        if q.is_float:
            old = self.weight
            dtype = old.dtype if old is not None and old.is_floating_point() else torch.float32
            dense = q.dequantize(dtype if dtype in OUTPUT_DTYPES else torch.float32)
            self._set_dense(nn.Parameter(dense.to(dtype), requires_grad=False))
            return
        self._drop_packed()
        self.weight = None  # type: ignore[assignment]
        for name, t in q.tensors().items():
            # As bytes, so module.to(dtype) / .half() leave fp8 codes and fp32 scales alone.
            self.register_buffer(f"weight_{name}", _as_bytes(t), persistent=False)  # type: ignore[attr-defined]
        # The template keeps format and shape on storage-free meta tensors: the buffers are the data.
        self._packed = q.with_tensors({k: torch.empty_like(t, device="meta") for k, t in q.tensors().items()})

    def _drop_packed(self) -> None:
        if self._packed is not None:
            for name in self._packed.tensors():
                del self._buffers[f"weight_{name}"]  # type: ignore[attr-defined]
            self._packed = None

    def _set_dense(self, param: nn.Parameter | None) -> None:
        self._cache = None
        self._drop_packed()
        self.weight = param  # type: ignore[assignment]

    def _expected_weight_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def _packed_repr(self) -> str:
        q = self._packed
        if q is None:
            return ""
        return f", ggml_type={q.kind}" if isinstance(q, QuantizedWeight) else f", format={q.kind}"

    # -- state dict ------------------------------------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[no-untyped-def]
        super()._save_to_state_dict(destination, prefix, keep_vars)  # type: ignore[misc]
        q = self.qweight
        if q is not None:
            destination[prefix + "weight"] = q

    def _load_from_state_dict(  # type: ignore[no-untyped-def]
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        key = prefix + "weight"
        value = state_dict.get(key)
        if isinstance(value, PackedWeight):
            state_dict.pop(key)
            try:
                self.set_quantized_weight(value)
            except (ValueError, NotImplementedError) as e:
                error_msgs.append(f"While loading {key!r}: {e}")
            if value.is_float:  # now dense: let torch check the rest as usual
                state_dict[key] = self.weight.data  # type: ignore[union-attr]
        elif isinstance(value, torch.Tensor) and self._packed is not None:
            # A dense tensor for a layer that holds a quantised weight: become dense again.
            self._set_dense(nn.Parameter(torch.empty_like(value), requires_grad=False))
        elif self._packed is not None and value is None and strict:
            missing_keys.append(key)
        super()._load_from_state_dict(  # type: ignore[misc]
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._cache = None

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        self._cache = None
        return super()._apply(fn, recurse)  # type: ignore[misc]

    # -- decoding --------------------------------------------------------------------------------

    def _decoded(self, dtype: torch.dtype, device: torch.device, reuse: bool) -> torch.Tensor:
        """The base weight in ``dtype`` on ``device`` (no LoRA).  May be a shared scratch buffer."""
        if self._packed is None:
            assert self.weight is not None
            return self.weight.to(device=device, dtype=dtype)
        cache = self._cache
        if cache is not None and cache[0] == dtype and cache[1] == device:
            return cache[2]
        q = self.qweight
        assert q is not None
        q = q.to(device, non_blocking=True)
        n = q.numel()
        if n <= self.cache_values:  # type: ignore[attr-defined]
            w = q.dequantize(dtype)
            self._cache = (dtype, device, w)
            return w
        out = _scratch(n, dtype, device) if reuse else None
        return q.dequantize(dtype, out=out)


class GGMLLinear(_GGMLWeightMixin, nn.Linear):
    """``nn.Linear`` whose weight may be a :class:`QuantizedWeight`, decoded at every call.

    Attributes:
        lora_patches: :class:`LoraPatch` list (or ``(down, up, scale)`` tuples) added to the decoded
            weight in fp32 before the matmul.
        cache_values: weights with at most this many values are decoded once and kept.
        fp8_matmul: let the packed weight run the matmul itself (:meth:`PackedWeight.packed_linear`:
            fp8 weights on GPUs with fp8 tensor cores, the input rounded to fp8 at each call) instead
            of decoding; off by default because it changes the numerics (see :func:`set_fp8_matmul`).
    """

    cache_values = 1 << 16
    fp8_matmul = False

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_ggml()
        self.lora_patches: list[LoraPatch] = []

    def _expected_weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features)

    def add_lora(
        self,
        down: torch.Tensor,
        up: torch.Tensor,
        scale: float = 1.0,
        rows: tuple[int, int] | None = None,
        up_bias: torch.Tensor | None = None,
    ) -> LoraPatch:
        """Add ``scale * up @ down`` to rows ``rows`` of the weight at every call; returns the patch."""
        n_rows = (rows[1] - rows[0]) if rows is not None else self.out_features
        if rows is not None and not (0 <= rows[0] < rows[1] <= self.out_features):
            raise ValueError(f"LoRA rows {rows} outside 0..{self.out_features}")
        if (
            down.dim() != 2
            or up.dim() != 2
            or down.shape[1] != self.in_features
            or up.shape != (n_rows, down.shape[0])
        ):
            raise ValueError(
                f"LoRA down {tuple(down.shape)} / up {tuple(up.shape)} do not fit a "
                f"[{n_rows}, {self.in_features}] weight"
            )
        if up_bias is not None and (self.bias is None or tuple(up_bias.shape) != (n_rows,)):
            raise ValueError("LoRA bias given for a layer without bias, or of the wrong size")
        patch = LoraPatch(
            down.detach(), up.detach(), float(scale), rows, None if up_bias is None else up_bias.detach()
        )
        self.lora_patches.append(patch)
        return patch

    def weight_for(self, dtype: torch.dtype, device: torch.device | str, reuse: bool = False) -> torch.Tensor:
        """The effective dense weight (decoded, LoRAs added) in ``dtype`` on ``device``.

        With ``reuse`` the result may be a shared scratch buffer that the next layer overwrites.
        """
        device = torch.device(device)
        patches = [_as_patch(p) for p in self.lora_patches]
        w = self._decoded(dtype, device, reuse and not patches)
        if not patches:
            return w
        wf = w.to(torch.float32, copy=True)
        for p in patches:
            delta = (p.up.to(device, torch.float32) @ p.down.to(device, torch.float32)) * p.scale
            if p.rows is None:
                wf += delta
            else:
                wf[p.rows[0] : p.rows[1]] += delta
        return wf.to(dtype)

    def bias_for(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        if self.bias is None:
            return None
        b = self.bias.to(device=device, dtype=dtype)
        patches = [p for p in map(_as_patch, self.lora_patches) if p.up_bias is not None]
        if not patches:
            return b
        bf = b.to(torch.float32, copy=True)
        for p in patches:
            assert p.up_bias is not None
            add = p.up_bias.to(device, torch.float32) * p.scale
            if p.rows is None:
                bf += add
            else:
                bf[p.rows[0] : p.rows[1]] += add
        return bf.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self._packed is None
            and not self.lora_patches
            and self.weight is not None
            and self.weight.dtype == x.dtype
        ):
            return F.linear(x, self.weight, self.bias)  # plain dense layer: exactly nn.Linear
        y = self._packed_forward(x)
        if y is not None:
            return y
        w = self.weight_for(x.dtype, x.device, reuse=_may_reuse(x))
        return F.linear(x, w, self.bias_for(x.dtype, x.device))

    def _packed_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The packed weight's own matmul, when enabled and applicable: never with LoRA patches (they
        are added to a decoded weight) nor while autograd records ``x`` (fp8 kernels have no backward)."""
        if not self.fp8_matmul or self._packed is None or self.lora_patches:
            return None
        if torch.is_grad_enabled() and x.requires_grad:
            return None
        q = self.qweight
        assert q is not None
        return q.to(x.device, non_blocking=True).packed_linear(x, self.bias_for(x.dtype, x.device))

    def extra_repr(self) -> str:
        s = super().extra_repr() + self._packed_repr()
        if self.lora_patches:
            s += f", lora_patches={len(self.lora_patches)}"
        return s


class GGMLEmbedding(_GGMLWeightMixin, nn.Embedding):
    """``nn.Embedding`` whose table may stay quantised: only the looked-up rows are decoded.

    The output dtype is ``compute_dtype``: the ``dtype`` the layer was built with, updated by
    ``module.to(dtype)`` like a parameter would be.
    """

    cache_values = 0

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
        _weight: torch.Tensor | None = None,
        _freeze: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            num_embeddings,
            embedding_dim,
            padding_idx,
            max_norm,
            norm_type,
            scale_grad_by_freq,
            sparse,
            _weight,
            _freeze,
            device=device,
            dtype=dtype,
        )
        self._init_ggml()
        self.compute_dtype = dtype if dtype is not None else torch.get_default_dtype()

    def _expected_weight_shape(self) -> tuple[int, ...]:
        return (self.num_embeddings, self.embedding_dim)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        probe = fn(torch.empty(0, dtype=self.compute_dtype))
        if probe.is_floating_point():
            self.compute_dtype = probe.dtype
        return super()._apply(fn, recurse)

    def set_quantized_weight(self, q: PackedWeight) -> None:
        if not (q.row_access or q.is_float):
            raise NotImplementedError(f"an embedding table cannot stay {q.kind} (no row access); store it dense")
        super().set_quantized_weight(q)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        q = self.qweight
        if q is None:
            return super().forward(ids)
        out = q.rows(ids.reshape(-1)).dequantize(self.compute_dtype)
        return out.view(*ids.shape, q.shape[1]).to(ids.device)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._packed_repr()


class GGMLOps:
    """``operations`` factory for GGUF models: quantisable Linear/Embedding, plain torch for the rest."""

    Linear = GGMLLinear
    Embedding = GGMLEmbedding
    Conv2d = nn.Conv2d
    GroupNorm = nn.GroupNorm
    LayerNorm = nn.LayerNorm


# ---------------------------------------------------------------------------------------------
# Model-level helpers
# ---------------------------------------------------------------------------------------------


def ggml_linear_names(model: nn.Module) -> list[str]:
    """Names of the :class:`GGMLLinear` modules (the layers a LoRA can patch)."""
    return [n for n, m in model.named_modules() if isinstance(m, GGMLLinear)]


def ggml_linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{name: (out, in)}`` of every :class:`GGMLLinear`, quantised or not - the ``shapes``
    argument of :func:`lens_core.lora.read_lora` for a GGUF model (whose quantised layers have no
    tensor ``weight`` for ``linear_weight_shapes`` to find)."""
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, GGMLLinear)}


def apply_lora_file(
    model: nn.Module,
    lora: Any,
    strength: float = 1.0,
    metadata: Mapping[str, str] | None = None,
    strict: bool = True,
) -> tuple[list[str], list[str]]:
    """Read a LoRA (path or state dict, any naming :mod:`lens_core.lora` knows) and patch the GGML
    layers with it: the counterpart of ``lens_core.lora.apply_lora`` for quantised models.

    Returns ``(patched module names, unmatched keys)``.
    """
    from lens_core.lora import read_lora

    modules, unmatched = read_lora(lora, ggml_linear_shapes(model), metadata, strict)
    return apply_lora_patches(model, modules, strength), unmatched


def set_fp8_matmul(model: nn.Module, enabled: bool) -> int:
    """Switch fp8 matmul kernels on or off for every :class:`GGMLLinear` of ``model`` (see
    :attr:`GGMLLinear.fp8_matmul`; like ComfyUI's ``--fast fp8_matrix_mult``).  Layers whose weight
    has no such kernel here keep decoding.  Returns the number of layers set."""
    layers = [m for m in model.modules() if isinstance(m, GGMLLinear)]
    for m in layers:
        m.fp8_matmul = bool(enabled)
    return len(layers)


def clear_lora_patches(model: nn.Module) -> int:
    """Remove every LoRA patch from the model's GGML layers; returns how many were removed."""
    n = 0
    for m in model.modules():
        if isinstance(m, GGMLLinear):
            n += len(m.lora_patches)
            m.lora_patches.clear()
    return n


def apply_lora_patches(
    model: nn.Module,
    modules: Mapping[tuple[str, int | None], Any] | Iterable[tuple[tuple[str, int | None], Any]],
    strength: float = 1.0,
) -> list[str]:
    """Patch a GGML model with parsed LoRA modules (no weight is modified).

    ``modules`` maps ``(module name, part)`` to objects with ``down`` ``[r, in]``, ``up``
    ``[rows, r]``, ``scaling`` (alpha / rank) and optional ``up_bias`` - what
    ``lens_core.lora.parse_lora`` returns (pass :func:`ggml_linear_names` as its module
    list).  ``part`` 0/1/2 selects the q/k/v third of a fused qkv weight.  Returns the patched names.
    """
    items = modules.items() if isinstance(modules, Mapping) else modules
    done = []
    for (name, part), lora in items:
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"LoRA targets {name!r}, which this model does not have") from None
        if not isinstance(layer, GGMLLinear):
            raise ValueError(f"LoRA targets {name!r}, which is not a GGML linear layer")
        rows = None
        if part is not None:
            third = layer.out_features // 3
            rows = (part * third, (part + 1) * third)
        scale = float(getattr(lora, "scaling", 1.0)) * float(strength)
        layer.add_lora(lora.down, lora.up, scale, rows, getattr(lora, "up_bias", None))
        done.append(name)
    return done
