"""``lens-quantize``: convert a Lens MMDiT checkpoint (safetensors) into a quantised GGUF, or (types
``fp8_e4m3fn``, ``fp8_scaled``, ``mxfp8``, ``nvfp4``) into a ComfyUI quantised safetensors file
(:func:`quant.comfy_quant.convert_mmdit_comfy`).

The output follows the ComfyUI-GGUF convention (``general.architecture`` = ``"lens"``, tensors keep
their safetensors names without any ``model.diffusion_model.`` prefix, 1-D and tiny tensors F32),
so it loads here (:func:`quant.gguf_models.load_mmdit_gguf`) and in ComfyUI-GGUF-style loaders.

Default policy (see :func:`choose_type`):

* 1-D tensors (norm scales, biases) and tensors under 4096 values: F32;
* the layers the field notes name as fragile - ``img_mod``/``txt_mod`` (modulation), ``img_in``,
  ``txt_in``, ``proj_out``, ``norm_out.linear`` and the timestep MLP - at Q8_0 unless the requested
  type is at least as precise (F32/F16/BF16/Q8_0): 4-bit modulation gives grid artifacts and
  broken text;
* everything else at the requested type; ``mixed`` = Q5_K attention, Q4_K MLP w1/w3, Q6_K MLP w2;
* rows that do not split into whole blocks fall back as llama.cpp does (Q4_K->Q5_0, Q5_K->Q5_1,
  Q6_K->Q8_0, Q2_K/Q3_K->Q4_0), then to F16 (BF16 for a bf16 source, F32 for ``--type F32``).

Streaming: the header is written from the shapes, then every tensor is read from the memory map,
quantised in chunks and written before the next one is read, so memory stays near one tensor.  The
file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from lens_core.errors import CheckpointError

from .ggml_types import TYPE_SIZES, GGMLType, tensor_nbytes
from .quantize import QUANTIZERS, quantize, to_numpy_bytes

if TYPE_CHECKING:
    import gguf

    from lens_core.mmdit import MMDiTConfig

__all__ = ["ConversionReport", "choose_type", "convert_mmdit", "main", "mmdit_gguf_writer", "plan_mmdit"]

LENS_ARCH = "lens"
CONFIG_KEY = "lens.config"
SMALL_TENSOR_VALUES = 4096
CHOICES = (
    "F32",
    "F16",
    "BF16",
    "Q8_0",
    "Q6_K",
    "Q5_K",
    "Q5_1",
    "Q5_0",
    "Q4_K",
    "Q4_1",
    "Q4_0",
    "Q3_K",
    "Q2_K",
    "mixed",
)

SENSITIVE = re.compile(
    r"^(transformer_blocks\.\d+\.(img_mod|txt_mod)\.|img_in\.|txt_in\.|proj_out\.|norm_out\.linear\.|time_text_embed\.)"
)
"""Layers kept at 8 bit or more (field notes: 4-bit modulation breaks images)."""

_AT_LEAST_8BIT = {GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q8_0}
_FALLBACK = {
    GGMLType.Q2_K: GGMLType.Q4_0,
    GGMLType.Q3_K: GGMLType.Q4_0,
    GGMLType.Q4_K: GGMLType.Q5_0,
    GGMLType.Q5_K: GGMLType.Q5_1,
    GGMLType.Q6_K: GGMLType.Q8_0,
}
_MIXED = [
    (re.compile(r"\.attn\.(img_qkv|txt_qkv|to_out\.0|to_add_out)\.weight$"), GGMLType.Q5_K),
    (re.compile(r"_mlp\.w2\.weight$"), GGMLType.Q6_K),
    (re.compile(r"_mlp\.w[13]\.weight$"), GGMLType.Q4_K),
]


def choose_type(
    name: str, shape: Sequence[int], requested: str, source_dtype: torch.dtype = torch.float32
) -> GGMLType:
    """The ggml type tensor ``name`` of ``shape`` gets under the default policy (see the module doc)."""
    n = 1
    for d in shape:
        n *= int(d)
    if len(shape) < 2 or n < SMALL_TENSOR_VALUES:
        return GGMLType.F32
    if requested == "mixed":
        gtype = next((t for rx, t in _MIXED if rx.search(name)), GGMLType.Q8_0)
    else:
        gtype = GGMLType[requested]
    if SENSITIVE.match(name) and gtype not in _AT_LEAST_8BIT:
        gtype = GGMLType.Q8_0
    row = int(shape[-1])
    while row % TYPE_SIZES[gtype][0]:
        if gtype in _FALLBACK:
            gtype = _FALLBACK[gtype]
        elif requested == "F32":
            gtype = GGMLType.F32
        else:
            gtype = GGMLType.BF16 if source_dtype == torch.bfloat16 else GGMLType.F16
    return gtype


@dataclass
class ConversionReport:
    """What :func:`convert_mmdit` wrote."""

    path: Path
    tensors: int
    bytes_in: int
    bytes_out: int
    types: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        kinds = ", ".join(f"{k} x{v}" for k, v in sorted(self.types.items()))
        return (
            f"{self.path}: {self.tensors} tensors, {self.bytes_out / 2**20:.1f} MiB "
            f"({self.bytes_out / max(self.bytes_in, 1):.3f} of the input), {kinds}, {self.seconds:.1f} s"
        )


def _source_dtype(dtype_name: str) -> torch.dtype:
    from lens_core.safetensors_io import SAFETENSORS_DTYPES

    return SAFETENSORS_DTYPES[dtype_name]


def plan_mmdit(src: str | os.PathLike[str], qtype: str, policy: Callable[..., GGMLType] = choose_type):
    """Open ``src`` and decide every tensor's type: ``(source, config, [(name, shape, type)])``.

    Checks the names and shapes against a Lens MMDiT first (CheckpointError naming the tensor).
    """
    from lens_core.loading import open_mmdit
    from lens_core.mmdit import LensMMDiT

    source, config = open_mmdit(src)
    with torch.device("meta"):
        expected = LensMMDiT(config).state_dict()
    missing = [k for k in expected if k not in source]
    unexpected = [k for k in source if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            source.root,
            f"not a plain Lens MMDiT checkpoint: missing {missing[:3]}, unexpected {unexpected[:3]} "
            "(quantised layouts such as ComfyUI's mxfp8 cannot be re-quantised: convert the bf16 file)",
        )
    plan = []
    for name in expected:
        shape = tuple(source.shapes[name])
        if shape != tuple(expected[name].shape):
            raise CheckpointError(
                source.file_of(name),
                f"tensor '{name}' has shape {shape}, expected {tuple(expected[name].shape)}",
            )
        dtype = _source_dtype(source.dtypes[name])
        if not dtype.is_floating_point or dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise CheckpointError(
                source.file_of(name),
                f"tensor '{name}' is {source.dtypes[name]}: only float checkpoints (bf16/fp16/fp32) can be quantised",
            )
        plan.append((name, shape, policy(name, shape, qtype, dtype)))
    return source, config, plan


def _config_json(config: MMDiTConfig) -> str:
    return json.dumps(
        {
            "in_channels": config.in_channels,
            "patch_size": config.patch_size,
            "out_channels": config.out_channels,
            "num_layers": config.num_layers,
            "num_attention_heads": config.num_attention_heads,
            "attention_head_dim": config.attention_head_dim,
            "enc_hidden_dim": config.enc_hidden_dim,
            "num_text_layers": config.num_text_layers,
            "mlp_hidden_dim": config.mlp_hidden_dim,
            "axes_dims_rope": list(config.axes_dims_rope),
            "rope_theta": config.rope_theta,
            "selected_layer_index": list(config.selected_layer_index),
        }
    )


def _encode(t: torch.Tensor, gtype: GGMLType) -> np.ndarray:
    if gtype == GGMLType.F32:
        return t.to(torch.float32).contiguous().numpy()
    if gtype == GGMLType.F16:
        return t.to(torch.float16).contiguous().numpy()
    if gtype not in QUANTIZERS:
        raise ValueError(f"cannot write {gtype.name}")
    return to_numpy_bytes(quantize(t, gtype), tuple(t.shape), gtype)


@contextlib.contextmanager
def mmdit_gguf_writer(
    path: str | os.PathLike[str],
    qtype: str,
    config: MMDiTConfig,
    plan: Sequence[tuple[str, tuple[int, ...], GGMLType]],
    name: str,
) -> Iterator[gguf.GGUFWriter]:
    """A GGUF for ``path`` with everything before the tensor data written: the metadata and the
    tensor table of ``plan`` (``(name, shape, type)`` in file order, as :func:`plan_mmdit` gives).

    Yields the ``gguf.GGUFWriter`` positioned at the data: write each tensor in plan order.  The
    file is written under a temporary name and appears at ``path`` only when the block completes
    (removed on error).  Shared with the benchmarks' random-weight files, which must be laid out
    exactly so.
    """
    import gguf

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(str(tmp), LENS_ARCH)
    try:
        try:
            writer.add_name(name)
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            writer.add_string(CONFIG_KEY, _config_json(config))
            writer.add_string("lens.quantization", qtype)
            writer.add_string("lens.converter", "ComfyUI-Lens quant.convert")
            for tname, shape, gtype in plan:
                np_dtype = np.float16 if gtype == GGMLType.F16 else np.float32
                raw = None if gtype in (GGMLType.F32, GGMLType.F16) else gguf.GGMLQuantizationType(int(gtype))
                nbytes = tensor_nbytes(gtype, shape)
                writer.add_tensor_info(tname, shape, np.dtype(np_dtype), nbytes, raw_dtype=raw)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            yield writer
        finally:
            writer.close()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def convert_mmdit(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    qtype: str = "Q8_0",
    *,
    policy: Callable[..., GGMLType] = choose_type,
    progress: Callable[[int, int, str], None] | None = None,
    name: str | None = None,
) -> ConversionReport:
    """Write ``src`` (any MMDiT layout :mod:`lens_core.loading` reads) as a GGUF at ``dst``.

    ``qtype``: one of :data:`CHOICES`.  ``policy(name, shape, qtype, source_dtype)`` picks each
    tensor's type (:func:`choose_type` by default).  ``progress(i, n, name)`` is called per tensor.
    """
    if qtype not in CHOICES:
        raise ValueError(f"unknown type {qtype!r}; choose one of {', '.join(CHOICES)}")
    start = time.perf_counter()
    dst = Path(dst)
    source, config, plan = plan_mmdit(src, qtype, policy)
    dst.parent.mkdir(parents=True, exist_ok=True)
    bytes_in = bytes_out = 0
    try:
        with mmdit_gguf_writer(dst, qtype, config, plan, name or Path(src).stem) as writer:
            for i, (tname, _, gtype) in enumerate(plan):
                if progress is not None:
                    progress(i, len(plan), tname)
                t = source[tname]
                bytes_in += t.numel() * t.element_size()
                data = _encode(t, gtype)
                del t
                bytes_out += data.nbytes
                writer.write_tensor_data(data)
                del data
    finally:
        source.close()
    types = dict(Counter(gtype.name for _, _, gtype in plan))
    return ConversionReport(dst, len(plan), bytes_in, bytes_out, types, time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> int:
    """``lens-quantize IN OUT --type TYPE``: quantise a Lens MMDiT to GGUF or ComfyUI safetensors."""
    from .comfy_quant import MMDIT_TYPES, convert_mmdit_comfy

    parser = argparse.ArgumentParser(
        prog="lens-quantize",
        description="Quantise a Lens MMDiT (safetensors file or diffusers folder) to a GGUF file, or to a "
        f"ComfyUI safetensors file ({', '.join(MMDIT_TYPES)}).",
    )
    parser.add_argument("input", help="MMDiT .safetensors file, sharded folder or pipeline root")
    parser.add_argument("output", help="output .gguf (.safetensors for the ComfyUI types), written atomically")
    parser.add_argument(
        "--type",
        default="Q8_0",
        choices=(*CHOICES, *MMDIT_TYPES),
        dest="qtype",
        help="quantisation type (default Q8_0)",
    )
    parser.add_argument("--name", default=None, help="general.name stored in the file")
    parser.add_argument("--quiet", action="store_true", help="no per-tensor progress")
    args = parser.parse_args(argv)

    def show(i: int, n: int, tname: str) -> None:
        print(f"[{i + 1}/{n}] {tname}", file=sys.stderr, flush=True)

    comfy = args.qtype in MMDIT_TYPES
    wanted = ".safetensors" if comfy else ".gguf"
    if Path(args.output).suffix.lower() != wanted:
        print(f"lens-quantize: error: --type {args.qtype} writes a {wanted} file, not {args.output}", file=sys.stderr)
        return 2
    progress = None if args.quiet else show
    try:
        if comfy:
            report = convert_mmdit_comfy(args.input, args.output, args.qtype, progress=progress)
        else:
            report = convert_mmdit(args.input, args.output, args.qtype, progress=progress, name=args.name)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"lens-quantize: error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
