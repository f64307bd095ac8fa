"""Exact GGUF file sizes of the full-size Lens MMDiT and GPT-OSS-20B encoder, and which to pick per GPU.

1. The MMDiT (4.1 B parameters) as ``lens-quantize --type T`` writes it, for every type: the
   header is written exactly as the converter writes it and the data section is summed from the
   tensor shapes and the default policy (``quant.convert.choose_type``).  No weights needed.
2. The encoder as a llama.cpp gpt-oss GGUF: experts MXFP4 (what every published file keeps),
   the other matrices in one type, 1-D tensors F32, with the o200k_harmony tokenizer in the
   metadata.  The header is measured on a file ``quant.gpt_oss_gguf.write_gpt_oss_gguf`` writes
   for a 24-layer encoder of tiny width (every header field is fixed-width, so the header is the
   same size as the full model's), checked tensor by tensor against the plan.
3. A pick per GPU size: components run one after another (offload), so the GPU holds one
   component's weights plus working memory at a time; ``--headroom`` (GiB) is that working
   memory (CUDA context, activations, one dequantised layer), an assumption until GPU peaks are
   measured (``bench_quant_models.py --device cuda``); GPU sizes are taken as GiB.

``benchmarks/gguf_files.py`` holds the size arithmetic; ``tests/test_gguf_files.py`` checks it
against files the real converter and writer produce.

    python benchmarks/gguf_sizes.py [--types Q8_0 Q4_K ...] [--encoder-types F16 Q8_0 ...] [--headroom 1.5]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gguf_files import (  # noqa: E402
    Plan,
    data_bytes,
    file_size,
    gpt_oss_tensors,
    mmdit_file_size,
    mmdit_plan,
)

from lens_core.random_weights import mxfp4_experts, randomize_  # noqa: E402
from lens_core.text_encoder import GptOssConfig, GptOssEncoder  # noqa: E402
from lens_core.tokenizer import write_tokenizer_json  # noqa: E402
from quant.convert import CHOICES  # noqa: E402
from quant.ggml_types import TYPE_SIZES, GGMLType  # noqa: E402
from quant.gguf_reader import GGUFFile  # noqa: E402
from quant.gpt_oss_gguf import tokenizer_arrays_from_json, write_gpt_oss_gguf  # noqa: E402

MMDIT_TYPES = [c for c in CHOICES if c not in ("F32", "F16")]
ENCODER_TYPES = ["BF16", "Q8_0", "Q5_0", "Q4_0"]
GPUS_GB = (8, 12, 16, 24)
LM_HEAD = ("output.", "output_norm.")
"""Tensors every gpt-oss GGUF has and Lens never reads (memory-mapped, so never loaded)."""


def gb(n: int) -> str:
    return f"{n / 1e9:.2f}"


# ---------------------------------------------------------------------------------------------
# Encoder header
# ---------------------------------------------------------------------------------------------


def narrow(config: GptOssConfig, width: int = 64) -> GptOssConfig:
    """The same encoder (layer count, metadata) ``width`` wide (a multiple of 32): same header,
    tiny data."""
    return dataclasses.replace(
        config,
        vocab_size=64,
        hidden_size=width,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        intermediate_size=width,
        num_local_experts=2,
        num_experts_per_tok=1,
    )


def encoder_header_bytes(
    config: GptOssConfig, weight_type: str, tokenizer: tuple | None, width: int = 64
) -> int:
    """Header bytes (to the aligned start of the data) of the llama.cpp-layout file
    ``write_gpt_oss_gguf`` writes for ``config``, measured on a narrow twin, after checking that
    its tensor table is exactly :func:`gpt_oss_tensors`' (RuntimeError otherwise)."""
    small = narrow(config, width)
    model = GptOssEncoder(small, selected_layers=tuple(range(small.num_hidden_layers)))
    state = mxfp4_experts(randomize_(model, 0).state_dict())
    state["model.norm.weight"] = torch.ones(small.hidden_size)
    state["lm_head.weight"] = torch.zeros(small.vocab_size, small.hidden_size)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_gpt_oss_gguf(
            state, small, Path(tmp) / "narrow.gguf", weight_type=weight_type, tokenizer_arrays=tokenizer
        )
        with GGUFFile(path) as f:
            table = {n: (i.shape, i.ggml_type) for n, i in f.tensors.items()}
            header = f.data_offset
        size = path.stat().st_size
    plan = gpt_oss_tensors(small, weight_type)
    if table != {n: (s, t) for n, s, t in plan} or size != file_size(header, plan):
        raise RuntimeError("gguf_files.gpt_oss_tensors no longer matches write_gpt_oss_gguf's layout")
    return header


def o200k_arrays() -> tuple[list[str], list[int], list[str]]:
    """(tokens, types, merges) of o200k_harmony, as a llama.cpp conversion stores them."""
    with tempfile.TemporaryDirectory() as tmp:
        return tokenizer_arrays_from_json(write_tokenizer_json(Path(tmp) / "tokenizer.json"))


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def mmdit_table(types: list[str]) -> dict[str, int]:
    sizes = {t: mmdit_file_size(t) for t in types}
    n_params = sum(torch.Size(s).numel() for _, s, _ in mmdit_plan("BF16"))
    bf16 = sizes.get("BF16") or mmdit_file_size("BF16")
    print(f"1. Lens MMDiT ({n_params / 1e9:.2f} B parameters), lens-quantize default policy (exact sizes)")
    print("| type | bytes | GB | GiB | x bf16 | bits/parameter | tensors by type |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for t in types:
        kinds: dict[str, int] = {}
        for _, _, g in mmdit_plan(t):
            kinds[g.name] = kinds.get(g.name, 0) + 1
        mix = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
        print(
            f"| {t} | {sizes[t]:,} | {gb(sizes[t])} | {sizes[t] / 2**30:.2f} | {sizes[t] / bf16:.3f} | "
            f"{8 * sizes[t] / n_params:.2f} | {mix} |"
        )
    return sizes


def encoder_table(types: list[str], tokenizer: tuple | None) -> dict[str, tuple[int, int]]:
    config = GptOssConfig()
    rows = {}
    print(
        "\n2. GPT-OSS-20B encoder as a llama.cpp gpt-oss GGUF (MXFP4 experts; exact sizes"
        f"{', o200k_harmony tokenizer in the metadata' if tokenizer else ', no tokenizer metadata'})"
    )
    print("| other matrices | bytes | GB | GiB | Lens reads (no LM head), GB | header MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for t in types:
        if config.hidden_size % TYPE_SIZES[GGMLType[t]][0]:
            print(f"| {t} | rows of {config.hidden_size} do not split into {t} blocks | | | | |")
            continue
        plan: Plan = gpt_oss_tensors(config, t)
        header = encoder_header_bytes(config, t, tokenizer)
        size = file_size(header, plan)
        used = header + data_bytes(plan, skip=LM_HEAD)
        rows[t] = (size, used)
        print(
            f"| {t} | {size:,} | {gb(size)} | {size / 2**30:.2f} | {gb(used)} | {header / 1e6:.1f} |",
            flush=True,
        )
    return rows


def fit(weights: int, vram_gib: int, headroom: float) -> str:
    """GiB left on a ``vram_gib`` GPU after ``weights``, and whether that covers the headroom."""
    spare = vram_gib - weights / 2**30
    verdict = "fits" if spare >= headroom else "tight" if spare > 0 else "no"
    return f"{verdict} ({spare:+.1f})"


def gpu_table(mmdit: dict[str, int], encoder: dict[str, tuple[int, int]], headroom: float) -> None:
    """Per GPU: the most precise MMDiT file leaving ``headroom`` GiB, and what each encoder file
    leaves (GPU sizes taken as GiB, as GPU memory is counted)."""
    order = ["BF16", "Q8_0", "Q6_K", "Q5_K", "mixed", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "Q3_K", "Q2_K"]
    print(
        f"\n3. Per GPU: components run one after another, so one component's weights + working memory"
        f" must fit; 'fits' = at least {headroom:g} GiB left (assumed working memory), 'tight' = less;"
        " GiB left in brackets"
    )
    print(
        "| GPU | MMDiT: most precise file that fits | "
        + " | ".join(f"encoder MXFP4 + {t}" for t in encoder)
        + " |"
    )
    print("|---|---|" + "---|" * len(encoder))
    for vram in GPUS_GB:
        mm = next((t for t in order if t in mmdit and vram - mmdit[t] / 2**30 >= headroom), None)
        pick = f"{mm} ({mmdit[mm] / 2**30:.2f} GiB, {vram - mmdit[mm] / 2**30:+.1f})" if mm else "none"
        cells = " | ".join(fit(used, vram, headroom) for _, used in encoder.values())
        print(f"| {vram} GB | {pick} | {cells} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--types", nargs="+", default=MMDIT_TYPES, choices=MMDIT_TYPES, help="MMDiT types")
    p.add_argument(
        "--encoder-types", nargs="+", default=ENCODER_TYPES, help="encoder non-expert matrix types"
    )
    p.add_argument(
        "--no-tokenizer", action="store_true", help="leave the tokenizer out of the encoder header"
    )
    p.add_argument("--headroom", type=float, default=1.5, help="GiB of GPU working memory besides weights")
    args = p.parse_args(argv)
    mmdit = mmdit_table(args.types)
    encoder = encoder_table(args.encoder_types, None if args.no_tokenizer else o200k_arrays())
    gpu_table(mmdit, encoder, args.headroom)


if __name__ == "__main__":
    main()
