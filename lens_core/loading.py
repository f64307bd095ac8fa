"""Load the three Lens components from the checkpoint layouts users actually have.

Every loader takes a file or a folder (a diffusers component folder, or a pipeline root with
``transformer/``, ``text_encoder/``, ``vae/``), works out the naming scheme and the config from
the tensors themselves, builds the model on the meta device and then fills it one tensor at a
time from the memory-mapped file, so host memory never holds a second full copy.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn as nn

from .errors import CheckpointError
from .mmdit import LensMMDiT, MMDiTConfig
from .ops import DEFAULT_OPS
from .safetensors_io import TensorSource
from .text_encoder import GptOssConfig, GptOssEncoder
from .vae import Flux2VAE, VAEConfig, check_flux2_vae, convert_vae_tensor, vae_key_map

MMDIT_ANCHOR = "transformer_blocks.0.attn.img_qkv.weight"
ENCODER_ANCHOR = "layers.0.self_attn.q_proj.weight"

# Tensor names that identify other well-known architectures, for a helpful error message.
_KNOWN_ARCHITECTURES: list[tuple[str, str]] = [
    (r"(^|\.)double_blocks\.0\.img_attn", "a FLUX.1/FLUX.2 diffusion transformer"),
    (r"(^|\.)joint_blocks\.0\.", "a Stable Diffusion 3 MMDiT"),
    (r"(^|\.)input_blocks\.0\.", "a Stable Diffusion UNet"),
    (r"(^|\.)transformer_blocks\.0\.attn\.to_q\.weight", "a diffusers DiT of another model"),
    (r"(^|\.)layers\.0\.self_attn\.sinks", "a GPT-OSS text encoder"),
    (r"(^|\.)layers\.0\.self_attn\.q_proj", "a language-model text encoder"),
    (r"(^|\.)encoder\.(down|down_blocks)\.0\.", "a VAE"),
    (r"(^|\.)transformer_blocks\.0\.attn\.img_qkv", "a Lens MMDiT"),
]


def describe_architecture(keys: Iterable[str]) -> str:
    """Best guess of what a checkpoint holds, from its tensor names (for error messages)."""
    keys = list(keys)
    for pattern, label in _KNOWN_ARCHITECTURES:
        rx = re.compile(pattern)
        if any(rx.search(k) for k in keys):
            return label
    return "an unknown model"


def component_path(path: str | Path, component: str) -> Path:
    """Resolve ``path`` to the folder/file of ``component``.

    A pipeline root (``model_index.json`` or a ``<component>/`` subfolder) resolves to its
    ``<component>/`` subfolder; anything else is used as given.
    """
    path = Path(path).expanduser()
    sub = path / component
    if path.is_dir() and sub.is_dir() and ((path / "model_index.json").exists() or not any(path.glob("*.safetensors"))):
        return sub
    return path


def _read_json_config(path: Path, source: TensorSource) -> dict | None:
    """A component config: ``config.json`` beside the weights, else one embedded in the file metadata."""
    folder = path if path.is_dir() else path.parent
    cfg = folder / "config.json"
    if path.is_dir() and cfg.exists():
        try:
            return json.loads(cfg.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(cfg, f"corrupt config.json ({e})") from e
    if "config" in source.metadata:
        try:
            return json.loads(source.metadata["config"])
        except ValueError as e:
            raise CheckpointError(source.files[0], f"corrupt embedded config metadata ({e})") from e
    return None


def _prefix_view(source: TensorSource, anchor: str, expected: str, what: str) -> TensorSource:
    """Keep only the tensors under the prefix in front of ``anchor`` and rename them to ``expected`` + rest.

    Handles merged single files (``model.diffusion_model.`` etc.) and bare/prefixed encoder names.
    """
    hits = [k for k in source if k.endswith(anchor) and (len(k) == len(anchor) or k[-len(anchor) - 1] == ".")]
    if not hits:
        raise CheckpointError(
            source.root,
            f"this is not {what}: it looks like {describe_architecture(source)} "
            f"(no tensor named '*{anchor}').",
        )
    prefix = min(hits, key=len)[: -len(anchor)]
    return source.renamed({k: expected + k[len(prefix):] for k in source if k.startswith(prefix)})


def _comfy_view(source: TensorSource) -> TensorSource:
    """ComfyUI's fp8 / quantised layouts (fp8 dtypes, ``comfy_quant``, the ``scaled_fp8`` marker) and
    its GPT-OSS expert banks read through :class:`quant.comfy_quant.PackedSource`, which keeps the
    quantised weights packed; any other checkpoint as it is."""
    comfy = (
        any(d.startswith("F8_") for d in source.dtypes.values())
        or "_quantization_metadata" in source.metadata
        or any(k.endswith(("comfy_quant", "scaled_fp8", "experts.gate_up_proj.weight")) for k in source)
    )
    if not comfy:
        return source
    from quant.comfy_quant import PackedSource

    return PackedSource(source)  # type: ignore[return-value]


def _is_packed(source: TensorSource) -> bool:
    """True for a :func:`_comfy_view` of a ComfyUI layout (its models need ``quant`` layers)."""
    return not isinstance(source, TensorSource)


def _squeeze(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1)


def _out_of_memory(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e) or "out of memory" in str(e)


def build_and_load(
    build: Callable[[], nn.Module],
    source: TensorSource,
    what: str,
    device: torch.device | str,
    ignore: Callable[[str], bool] = lambda k: False,
    convert: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> nn.Module:
    """Build ``build()`` on the meta device, then stream every tensor from ``source`` into it.

    Checks names and shapes first so a wrong or incomplete file fails before anything is
    allocated; each tensor is cast to the dtype the module declared (uint8 stays uint8) and
    moved to ``device`` as it is read, so peak memory is the model plus one tensor.
    ``convert(name, tensor)`` reshapes a tensor stored in another layout (e.g. a 1x1 conv
    weight that the model holds as a linear weight); such tensors are size-checked instead.
    """
    with torch.device("meta"):
        model = build()
    expected = model.state_dict()
    missing = [k for k in expected if k not in source and not k.endswith("num_batches_tracked")]
    if missing:
        raise CheckpointError(
            source.root,
            f"incomplete {what}: {len(missing)} tensor(s) missing, e.g. {', '.join(missing[:4])}",
        )
    unexpected = [k for k in source if k not in expected and not ignore(k)]
    if unexpected:
        raise CheckpointError(
            source.root,
            f"{len(unexpected)} tensor(s) that {what} does not have, e.g. {', '.join(unexpected[:4])}: "
            "wrong or newer architecture?",
        )
    for k, meta in expected.items():
        if k not in source:
            continue
        shape = tuple(source.shapes[k])
        if convert is not None and _squeeze(shape) == _squeeze(tuple(meta.shape)):
            continue
        if shape != tuple(meta.shape):
            raise CheckpointError(
                source.file_of(k),
                f"tensor '{k}' has shape {tuple(source.shapes[k])} but {what} expects {tuple(meta.shape)}",
            )
    state: dict[str, torch.Tensor] = {}
    try:
        for k, meta in expected.items():
            if k not in source:  # BatchNorm's counter, absent from inference checkpoints
                state[k] = torch.zeros(meta.shape, dtype=meta.dtype, device=device)
                continue
            t = source[k]
            if convert is not None:
                t = convert(k, t)
            state[k] = t.to(device=device, dtype=meta.dtype)
    except (RuntimeError, torch.OutOfMemoryError) as e:
        if not _out_of_memory(e):
            raise
        state.clear()
        n_bytes = sum(m.numel() * m.element_size() for m in expected.values())
        raise CheckpointError(
            source.root,
            f"out of memory while loading {what} onto {device} (needs {n_bytes / 2**30:.1f} GiB): "
            "use a smaller dtype (bfloat16), a quantised (GGUF) file, or another device.",
        ) from e
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:  # e.g. a packed weight on a layer that cannot hold it
        raise CheckpointError(source.root, f"cannot load {what}: {e}") from e
    return model.eval().requires_grad_(False)


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on accelerators, fp32 on the CPU."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype == torch.float16:
        raise ValueError("float16 is not supported by Lens (it overflows to NaN); use bfloat16 or float32")


def open_mmdit(path: str | Path) -> tuple[TensorSource, MMDiTConfig]:
    """The MMDiT tensors (prefix stripped) and config: sizes from the shapes, the encoder layers
    it reads from ``config.json``/metadata where present."""
    path = component_path(path, "transformer")
    source = _prefix_view(_comfy_view(TensorSource.open(path)), MMDIT_ANCHOR, "", "a Lens MMDiT")
    try:
        config = MMDiTConfig.from_state_dict_shapes(source.shapes)
    except ValueError as e:
        raise CheckpointError(source.root, f"not a Lens MMDiT: {e}") from e
    declared = _read_json_config(path, source)
    if declared and "selected_layer_index" in declared:
        config.selected_layer_index = tuple(declared["selected_layer_index"])
    return source, config


def is_gguf(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".gguf"


def _gguf_ops(operations):
    """The caller's operations when they are already GGML-aware, else quant's."""
    from quant.layers import GGMLLinear, GGMLOps

    linear = getattr(operations, "Linear", None)
    return operations if isinstance(linear, type) and issubclass(linear, GGMLLinear) else GGMLOps


def load_mmdit_config(path: str | Path) -> MMDiTConfig:
    """Read only the headers: which encoder layers the MMDiT needs, before any weight is loaded."""
    if is_gguf(path):
        from quant.gguf_models import load_mmdit_gguf_config

        return load_mmdit_gguf_config(path)
    return open_mmdit(path)[1]


def is_packed_mmdit(path: str | Path) -> bool:
    """True when :func:`load_mmdit` keeps the weights of ``path`` packed in ``quant``'s layers (GGUF,
    fp8, ComfyUI quantised), so a caller with its own layers must hand it GGML-aware operations."""
    return is_gguf(path) or _is_packed(open_mmdit(path)[0])


def load_mmdit(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    operations=DEFAULT_OPS,
) -> LensMMDiT:
    """Load a Lens MMDiT from a diffusers folder, a sharded folder, a single (prefixed) file, or a
    GGUF file (weights stay quantised, dequantised per call by ``quant.layers``).  fp8 and ComfyUI
    quantised safetensors (scaled fp8, ``comfy_quant`` mxfp8/nvfp4...) stay packed the same way."""
    dtype = dtype or default_dtype(device)
    _check_dtype(dtype)
    if is_gguf(path):
        from quant.gguf_models import load_mmdit_gguf

        return load_mmdit_gguf(path, device, dtype, operations=_gguf_ops(operations))
    source, config = open_mmdit(path)
    if _is_packed(source):  # fp8 / ComfyUI quantised: weights stay packed in quant's layers
        operations = _gguf_ops(operations)
    return build_and_load(
        lambda: LensMMDiT(config, operations=operations, dtype=dtype), source, "the Lens MMDiT", device
    )


def load_text_encoder(
    path: str | Path,
    selected_layers: tuple[int, ...] = (5, 11, 17, 23),
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    operations=DEFAULT_OPS,
) -> GptOssEncoder:
    """Load the GPT-OSS feature encoder (HF folder, sharded or single file; bf16 or MXFP4 experts).

    Only layers up to ``max(selected_layers)`` are read; the final norm and LM head are skipped.
    MXFP4 expert blocks stay uint8 in memory. llama.cpp GGUF files load through ``quant``, and so
    do ComfyUI's files (expert banks, nvfp4 experts, embedded ``tokenizer_json``; kept packed).
    """
    dtype = dtype or default_dtype(device)
    _check_dtype(dtype)
    if is_gguf(path):
        from quant.gguf_models import load_gpt_oss_gguf

        return load_gpt_oss_gguf(path, selected_layers, device, dtype, operations=_gguf_ops(operations))
    path = component_path(path, "text_encoder")
    source = _prefix_view(
        _comfy_view(TensorSource.open(path)), ENCODER_ANCHOR, "model.", "a GPT-OSS text encoder"
    )
    packed = _is_packed(source)
    shapes = source.shapes
    if packed:
        from quant.comfy_quant import gpt_oss_config_shapes, use_expert_banks

        shapes = gpt_oss_config_shapes(shapes)  # ComfyUI's expert banks, as HF names and layout
        operations = _gguf_ops(operations)
    declared = _read_json_config(path, source)
    try:
        config = GptOssConfig.from_json(declared) if declared else GptOssConfig.from_state_dict_shapes(shapes)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(source.root, f"not a GPT-OSS text encoder: {e}") from e
    if max(selected_layers) >= config.num_hidden_layers:
        raise CheckpointError(
            source.root,
            f"the MMDiT reads encoder layers {list(selected_layers)} but this encoder has only "
            f"{config.num_hidden_layers} layers",
        )
    mxfp4 = any(k.endswith("experts.gate_up_proj_blocks") for k in source)
    last = max(selected_layers)
    layer_rx = re.compile(r"^model\.layers\.(\d+)\.")

    def beyond_last(k: str) -> bool:
        m = layer_rx.match(k)
        return (m is not None and int(m.group(1)) > last) or k.endswith(
            ("model.norm.weight", "lm_head.weight", "tokenizer_json")  # ComfyUI files embed the tokenizer
        )

    def build() -> GptOssEncoder:
        encoder = GptOssEncoder(
            config,
            selected_layers=tuple(selected_layers),
            expert_format="mxfp4" if mxfp4 else "dense",
            operations=operations,
            dtype=dtype,
        )
        return use_expert_banks(encoder, source, dtype=dtype) if packed else encoder

    return build_and_load(
        build,
        source,
        "the GPT-OSS text encoder",
        device,
        ignore=beyond_last,
    )


def load_vae(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    operations=DEFAULT_OPS,
) -> Flux2VAE:
    """Load the FLUX.2 VAE from BFL/ComfyUI (``encoder.down.0...``) or diffusers names."""
    dtype = dtype or default_dtype(device)
    _check_dtype(dtype)
    path = component_path(path, "vae")
    raw = TensorSource.open(path)
    mapping = vae_key_map(raw.keys())
    if not mapping:
        raise CheckpointError(raw.root, f"this is not a VAE: it looks like {describe_architecture(raw)}")
    source = raw.renamed(mapping)
    declared = _read_json_config(path, raw)
    try:
        check_flux2_vae(source.shapes)
        # Shapes give every size but the GroupNorm group count: a config.json beside the weights says it.
        config = VAEConfig.from_json(declared) if declared else VAEConfig.from_state_dict_shapes(source.shapes)
    except ValueError as e:
        raise CheckpointError(raw.root, str(e)) from e
    return build_and_load(
        lambda: Flux2VAE(config, operations=operations, dtype=dtype),
        source,
        "the FLUX.2 VAE",
        device,
        convert=convert_vae_tensor,
    )
