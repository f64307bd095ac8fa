"""Full-size Lens GGUF files without the real weights: exact sizes, and random-block files.

No Lens or GPT-OSS weights can be downloaded here, and quantising 4 B random floats on a 2-core
machine would take hours, but neither a file's size nor the loader's memory depends on the values:

* :func:`mmdit_plan` gives every MMDiT tensor's ggml type under ``lens-quantize``'s default policy
  (:func:`quant.convert.choose_type`, bf16 source); :func:`write_random_mmdit` writes the
  converter's header (:func:`quant.convert.mmdit_gguf_writer`) and valid random blocks
  (:mod:`quant.synthetic`): a file the loader cannot tell from a converted one;
* :func:`gpt_oss_tensors` lists the tensors of a llama.cpp gpt-oss GGUF (MXFP4 experts, the
  other matrices in one type, 1-D tensors F32) the way :func:`quant.gpt_oss_gguf.write_gpt_oss_gguf`
  writes them;
* :func:`file_size`: header bytes plus every tensor's bytes padded to the alignment.

``tests/test_gguf_files.py`` checks all of them against files the real converter and writer make.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import gguf
import numpy as np
import torch

from lens_core.mmdit import LensMMDiT, MMDiTConfig
from lens_core.text_encoder import GptOssConfig
from quant.convert import choose_type, mmdit_gguf_writer
from quant.ggml_types import GGMLType, tensor_nbytes
from quant.gpt_oss_gguf import LAYER_NAMES, gguf_tensor_names
from quant.synthetic import random_blocks

Plan = list[tuple[str, tuple[int, ...], GGMLType]]
"""(tensor name, torch-order shape, ggml type) in file order."""

ALIGNMENT = gguf.GGUF_DEFAULT_ALIGNMENT
RANDOM_SCALE = 1e-4
"""fp16 block-scale spread of the random blocks: K-quant weights come out ~0.02, like a trained layer."""
SLAB_ROWS = 64
"""Random rows drawn per tensor; the rest of the tensor repeats them (valid blocks either way)."""
NAME = "lens_bf16"
"""general.name: what ``lens-quantize lens_bf16.safetensors ...`` stores (the input's stem)."""


def _padded(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def file_size(header_bytes: int, plan: Plan) -> int:
    """Size of a GGUF with this header (magic to tensor infos) and these tensors: the data
    section starts aligned and every tensor is padded to the alignment (as ``GGUFWriter`` does)."""
    return _padded(header_bytes) + sum(_padded(tensor_nbytes(t, shape)) for _, shape, t in plan)


# ---------------------------------------------------------------------------------------------
# MMDiT (lens-quantize layout)
# ---------------------------------------------------------------------------------------------


def mmdit_plan(qtype: str, config: MMDiTConfig | None = None) -> Plan:
    """Every tensor of the MMDiT with the type ``lens-quantize --type qtype`` gives it (bf16 source)."""
    with torch.device("meta"):
        state = LensMMDiT(config or MMDiTConfig()).state_dict()
    return [
        (name, tuple(t.shape), choose_type(name, tuple(t.shape), qtype, torch.bfloat16))
        for name, t in state.items()
    ]


def mmdit_file_size(qtype: str, config: MMDiTConfig | None = None) -> int:
    """Exact size of ``lens-quantize --type qtype``'s output for an MMDiT of ``config`` (no data written)."""
    config = config or MMDiTConfig()
    plan = mmdit_plan(qtype, config)
    with tempfile.TemporaryDirectory() as tmp:
        header = Path(tmp) / "header.gguf"
        with mmdit_gguf_writer(header, qtype, config, plan, NAME):
            pass
        return file_size(header.stat().st_size, plan)


def _random_tensor(shape: Sequence[int], gtype: GGMLType, seed: int) -> np.ndarray:
    """Valid random data for a tensor: ``SLAB_ROWS`` random rows, repeated to fill it."""
    rows, cols = (int(np.prod(shape[:-1])), int(shape[-1])) if len(shape) > 1 else (1, int(shape[0]))
    slab = random_blocks(gtype, (min(rows, SLAB_ROWS), cols), seed=seed, scale=RANDOM_SCALE)
    data = np.resize(slab, (rows, slab.shape[-1]))
    return data.view(np.float32) if gtype == GGMLType.F32 else data


def write_random_mmdit(
    path: str | os.PathLike[str], qtype: str, config: MMDiTConfig | None = None, seed: int = 0
) -> Path:
    """A GGUF laid out exactly like ``lens-quantize --type qtype``'s, filled with random blocks
    (written under a temporary name, then renamed)."""
    config = config or MMDiTConfig()
    plan = mmdit_plan(qtype, config)
    with mmdit_gguf_writer(path, qtype, config, plan, NAME) as writer:
        for i, (_, shape, gtype) in enumerate(plan):
            writer.write_tensor_data(_random_tensor(shape, gtype, seed + i))
    return Path(path)


# ---------------------------------------------------------------------------------------------
# GPT-OSS encoder (llama.cpp layout)
# ---------------------------------------------------------------------------------------------


def gpt_oss_tensors(config: GptOssConfig, weight_type: str, with_output: bool = True) -> Plan:
    """The tensors of a llama.cpp gpt-oss GGUF with MXFP4 experts and the other matrices in
    ``weight_type`` (1-D tensors F32); ``with_output`` adds ``output_norm``/``output`` (the LM
    head, in every published file though Lens never reads it)."""
    h, v, e, inter = config.hidden_size, config.vocab_size, config.num_local_experts, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    per_layer = {
        "attn_norm.weight": (h,),
        "attn_q.weight": (q, h),
        "attn_q.bias": (q,),
        "attn_k.weight": (kv, h),
        "attn_k.bias": (kv,),
        "attn_v.weight": (kv, h),
        "attn_v.bias": (kv,),
        "attn_output.weight": (h, q),
        "attn_output.bias": (h,),
        "attn_sinks.weight": (config.num_attention_heads,),
        "post_attention_norm.weight": (h,),
        "ffn_gate_inp.weight": (e, h),
        "ffn_gate_inp.bias": (e,),
    }
    assert set(per_layer) == set(LAYER_NAMES.values()), "quant.gpt_oss_gguf.LAYER_NAMES changed"
    shapes = {"token_embd.weight": (v, h)}
    for name in gguf_tensor_names(config.num_hidden_layers).values():
        if name != "token_embd.weight":
            shapes[name] = per_layer[name.split(".", 2)[2]]
    if with_output:
        shapes.update({"output_norm.weight": (h,), "output.weight": (v, h)})
    wtype = GGMLType[weight_type]
    plan: Plan = [(n, s, GGMLType.F32 if len(s) < 2 else wtype) for n, s in shapes.items()]
    for i in range(config.num_hidden_layers):
        plan += [
            (f"blk.{i}.ffn_gate_exps.weight", (e, inter, h), GGMLType.MXFP4),
            (f"blk.{i}.ffn_up_exps.weight", (e, inter, h), GGMLType.MXFP4),
            (f"blk.{i}.ffn_gate_exps.bias", (e, inter), GGMLType.F32),
            (f"blk.{i}.ffn_up_exps.bias", (e, inter), GGMLType.F32),
            (f"blk.{i}.ffn_down_exps.weight", (e, h, inter), GGMLType.MXFP4),
            (f"blk.{i}.ffn_down_exps.bias", (e, h), GGMLType.F32),
        ]
    return plan


def data_bytes(plan: Plan, skip: Sequence[str] = ()) -> int:
    """Bytes of the tensors in ``plan`` (unpadded), leaving out names starting with ``skip``."""
    return sum(tensor_nbytes(t, s) for n, s, t in plan if not n.startswith(tuple(skip)))
