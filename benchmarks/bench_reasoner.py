"""Decode speed of the local reasoner (``LocalReasoner``) against transformers' ``generate``.

Both run greedy decoding from the same prompt on the same random weights, in the same process:

* ours: the ``GptOssEncoder`` layer modules with our KV cache; with ``--experts mxfp4`` (the
  default) the experts stay MXFP4 in memory and only the routed ones are dequantised per token;
* transformers: ``GptOssForCausalLM.generate`` (its own cache) on the same tensors: attention,
  norms, router, embedding and LM head are shared with ours (no copy), the experts are the
  dequantised bf16 values (what transformers runs when no MXFP4 kernels are installed).

Decode tokens/s = (N - 1) / (time to generate N tokens - time to generate 1 token), so the
prompt prefill is left out; prefill time is reported on its own. Also reported: how many leading
greedy tokens the two agree on (random weights in bf16 can split on near-ties).

    python benchmarks/bench_reasoner.py --tiny                    # CPU, tiny config (runs anywhere)
    python benchmarks/bench_reasoner.py --device cuda             # full gpt-oss-20b size, ~55 GB GPU

The full-size weights are random, built on the GPU (MXFP4 blocks as random bytes with scales that
give N(0, 1/fan_in)-like magnitudes): speed does not depend on the values, and nothing can be
downloaded here.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lens_core.mxfp4 import GROUP_SIZE, dequantize_expert_weight  # noqa: E402
from lens_core.random_weights import encoder_config_json, mxfp4_experts, random_state_dicts, tiny_configs  # noqa: E402
from lens_core.reasoner import LocalReasoner, render_harmony  # noqa: E402
from lens_core.text_encoder import GptOssConfig, GptOssEncoder  # noqa: E402
from lens_core.tokenizer import load_tokenizer  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Fastest of ``repeats`` runs, seconds."""
    best = math.inf
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def random_full_size(
    cfg: GptOssConfig, experts: str, device: torch.device, dtype: torch.dtype, seed: int
) -> dict[str, torch.Tensor]:
    """Random tensors for every GPT-OSS parameter (HF names) plus ``model.norm`` and ``lm_head``,
    generated directly on ``device``."""
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        shapes = GptOssEncoder(
            cfg, (cfg.num_hidden_layers - 1,), expert_format=experts, dtype=dtype
        ).state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, meta in shapes.items():
        if meta.dtype == torch.uint8:
            if name.endswith("_blocks"):
                t = torch.randint(0, 256, meta.shape, generator=g, device=device, dtype=torch.uint8)
            else:  # E8M0 scales: E2M1 values average ~2, so 2**-7..2**-6 gives ~1/sqrt(2880) weights
                t = torch.randint(120, 122, meta.shape, generator=g, device=device, dtype=torch.uint8)
        elif meta.ndim == 1 and name.endswith("weight"):
            t = 1 + 0.1 * torch.randn(meta.shape, generator=g, device=device)
        elif meta.ndim == 1:
            t = 0.05 * torch.randn(meta.shape, generator=g, device=device)
        elif name.endswith("embed_tokens.weight"):
            t = torch.randn(meta.shape, generator=g, device=device)
        else:
            fan_in = (
                meta.shape[-2] if name.endswith(("gate_up_proj", "down_proj")) else math.prod(meta.shape[1:])
            )
            t = torch.randn(meta.shape, generator=g, device=device) / math.sqrt(fan_in)
        out[name] = t if t.dtype == torch.uint8 else t.to(dtype)
    out["model.norm.weight"] = (1 + 0.1 * torch.randn(cfg.hidden_size, generator=g, device=device)).to(dtype)
    out["lm_head.weight"] = (
        torch.randn(cfg.vocab_size, cfg.hidden_size, generator=g, device=device) / math.sqrt(cfg.hidden_size)
    ).to(dtype)
    return out


def tiny_tensors(experts: str, dtype: torch.dtype, device: torch.device) -> tuple[GptOssConfig, dict]:
    configs = tiny_configs()
    state = random_state_dicts(configs, seed=0)["text_encoder"]
    g = torch.Generator().manual_seed(1)
    h, v = configs[1].hidden_size, configs[1].vocab_size
    state["model.norm.weight"] = 1 + 0.1 * torch.randn(h, generator=g)
    state["lm_head.weight"] = torch.randn(v, h, generator=g) * (4 / math.sqrt(h))
    if experts == "mxfp4":
        state = mxfp4_experts(state)
    return configs[1], {k: (t.to(dtype) if t.is_floating_point() else t).to(device) for k, t in state.items()}


def build_ours(cfg: GptOssConfig, tensors: dict, experts: str, tokenizer) -> LocalReasoner:
    encoder = GptOssEncoder(cfg, (cfg.num_hidden_layers - 1,), expert_format=experts, device="meta")
    encoder.load_state_dict(encoder.filter_state_dict(tensors), strict=True, assign=True)
    return LocalReasoner(encoder.eval().requires_grad_(False), tensors, tokenizer, identity="bench")


def build_hf(cfg: GptOssConfig, tensors: dict, device: torch.device, dtype: torch.dtype):
    """transformers' model on the same tensors (shared, not copied); MXFP4 experts dequantised."""
    import transformers
    from transformers.models.gpt_oss import modeling_gpt_oss

    # The same HF config.json fields our checkpoints are written with.
    hf_cfg = transformers.GptOssConfig(
        **encoder_config_json(cfg), eos_token_id=None, tie_word_embeddings=False
    )
    state = {}
    for name, t in tensors.items():
        if name.endswith("_scales"):
            continue
        if name.endswith("_blocks"):
            base = name[: -len("_blocks")]
            state[base] = dequantize_expert_weight(t, tensors[base + "_scales"], dtype).contiguous()
        else:
            state[name] = t
    with torch.device("meta"):
        model = transformers.GptOssForCausalLM(hf_cfg)
    model.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers (RoPE frequencies) were created on meta: rebuild them for real.
    model.model.rotary_emb = modeling_gpt_oss.GptOssRotaryEmbedding(hf_cfg).to(device)
    return model.eval().requires_grad_(False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny random config (CPU friendly)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cpu with --tiny, else cuda)")
    p.add_argument("--experts", choices=["mxfp4", "dense"], default="mxfp4")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None)
    p.add_argument("--new-tokens", type=int, default=None, help="tokens to decode (default 64, tiny 128)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-hf", action="store_true", help="only time ours")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_reasoner: no CUDA device; use --tiny (CPU) or --device cpu", file=sys.stderr)
        return 2
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[
        args.dtype or ("float32" if device.type == "cpu" else "bfloat16")
    ]
    n_new = args.new_tokens or (128 if args.tiny else 64)
    tokenizer = load_tokenizer(None)
    prompt = tokenizer.encode(
        render_harmony(
            (Path(__file__).resolve().parents[1] / "lens_core" / "reasoner_prompt.txt").read_text().strip(),
            "a red cube on a blue table next to two green spheres",
        )
    )

    start = time.perf_counter()
    if args.tiny:
        cfg, tensors = tiny_tensors(args.experts, dtype, device)
    else:
        cfg = GptOssConfig()
        if args.experts == "mxfp4" and (cfg.hidden_size % GROUP_SIZE or cfg.intermediate_size % GROUP_SIZE):
            raise SystemExit("config not MXFP4-compatible")
        tensors = random_full_size(cfg, args.experts, device, dtype, seed=0)
    ours = build_ours(cfg, tensors, args.experts, tokenizer)
    build_s = time.perf_counter() - start
    if device.type == "cuda":
        print(
            f"ours built in {build_s:.1f} s; GPU memory {torch.cuda.memory_allocated(device) / 2**30:.1f} GiB"
        )

    def ours_gen(n: int) -> list[int]:
        return ours.generate(prompt, n, temperature=0.0).tokens

    ours_gen(4)  # warm-up (loads the head, first kernels)
    t1 = timed(lambda: ours_gen(1), device, args.repeats)
    tn = timed(lambda: ours_gen(n_new), device, args.repeats)
    ours_tokens = ours_gen(n_new)
    results = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "config": "tiny" if args.tiny else "gpt-oss-20b",
        "experts": args.experts,
        "dtype": str(dtype),
        "prompt_tokens": len(prompt),
        "new_tokens": n_new,
        "ours": {"prefill_s": t1, "decode_tok_s": (n_new - 1) / (tn - t1)},
    }
    if device.type == "cuda":
        results["ours"]["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30

    if not args.skip_hf:
        import transformers

        hf = build_hf(cfg, tensors, device, dtype)
        ids = torch.tensor([prompt], device=device)

        def hf_gen(n: int) -> torch.Tensor:
            with torch.inference_mode():
                return hf.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=199999,
                )

        hf_gen(4)
        h1 = timed(lambda: hf_gen(1), device, args.repeats)
        hn = timed(lambda: hf_gen(n_new), device, args.repeats)
        hf_tokens = hf_gen(n_new)[0, len(prompt) :].tolist()
        agree = next(
            (i for i, (a, b) in enumerate(zip(ours_tokens, hf_tokens, strict=True)) if a != b), n_new
        )
        results["transformers"] = {
            "version": transformers.__version__,
            "experts_implementation": getattr(hf.config, "_experts_implementation", None),
            "attn_implementation": hf.config._attn_implementation,
            "prefill_s": h1,
            "decode_tok_s": (n_new - 1) / (hn - h1),
        }
        results["greedy_tokens_agree"] = agree
        if device.type == "cuda":
            results["transformers"]["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30

    print(
        f"\nLocal reasoner decode, {results['config']} ({args.experts} experts, {dtype}) on {results['device']}"
    )
    print(f"prompt {len(prompt)} tokens, {n_new} new tokens, best of {args.repeats}\n")
    print(f"| {'implementation':<28} | {'prefill s':>9} | {'decode tok/s':>12} |")
    print(f"|{'-' * 30}|{'-' * 11}|{'-' * 14}|")
    print(f"| {'LocalReasoner (KV cache)':<28} | {t1:>9.3f} | {results['ours']['decode_tok_s']:>12.1f} |")
    if "transformers" in results:
        r = results["transformers"]
        print(f"| {'transformers generate':<28} | {r['prefill_s']:>9.3f} | {r['decode_tok_s']:>12.1f} |")
        print(f"\ngreedy tokens identical for the first {results['greedy_tokens_agree']} of {n_new}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
