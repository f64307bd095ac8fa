"""``lens-train CONFIG.toml``: train Lens (LoRA or full fine-tune) from a TOML config.

Single process::

    lens-train run.toml

Several processes (DDP; CPU runs use gloo)::

    accelerate launch --multi_gpu --num_processes 8 -m training.cli run.toml
    torchrun --nproc_per_node 8 -m training.cli run.toml

(``accelerate launch --cpu --num_processes N`` starts only ONE process; on a CPU-only machine
``--multi_gpu`` starts N processes that train on the CPU with gloo.)

A run resumes automatically from the newest complete checkpoint in ``<output_dir>/checkpoints``
(``--resume none`` starts over, ``--resume PATH`` picks one). ``--cache-only`` fills the latent and
feature cache and stops, so caching can run on other machines than training. Other commands:
``lens-train convert-lora IN OUT --to kohya|peft``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def _train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .trainer import Trainer

    cfg = load_config(args.config)
    for item in args.set or []:
        _override(cfg, item)
    if args.max_steps is not None:
        cfg.train.max_steps = args.max_steps
    if args.cache_only:
        cfg.cache.enabled = True
    trainer = Trainer(cfg)
    if args.cache_only:
        trainer.prepare_data()
        stats = trainer.cache_stats
        if trainer.acc.is_main_process:
            print(
                f"cache ready: latents {stats.latent_hits} hit / {stats.latent_misses} computed, "
                f"captions {stats.text_hits} hit / {stats.text_misses} computed; {trainer.skipped.summary()}"
            )
        return 0
    resume = None if args.resume == "none" else args.resume
    result = trainer.train(resume=resume)
    if trainer.acc.is_main_process:
        last = result.losses.get(result.step)
        print(
            f"done: step {result.step}"
            + (f", loss {last:.4f}" if last is not None else "")
            + f"; weights: {result.output}; {result.skipped.summary()}"
        )
    return 0


def _override(cfg, item: str) -> None:
    """``--set train.learning_rate=3e-5``: TOML value syntax on the right-hand side."""
    from .config import tomllib

    key, _, value = item.partition("=")
    section, _, name = key.strip().partition(".")
    if not name or not hasattr(cfg, section) or not hasattr(getattr(cfg, section), name):
        raise SystemExit(f"--set {item!r}: unknown option (use section.name=value)")
    parsed = tomllib.loads(f"v = {value.strip()}")["v"] if value.strip() else ""
    setattr(getattr(cfg, section), name, parsed)


def _convert(args: argparse.Namespace) -> int:
    from lens_core.lora import convert_lora_file

    print(convert_lora_file(args.src, args.dst, args.to))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if argv[:1] == ["convert-lora"]:
        p = argparse.ArgumentParser(
            prog="lens-train convert-lora", description="Rewrite a Lens LoRA in another naming."
        )
        p.add_argument("src")
        p.add_argument("dst")
        p.add_argument("--to", choices=("kohya", "peft"), required=True)
        return _convert(p.parse_args(argv[1:]))
    p = argparse.ArgumentParser(prog="lens-train", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="TOML config file")
    p.add_argument("--resume", default="auto", help="'auto' (default), 'none' or a checkpoint folder")
    p.add_argument("--max-steps", type=int, default=None, help="override train.max_steps")
    p.add_argument("--cache-only", action="store_true", help="build the latent/feature cache and stop")
    p.add_argument("--set", action="append", metavar="SECTION.NAME=VALUE", help="override a config option")
    try:
        return _train(p.parse_args(argv))
    except (ValueError, FileNotFoundError) as e:
        print(f"lens-train: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
