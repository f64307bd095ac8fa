"""``lens`` command line: ``lens generate --prompt ...`` writes PNGs with their settings embedded."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from .errors import run_command
from .image_io import save_png
from .lora import parse_lora_arg
from .pipeline import LensPipeline
from .reasoner import ReasonerSettings
from .resolution import ASPECT_RATIOS, BUCKETS
from .sampling import PRESETS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lens", description="Microsoft Lens text-to-image.")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate images from a prompt")
    g.add_argument("--prompt", action="append", required=True, help="prompt; repeat for several prompts")
    g.add_argument("--negative-prompt", default="", help="negative prompt (empty: no text in the uncond pass)")
    g.add_argument("--transformer", help="MMDiT file/folder (default: the model shipped with lens_core)")
    g.add_argument("--text-encoder", help="GPT-OSS encoder file/folder")
    g.add_argument("--vae", help="FLUX.2 VAE file/folder")
    g.add_argument("--model", help="a pipeline folder holding transformer/, text_encoder/, vae/")
    g.add_argument("--tokenizer", help="tokenizer.json (default: beside the encoder, else bundled o200k_harmony)")
    g.add_argument("--preset", choices=list(PRESETS), default="lens",
                   help="lens: 20 steps CFG 5; base: 50 steps CFG 4; turbo: 4 steps CFG 1")
    g.add_argument("--steps", type=int, help="override the preset's step count")
    g.add_argument("--cfg", type=float, help="override the preset's guidance scale (1 = no uncond pass)")
    g.add_argument("--width", type=int, help="image width, a multiple of 16 (with --height)")
    g.add_argument("--height", type=int, help="image height, a multiple of 16 (with --width)")
    g.add_argument("--base", type=int, choices=sorted(BUCKETS),
                   help="bucket base resolution (default: the model's, 1024 for Lens, 128 for Lens-Toy)")
    g.add_argument("--aspect-ratio", default="1:1", help=f"bucket aspect ratio W:H, one of {', '.join(ASPECT_RATIOS)}")
    g.add_argument("--seed", type=int, help="noise seed (reproducible across machines)")
    g.add_argument("--batch", type=int, default=1, help="images per prompt")
    g.add_argument("--output", default="out.png",
                   help="output PNG; with several images, _0, _1, ... are added before the suffix")
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    g.add_argument("--dtype", choices=list(DTYPES), help="default: bfloat16 on GPU, float32 on CPU")
    g.add_argument("--no-offload", action="store_true", help="keep all components on the accelerator")
    g.add_argument("--fp8-matmul", action="store_true",
                   help="fp8 / scaled-fp8 MMDiT files: multiply in fp8 instead of decoding the weights (CUDA "
                        "sm>=8.9; faster, activations rounded to fp8; elsewhere no effect)")
    g.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="merge a LoRA (.safetensors, any common naming) into the MMDiT at SCALE (default 1); "
                        "repeat for several")
    r = g.add_argument_group("reasoner (rewrites the prompt into a dense description before encoding)")
    r.add_argument("--reasoner", choices=["off", "local", "api"], default="off",
                   help="local: the loaded GPT-OSS weights; api: an OpenAI-compatible server")
    r.add_argument("--reasoner-url", default="", help="chat-completions server root, e.g. http://127.0.0.1:8000/v1")
    r.add_argument("--reasoner-model", default="", help="model name the server expects")
    r.add_argument("--reasoner-key-env", default="OPENAI_API_KEY", help="NAME of the env variable holding the API key")
    r.add_argument("--reasoner-system-prompt", help="file with the reasoner's instructions (default: ours)")
    r.add_argument("--reasoner-on-error", choices=["fail", "passthrough"], default="fail",
                   help="passthrough: use the prompt unchanged when the reasoner fails")
    r.add_argument("--reasoner-max-tokens", type=int, default=4096, help="new tokens, analysis included")
    return p


def _reasoner_settings(args: argparse.Namespace) -> ReasonerSettings:
    settings = ReasonerSettings(
        mode=args.reasoner, api_base_url=args.reasoner_url, api_model=args.reasoner_model,
        api_key_env=args.reasoner_key_env, system_prompt_file=args.reasoner_system_prompt,
        on_error=args.reasoner_on_error, max_new_tokens=args.reasoner_max_tokens,
        seed=args.seed if args.seed is not None else 0,
    )
    settings.validate()
    return settings


def _output_paths(output: str, n: int) -> list[Path]:
    path = Path(output)
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{i}{path.suffix or '.png'}") for i in range(n)]


def generate(args: argparse.Namespace) -> list[Path]:
    if args.batch < 1:
        raise ValueError(f"--batch must be at least 1, got {args.batch}")
    reasoner = _reasoner_settings(args)
    pipe = LensPipeline(
        transformer=args.transformer or args.model,
        text_encoder=args.text_encoder or args.model,
        vae=args.vae or args.model,
        tokenizer=args.tokenizer,
        device=args.device,
        dtype=DTYPES[args.dtype] if args.dtype else None,
        offload=not args.no_offload,
        loras=[parse_lora_arg(spec) for spec in args.lora],
        fp8_matmul=args.fp8_matmul,
    )
    bar = tqdm(unit="step", desc="sampling", leave=False, file=sys.stderr)

    def progress(step: int, total: int, _x: torch.Tensor) -> None:
        bar.total = total
        bar.update(1)

    try:
        out = pipe(
            args.prompt, args.negative_prompt, preset=args.preset, steps=args.steps, cfg=args.cfg,
            width=args.width, height=args.height, base=args.base, aspect_ratio=args.aspect_ratio,
            seed=args.seed, num_images_per_prompt=args.batch, callback=progress, reasoner=reasoner,
        )
    finally:
        bar.close()
    paths = _output_paths(args.output, len(out.images))
    for image, settings, path in zip(out.images, out.settings, paths, strict=True):
        save_png(image, path, settings)
        print(f"{path}  (seed {settings['seed']}, {settings['width']}x{settings['height']})")
        if "refined_prompt" in settings:
            print(f"  refined prompt: {settings['refined_prompt']}")
    return paths


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_command("lens", lambda: generate(args))


if __name__ == "__main__":
    sys.exit(main())
