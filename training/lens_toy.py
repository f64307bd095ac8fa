"""Lens-Toy: a small Lens (same architecture and code paths) trained on generated flat-shape scenes.

The recipe, every stage reproducible from a seed on a CPU:

1. ``vae``: a small FLUX.2-architecture VAE trained on toy scenes (:mod:`training.vae_trainer`);
2. ``data``: rendered scenes at the bucket sizes (several aspect ratios, no cropping, so captions
   stay true) with dense captions or short prompts (:mod:`training.toy_scenes`);
3. ``init``: a pipeline folder with that VAE, a frozen random GPT-OSS-architecture encoder (the
   real o200k_harmony tokenizer; its features are a fixed function of the tokens, which is all the
   MMDiT needs) and an MMDiT with adaLN-zero initialisation (every block starts as the identity);
4. ``train``: full training of the MMDiT with :class:`training.trainer.Trainer` (flow matching,
   cached latents and features, EMA);
5. ``eval``: ToyEval on held-out prompts at CFG 1 and CFG > 1;
6. ``export``: the trained pipeline in bf16 into ``lens_core/default_model``;
7. ``grid``: the README's picture - the first held-out ToyEval prompts at CFG 4, each captioned
   with its prompt and ToyEval's verdict (not picked by hand).

    python -m training.lens_toy all --out runs/lens-toy      # vae, data, init, train, eval
    python -m training.lens_toy export --out runs/lens-toy   # then replace the shipped default
    python -m training.lens_toy grid --grid docs/lens_toy_grid.png
"""

from __future__ import annotations

import argparse
import json
import shutil
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from lens_core.image_io import save_png
from lens_core.loading import load_mmdit
from lens_core.mmdit import MMDiTConfig
from lens_core.pipeline import DEFAULT_MODEL_DIR, LensPipeline
from lens_core.random_weights import mmdit_config_json, tiny_configs, write_random_pipeline
from lens_core.safetensors_io import TensorSource, save_file_atomic
from lens_core.text_encoder import GptOssConfig
from lens_core.vae import VAEConfig

from .buckets import make_buckets
from .config import config_from_dict
from .toy_scenes import caption_scene, make_prompt_set, render_scene, sample_scene, short_prompt
from .toyeval import evaluate, format_table, score_image
from .trainer import Trainer
from .vae_trainer import save_vae, toy_image_batches, train_vae

AREA = 128
ASPECT_RATIOS = ("1:1", "3:4", "4:3", "9:16", "16:9")
VAE_CHANNELS = (32, 64, 64, 64)


def toy_configs() -> tuple[MMDiTConfig, GptOssConfig, VAEConfig]:
    """Lens-Toy sizes: a 4-block MMDiT of width 192 (3 heads of 64), the tiny GPT-OSS, a 4-level VAE."""
    _, encoder, _ = tiny_configs(encoder_hidden=32)
    mmdit = MMDiTConfig(num_layers=4, num_attention_heads=3, enc_hidden_dim=32, mlp_hidden_dim=512,
                        selected_layer_index=(0, 1, 2, 3))
    vae = VAEConfig(block_out_channels=VAE_CHANNELS, layers_per_block=1, norm_num_groups=16)
    return mmdit, encoder, vae


def write_dataset(folder: Path, n: int, seed: int, dense_fraction: float = 0.5) -> Path:
    """``n`` scenes rendered at the bucket sizes, each with a dense caption or a short prompt (``.txt``)."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [(b.width, b.height) for b in make_buckets([AREA], ASPECT_RATIOS, [1])]
    rng = np.random.default_rng(seed)
    for i in range(n):
        scene = sample_scene(rng, split="train")
        width, height = sizes[i % len(sizes)] if rng.random() < 0.5 else sizes[0]  # half square
        render_scene(scene, width, height).save(folder / f"{i:06d}.png")
        text = caption_scene(scene, rng) if rng.random() < dense_fraction else short_prompt(scene)
        (folder / f"{i:06d}.txt").write_text(text)
    return folder


def init_pipeline(root: Path, vae_dir: Path, seed: int) -> Path:
    """The starting pipeline: trained VAE, frozen random encoder, adaLN-zero MMDiT."""
    mmdit_cfg, enc_cfg, vae_cfg = toy_configs()
    write_random_pipeline(root, (mmdit_cfg, enc_cfg, vae_cfg), seed=seed, tokenizer_json=False)
    shutil.rmtree(root / "vae")
    shutil.copytree(vae_dir, root / "vae")
    index = json.loads((root / "model_index.json").read_text())
    (root / "model_index.json").write_text(json.dumps({**index, "default_resolution": AREA}, indent=2) + "\n")
    src = TensorSource.open(root / "transformer")
    state = {k: src[k].clone() for k in src}
    for k in state:
        # Zero modulation and output: each block's gates start at 0 (identity), the velocity at 0.
        if k.startswith(("norm_out.linear", "proj_out")) or ".img_mod." in k or ".txt_mod." in k:
            state[k].zero_()
    for f in (root / "transformer").glob("*.safetensors"):
        f.unlink()
    save_file_atomic(state, root / "transformer" / "diffusion_pytorch_model.safetensors")
    return root


def fast_cpu_bf16() -> bool:
    """Whether this CPU has bf16 matrix units (Intel AMX or AVX512-BF16): there bf16 autocast runs the
    MMDiT's matmuls about 10x faster than fp32; elsewhere bf16 would only add rounding."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def train_config(pipeline: Path, data: Path, out: Path, steps: int, batch: int, lr: float, decay: int,
                 fast: bool = True, shift: str = "interpolate") -> dict:
    """The MMDiT run. ``fast``: bf16 autocast (where :func:`fast_cpu_bf16`) and ``torch.compile``.
    ``shift``: the paper's interpolation (mu 0.47 at Lens-Toy's 64 tokens; made the shipped model)
    or "sampler", the inference schedule's mu (1.83); the README's Lens-Toy section compares them."""
    return {
        "model": {"path": str(pipeline)},
        "data": {"kind": "folder", "path": str(data), "num_workers": 0},
        "buckets": {"stage": "low_res", "areas": [AREA], "aspect_ratios": list(ASPECT_RATIOS),
                    "batch_sizes": [batch], "area_policy": "fit"},
        "cache": {"enabled": True, "text_dtype": "float32"},
        "timesteps": {"shift": shift},
        "sample": {"every": 0, "prompts": ["a photo of a red circle to the left of a blue square"],
                   "seeds": [0], "steps": 20, "cfg": 4.0, "width": AREA, "height": AREA},
        "train": {"output_dir": str(out), "mode": "full", "max_steps": steps, "learning_rate": lr,
                  "warmup_steps": min(200, steps // 10), "decay_steps": decay, "weight_decay": 0.0, "gradient_checkpointing": False,
                  "ema_decay": 0.998, "caption_dropout": 0.1, "checkpoint_every": 500, "device": "cpu", "seed": 0,
                  "mixed_precision": "bf16" if fast and fast_cpu_bf16() else "no", "compile": fast},
    }


def assemble(init: Path, weights: Path, out: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """A pipeline folder: ``init``'s encoder/VAE/tokenizer files, trained MMDiT weights, all in ``dtype``."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(init, tmp)
    src = TensorSource.open(weights)
    mmdit = {k: src[k].to(dtype) for k in src}
    for f in (tmp / "transformer").glob("*.safetensors"):
        f.unlink()
    save_file_atomic(mmdit, tmp / "transformer" / "diffusion_pytorch_model.safetensors")
    (tmp / "transformer" / "config.json").write_text(json.dumps(mmdit_config_json(load_mmdit(tmp).config), indent=2))
    for part in ("text_encoder", "vae"):
        for f in (tmp / part).glob("*.safetensors"):
            s = TensorSource.open(f)
            save_file_atomic({k: s[k].to(dtype) if s[k].is_floating_point() else s[k] for k in s}, f)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def evaluate_model(model: Path, n: int, seed: int, cfgs: Sequence[float], steps: int = 20) -> dict[float, dict]:
    """ToyEval accuracy of ``model`` on ``n`` held-out prompts for each CFG scale."""
    specs = make_prompt_set(n, seed, split="heldout")
    pipe = LensPipeline.from_pretrained(model, device="cpu", offload=False)
    results = {}
    for cfg in cfgs:
        images = []
        for i in range(0, n, 16):
            chunk = specs[i:i + 16]
            out = pipe([s["prompt"] for s in chunk], steps=steps, cfg=cfg, width=AREA, height=AREA, seed=seed + i)
            images += out.images
        results[cfg] = evaluate(images, specs)
        print(f"CFG {cfg}:\n{format_table(results[cfg])}")
    return results


def image_grid(model: Path, n: int, seed: int, cfg: float = 4.0, columns: int = 4, steps: int = 20) -> Image.Image:
    """The first ``n`` held-out prompts rendered by ``model`` (the same images as :func:`evaluate_model`),
    each above its prompt, wrapped, and ToyEval's verdict (green "pass" / red "fail")."""
    specs = make_prompt_set(n, seed, split="heldout")
    pipe = LensPipeline.from_pretrained(model, device="cpu", offload=False)
    images = pipe([s["prompt"] for s in specs], steps=steps, cfg=cfg, width=AREA, height=AREA, seed=seed).images
    cell, text_h, pad = 2 * AREA, 64, 8
    rows = -(-n // columns)
    sheet = Image.new("RGB", (columns * (cell + pad) + pad, rows * (cell + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for k, (img, spec) in enumerate(zip(images, specs, strict=True)):
        x, y = pad + (k % columns) * (cell + pad), pad + (k // columns) * (cell + text_h + pad)
        sheet.paste(img.resize((cell, cell), Image.NEAREST), (x, y))
        ok = score_image(img, spec)["correct"]
        draw.text((x, y + cell + 2), "pass" if ok else "fail", fill=(0, 140, 0) if ok else (200, 0, 0), font=font)
        for i, line in enumerate(textwrap.wrap(spec["prompt"], 40)[:4]):
            draw.text((x + 30, y + cell + 2 + 13 * i), line, fill="black", font=font)
    return sheet


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["vae", "data", "init", "train", "eval", "export", "grid", "all"])
    p.add_argument("--out", type=Path, default=Path("runs/lens-toy"))
    p.add_argument("--vae-steps", type=int, default=3000)
    p.add_argument("--images", type=int, default=12000)
    p.add_argument("--steps", type=int, default=23000)
    p.add_argument("--decay", type=int, default=8000, help="LR cool-down over the last this-many steps")
    p.add_argument("--eager", action="store_true", help="train in fp32 without torch.compile")
    p.add_argument("--shift", choices=["interpolate", "sampler"], default="interpolate",
                   help="training timestep shift: the paper's token-count interpolation (the shipped model), "
                   "or the sampler's mu at ToyEval's 20 steps")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--eval-prompts", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", type=Path, default=Path("docs/lens_toy_grid.png"), help="grid stage: output image")
    p.add_argument("--grid-model", type=Path, default=DEFAULT_MODEL_DIR, help="grid stage: pipeline folder")
    args = p.parse_args(argv)
    out: Path = args.out
    # "all" stops before "export": replacing the shipped default model is a deliberate, separate step.
    stages = ["vae", "data", "init", "train", "eval"] if args.stage == "all" else [args.stage]
    t0 = time.time()
    for stage in stages:
        print(f"== {stage} ({time.time() - t0:.0f} s)")
        if stage == "vae":
            crops = toy_image_batches(16, AREA, args.seed, crop=AREA // 2)
            frames = toy_image_batches(16, AREA, args.seed + 1)
            vae = train_vae(toy_configs()[2], crops, args.vae_steps, lr=1e-3, seed=args.seed, stats_images=frames)
            save_vae(vae, out / "vae")
        elif stage == "data":
            write_dataset(out / "data", args.images, args.seed)
        elif stage == "init":
            init_pipeline(out / "init", out / "vae", args.seed)
        elif stage == "train":
            decay = min(args.decay, args.steps)
            cfg = config_from_dict(train_config(out / "init", out / "data", out / "run", args.steps, args.batch,
                                                args.lr, decay, fast=not args.eager, shift=args.shift))
            Trainer(cfg).train(resume="auto")
            run = out / "run"
            weights = run / "transformer_ema.safetensors"
            assemble(out / "init", weights if weights.exists() else run / "transformer.safetensors", out / "model")
        elif stage == "eval":
            results = evaluate_model(out / "model", args.eval_prompts, 1000 + args.seed, (1.0, 4.0))
            (out / "toyeval.json").write_text(json.dumps({str(k): v for k, v in results.items()}, indent=2))
        elif stage == "export":
            assemble(out / "model", out / "model" / "transformer", DEFAULT_MODEL_DIR)
            if (out / "toyeval.json").exists():  # the shipped model carries its measured score
                shutil.copy(out / "toyeval.json", DEFAULT_MODEL_DIR / "toyeval.json")
            print(f"exported to {DEFAULT_MODEL_DIR}")
        elif stage == "grid":
            settings = {"model": str(args.grid_model), "prompts": "ToyEval held-out", "seed": 1000 + args.seed, "cfg": 4.0}
            save_png(image_grid(args.grid_model, 12, 1000 + args.seed), args.grid, settings)
            print(f"wrote {args.grid}")
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
