"""The Lens training loop: flow matching on a LensMMDiT, LoRA or full fine-tuning, any number of processes.

What a step does (per process; ``accelerate`` provides the processes, DDP and autocast):

1. take ``grad_accum`` one-bucket batches from the global batch sequence (cached latents and
   features, or images encoded on the fly by the frozen VAE and GPT-OSS encoder);
2. for each, draw timesteps and noise from a generator seeded by ``(seed, global batch number)``,
   predict the velocity, and back-propagate ``MSE / grad_accum`` (DDP averages over processes);
3. clip the gradient norm (1.0), AdamW step, warm-up-then-constant LR, EMA update;
4. log the loss (mean over processes) to CSV; checkpoint and render previews when due.

Because the batch sequence and every random draw are functions of the global batch number, a run
with ``W`` processes x ``A`` accumulation steps sees exactly the data and noise of one process with
``W*A`` accumulation steps, and a resumed run continues exactly where the checkpoint left off.
Precision: bf16 autocast with fp32 master weights on CUDA (LoRA: frozen base in bf16, LoRA in
fp32); plain fp32 on the CPU.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from lens_core.loading import load_mmdit, load_mmdit_config, load_text_encoder, load_vae
from lens_core.prompt import split_features, tokenize_prompts
from lens_core.safetensors_io import save_file_atomic
from lens_core.tokenizer import load_tokenizer
from lens_core.vae import pack_latents

from . import checkpoint as ckpt
from .buckets import BucketBatchSampler, stage_buckets
from .cache import CachedBatch, CachedDataset, CacheSettings, FileHasher, build_cache
from .config import TrainConfig
from .data import (
    BucketBatchLoader,
    LoadedBatch,
    MapDataset,
    SkipCounter,
    TarBucketStream,
    TarShardDataset,
    open_dataset,
)
from .ema import EMA
from .logs import LossLog
from .lora import add_lora, freeze_dead_parameters, load_lora_state_dict, lora_state_dict, save_lora
from .objective import batch_generator, drop_captions, flow_matching_loss, noise_batch
from .previews import PromptFeatures, render_previews

log = logging.getLogger("training")


class WarmupConstantDecay:
    """LR multiplier: linear warm-up from ~0 to 1 over ``warmup`` steps, constant (the paper's
    schedule), then, if ``decay`` > 0, a linear fall to 0 over the last ``decay`` of ``total`` steps
    (a short cool-down gives a better final model than stopping at full LR). A class, not a lambda,
    so the scheduler state is serialisable."""

    def __init__(self, warmup: int, total: int = 0, decay: int = 0) -> None:
        self.warmup, self.total, self.decay = int(warmup), int(total), int(decay)

    def __call__(self, step: int) -> float:
        rise = 1.0 if self.warmup <= 0 else min(1.0, (step + 1) / self.warmup)
        fall = 1.0 if self.decay <= 0 else min(1.0, max(0.0, (self.total - step) / self.decay))
        return min(rise, fall)


@dataclass
class TrainResult:
    """What :meth:`Trainer.train` returns."""

    step: int
    losses: dict[int, float]
    output: Path | None
    checkpoint: Path | None
    skipped: SkipCounter
    resumed_from: int = 0
    previews: list[Path] = field(default_factory=list)


def _identity(x):
    return x


def _batches(dataset, workers: int, sampler=None) -> Iterator:
    """Iterate ``dataset``'s ready-made batches (one bucket each) in ``workers`` worker processes."""
    loader = torch.utils.data.DataLoader(
        dataset,
        sampler=sampler,
        batch_size=None,
        collate_fn=_identity,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    return iter(loader)


def _dtype(name: str, device: torch.device, auto_cuda: torch.dtype) -> torch.dtype:
    if name == "auto":
        return auto_cuda if device.type == "cuda" else torch.float32
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype) or dt == torch.float16:
        raise ValueError(f"unsupported dtype {name!r}: use float32 or bfloat16")
    return dt


class Trainer:
    """Train Lens from a :class:`~training.config.TrainConfig`.

    ``accelerator`` may be passed in (tests, notebooks); by default one is made from the config.
    ``on_step_end(step)`` is called on every process after each optimizer step (progress hooks;
    the tests use it to kill a run).
    """

    def __init__(
        self,
        config: TrainConfig,
        accelerator: Accelerator | None = None,
        on_step_end: Callable[[int], None] | None = None,
    ) -> None:
        self.cfg = config
        t = config.train
        if accelerator is None:
            cpu = t.device == "cpu" or (t.device == "auto" and not torch.cuda.is_available())
            mp = t.mixed_precision
            if mp == "auto":
                mp = "no" if cpu else "bf16"
            accelerator = Accelerator(cpu=cpu, mixed_precision=mp)
        self.acc = accelerator
        self.device = accelerator.device
        self.on_step_end = on_step_end
        self.out = Path(t.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.skipped = SkipCounter()
        self.vae: nn.Module | None = None
        self.encoder: nn.Module | None = None
        self.prompt_features: dict[str, PromptFeatures] = {}
        self.tokenizer = load_tokenizer(config.model.tokenizer or None)
        self.mmdit_config = load_mmdit_config(config.model.component("transformer"))

    # -----------------------------------------------------------------------------------------
    # Frozen models
    # -----------------------------------------------------------------------------------------

    @property
    def frozen_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32

    def _load_vae(self) -> nn.Module:
        return load_vae(self.cfg.model.component("vae"), self.device, self.frozen_dtype)

    def _load_encoder(self) -> nn.Module:
        return load_text_encoder(
            self.cfg.model.component("text_encoder"),
            tuple(self.mmdit_config.selected_layer_index),
            self.device,
            self.frozen_dtype,
        )

    def _release(self, module: nn.Module) -> None:
        module.to("meta")
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.no_grad()
    def _encode_text(self, captions: list[str]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Online features: prefix dropped, padding zeroed (as the cache stores them)."""
        if self.encoder is None:
            self.encoder = self._load_encoder()
        ids, mask = tokenize_prompts(captions, self.tokenizer)
        feats = self.encoder(ids.to(self.device), mask.to(self.device))
        feats, mask = split_features(feats, mask.to(self.device))
        feats = [f * mask[..., None].to(f.dtype) for f in feats]
        return feats, mask

    # -----------------------------------------------------------------------------------------
    # Data
    # -----------------------------------------------------------------------------------------

    def _preview_prompts(self) -> list[str]:
        s = self.cfg.sample
        prompts = list(s.prompts)
        if s.negative_prompt.strip():
            prompts.append(s.negative_prompt)
        return prompts

    def _setup_data(self, start_position: int, stream_resume: dict[int, int]) -> Iterator:
        cfg, acc = self.cfg, self.acc
        b = cfg.buckets
        self.buckets = stage_buckets(b.stage, b.areas or None, b.aspect_ratios or None, b.batch_sizes or None)
        seed = cfg.train.seed
        workers = cfg.data.num_workers
        rank, world, accum = acc.process_index, acc.num_processes, cfg.train.grad_accum
        self.sampler: BucketBatchSampler | None = None
        self.stream_state: dict[int, int] = dict(stream_resume)

        if cfg.data.kind == "tar":
            source: MapDataset | TarShardDataset = TarShardDataset(
                cfg.data.shards or cfg.data.path,
                rank=0 if cfg.cache.enabled else rank,
                world=1 if cfg.cache.enabled else world,
                seed=seed,
                epochs=1 if cfg.cache.enabled else None,
            )
        else:
            kwargs = (
                {"caption_ext": cfg.data.caption_ext}
                if cfg.data.kind == "folder"
                else {
                    "image_field": cfg.data.image_field or None,
                    "caption_field": cfg.data.caption_field or None,
                }
            )
            source = open_dataset(cfg.data.kind, cfg.data.path, **kwargs)
            self.skipped.absorb(source.skipped)

        if cfg.cache.enabled:
            cache_dir = Path(cfg.cache.dir or self.out / "cache")
            hasher = FileHasher(cache_dir / "file_hashes.json")
            settings = CacheSettings(
                vae_identity=hasher.identity(cfg.model.component("vae"), "vae"),
                encoder_identity=hasher.identity(cfg.model.component("text_encoder"), "text_encoder"),
                selected_layers=tuple(self.mmdit_config.selected_layer_index),
                latent_dtype=cfg.cache.latent_dtype,
                text_dtype=cfg.cache.text_dtype,
                policy=b.area_policy,
                seed=seed,
                max_upscale=b.max_upscale,
            )
            manifest, self.cache_stats = build_cache(
                source,
                self.buckets,
                cache_dir,
                settings,
                self._load_vae,
                self._load_encoder,
                self.tokenizer,
                device=self.device,
                batch_size=cfg.cache.batch_size,
                extra_prompts=self._preview_prompts(),
                rank=rank,
                world=world,
                barrier=acc.wait_for_everyone,
                release=self._release,
            )
            self.skipped.absorb(self.cache_stats.skipped)
            dataset = CachedDataset(cache_dir, manifest, self.buckets)
            for p, key in manifest.prompts.items():
                feats = dataset.text_features(key)
                self.prompt_features[p] = PromptFeatures(
                    [f[None].float() for f in feats], torch.ones(1, feats[0].shape[0], dtype=torch.bool)
                )
            self.sampler = BucketBatchSampler(
                manifest.bucket_of(self.buckets), self.buckets, seed, b.drop_last
            )
            return _batches(dataset, workers, self.sampler.rank_batches(start_position, rank, world, accum))

        # Online: images decoded and encoded every step; the frozen models stay loaded.
        self.vae = self._load_vae()
        for p in self._preview_prompts():
            feats, mask = self._encode_text([p])
            self.prompt_features[p] = PromptFeatures([f.float() for f in feats], mask)
        if isinstance(source, TarShardDataset):
            stream = TarBucketStream(
                source, self.buckets, b.area_policy, seed, b.max_upscale, resume=stream_resume
            )
            return _batches(stream, workers)
        self.sampler = BucketBatchSampler(
            source.bucket_of(self.buckets, b.area_policy, seed, b.max_upscale),
            self.buckets,
            seed,
            b.drop_last,
        )
        batches = self.sampler.rank_batches(start_position, rank, world, accum)
        return _batches(BucketBatchLoader(source, self.buckets, self.sampler), workers, batches)

    def prepare_data(self) -> Iterator:
        """Scan the data and fill the cache (when enabled) without training: ``lens-train --cache-only``."""
        return self._setup_data(0, {})

    @torch.no_grad()
    def _model_inputs(
        self, batch: CachedBatch | LoadedBatch
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, tuple[int, int]]:
        """``(x0 tokens, feats, mask, grid_hw)`` on the device, encoding online batches."""
        if isinstance(batch, CachedBatch):
            feats = [f.to(self.device, non_blocking=True) for f in batch.feats]
            return batch.latents.to(self.device), feats, batch.mask.to(self.device), batch.grid_hw
        self.skipped.merge(batch.skipped)
        if self.vae is None:
            self.vae = self._load_vae()
        z = self.vae.encode(batch.images.to(self.device)).float()
        feats, mask = self._encode_text(batch.captions)
        return pack_latents(z), feats, mask, (z.shape[-2], z.shape[-1])

    # -----------------------------------------------------------------------------------------
    # Model and optimizer
    # -----------------------------------------------------------------------------------------

    def _setup_model(self) -> None:
        cfg = self.cfg
        t = cfg.train
        # Full fine-tuning keeps fp32 master weights (compute runs in bf16 autocast on GPUs);
        # LoRA keeps the frozen base in base_dtype (bf16 on GPUs) and the LoRA weights in fp32.
        dtype = _dtype(t.base_dtype, self.device, torch.bfloat16) if t.mode == "lora" else torch.float32
        model = load_mmdit(cfg.model.component("transformer"), self.device, dtype)
        if t.mode == "lora":
            torch.manual_seed(t.seed)  # same LoRA init on every rank and in every run
            add_lora(model, cfg.lora.rank, cfg.lora.alpha or None, cfg.lora.dropout)
        else:
            model.requires_grad_(True)
            freeze_dead_parameters(model)
        model.gradient_checkpointing = t.gradient_checkpointing
        model.train()
        if t.compile:
            model.compile()  # in place: parameter names (checkpoints, EMA, LoRA files) stay as they are
        self.trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        decay = [p for n, p in self.trainable if p.ndim >= 2]
        no_decay = [p for n, p in self.trainable if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": t.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        optimizer = torch.optim.AdamW(groups, lr=t.learning_rate, betas=tuple(t.betas), eps=t.eps)
        schedule = WarmupConstantDecay(t.warmup_steps, t.max_steps, t.decay_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        self.ema = EMA(self.trainable, t.ema_decay) if t.ema_decay > 0 else None
        # The scheduler is stepped by hand once per optimizer step: accelerate's prepared
        # scheduler would step once per process.
        self.fsdp = self.acc.distributed_type == DistributedType.FSDP
        if self.fsdp and self.ema is not None:
            raise ValueError(
                "EMA is not supported with FSDP (its weights would be shards); set ema_decay = 0"
            )
        self.model, self.optimizer = self.acc.prepare(model, optimizer)

    @property
    def unwrapped(self) -> nn.Module:
        return self.acc.unwrap_model(self.model)

    # -----------------------------------------------------------------------------------------
    # Checkpoints
    # -----------------------------------------------------------------------------------------

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        if self.cfg.train.mode == "lora":
            return lora_state_dict(self.unwrapped)
        state = self.acc.get_state_dict(self.model)
        return {k: v.detach().cpu().contiguous() for k, v in state.items()}

    def save_checkpoint(self, step: int) -> Path | None:
        """Write the checkpoint of ``step`` (all processes must call it)."""
        acc = self.acc
        tmp = ckpt.tmp_dir(self.ckpt_root, step)
        if acc.is_main_process:
            ckpt.begin(self.ckpt_root, step)
        acc.wait_for_everyone()
        rank_state = {"rng": ckpt.rng_state(), "stream": self.stream_state}
        ckpt.write_json(tmp / f"rank_{acc.process_index}.json", rank_state)
        if self.fsdp:
            acc.save_state(str(tmp / "accelerate"))  # sharded model + optimizer; every rank writes its part
        trainable = None if self.fsdp else self._trainable_state()
        if acc.is_main_process:
            if trainable is not None:
                save_file_atomic(trainable, tmp / "trainable.safetensors")
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            if self.ema is not None:
                save_file_atomic(self.ema.state_dict(), tmp / "ema.safetensors")
        acc.wait_for_everyone()
        final = None
        if acc.is_main_process:
            state = {
                "step": step,
                "scheduler": self.scheduler.state_dict(),
                "sampler": self.sampler.state_dict() if self.sampler is not None else None,
                "ema_updates": self.ema.updates if self.ema is not None else 0,
                "world_size": acc.num_processes,
                "grad_accum": self.cfg.train.grad_accum,
                "mode": self.cfg.train.mode,
            }
            ckpt.write_json(tmp / ckpt.STATE_FILE, state)  # last: marks the folder complete
            final = ckpt.commit(self.ckpt_root, step, self.cfg.train.keep_checkpoints)
        acc.wait_for_everyone()
        return final or ckpt.step_dir(self.ckpt_root, step)

    def _read_resume_state(self, path: Path) -> tuple[dict, dict]:
        state = ckpt.read_json(path / ckpt.STATE_FILE)
        if state["mode"] != self.cfg.train.mode:
            raise ValueError(
                f"{path}: checkpoint is a {state['mode']} run, the config says {self.cfg.train.mode}"
            )
        rank_file = path / f"rank_{self.acc.process_index}.json"
        rank_state = ckpt.read_json(rank_file) if rank_file.is_file() else {}
        return state, rank_state

    def _load_checkpoint(self, path: Path, state: dict, rank_state: dict) -> None:
        if self.fsdp:
            self.acc.load_state(str(path / "accelerate"))
        else:
            trainable = load_file(str(path / "trainable.safetensors"), device=str(self.device))
            if self.cfg.train.mode == "lora":
                load_lora_state_dict(self.unwrapped, trainable)
            else:
                self.unwrapped.load_state_dict(trainable, strict=True)
            opt_state = torch.load(path / "optimizer.pt", map_location=self.device, weights_only=True)
            self.optimizer.load_state_dict(opt_state)
        self.scheduler.load_state_dict(state["scheduler"])
        # The schedule comes from this run's config (a resumed run may be extended or cooled down).
        schedule = WarmupConstantDecay(self.cfg.train.warmup_steps, self.cfg.train.max_steps, self.cfg.train.decay_steps)
        self.scheduler.lr_lambdas[0] = schedule
        for group, base in zip(self.scheduler.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
            group["lr"] = base * schedule(self.scheduler.last_epoch)
        if self.ema is not None:
            if (path / "ema.safetensors").is_file():
                self.ema.load_state_dict(
                    load_file(str(path / "ema.safetensors"), device=str(self.device)), state["ema_updates"]
                )
            else:
                log.warning("%s has no EMA: starting the EMA from the current weights", path)
        if self.sampler is not None and state.get("sampler"):
            self.sampler.load_state_dict(state["sampler"])
        if "rng" in rank_state:
            ckpt.set_rng_state(rank_state["rng"])
        elif self.acc.num_processes > 1:
            log.warning("%s has no RNG state for rank %d", path, self.acc.process_index)

    # -----------------------------------------------------------------------------------------
    # The loop
    # -----------------------------------------------------------------------------------------

    def _micro_step(self, batch, position: int, accum: int, sync: bool) -> tuple[torch.Tensor, int, int]:
        x0, feats, mask, grid_hw = self._model_inputs(batch)
        gen = batch_generator(self.cfg.train.seed, position)
        noised = noise_batch(x0, self.timesteps, gen)
        feats, mask = drop_captions(feats, mask, self.cfg.train.caption_dropout, gen)
        ctx = contextlib.nullcontext() if sync else self.acc.no_sync(self.model)
        with ctx:
            with self.acc.autocast():
                pred = self.model(noised.x_t, noised.sigmas, feats, mask, grid_hw)
            loss = flow_matching_loss(pred, noised.target)
            self.acc.backward(loss / accum)
        return loss.detach(), x0.shape[0], x0.shape[1]

    def _previews(self, step: int) -> list[Path]:
        s = self.cfg.sample
        paths: list[Path] = []
        if self.acc.is_main_process and s.prompts:
            if self.vae is None:
                self.vae = self._load_vae()
            negative = self.prompt_features.get(s.negative_prompt) if s.negative_prompt.strip() else None
            swap = self.ema.swapped() if (self.ema is not None and s.use_ema) else contextlib.nullcontext()
            with swap:
                paths = render_previews(
                    self.unwrapped,
                    self.vae,
                    s.prompts,
                    self.prompt_features,
                    s.seeds,
                    self.out / "samples" / f"step_{step:08d}",
                    step,
                    s.width,
                    s.height,
                    s.steps,
                    s.cfg,
                    negative,
                    self.acc.autocast,
                )
        self.acc.wait_for_everyone()
        return paths

    def _save_outputs(self) -> Path | None:
        """Final weights in ``output_dir`` (main process)."""
        t, acc = self.cfg.train, self.acc
        sd = lora_state_dict(self.unwrapped) if t.mode == "lora" else self._trainable_state()
        if not acc.is_main_process:
            return None
        save_dtype = _dtype(self.cfg.lora.save_dtype, torch.device("cpu"), torch.bfloat16)
        if t.mode == "lora":
            out = save_lora(self.unwrapped, self.out / "lora.safetensors", "peft", save_dtype, state=sd)
            if self.cfg.lora.save_kohya:
                save_lora(self.unwrapped, self.out / "lora_kohya.safetensors", "kohya", save_dtype, state=sd)
            if self.ema is not None:
                ema = {
                    "transformer." + n.replace(".default.", "."): v for n, v in self.ema.state_dict().items()
                }
                save_lora(self.unwrapped, self.out / "lora_ema.safetensors", "peft", save_dtype, state=ema)
            return out
        meta = {"config": json.dumps({"selected_layer_index": list(self.mmdit_config.selected_layer_index)})}
        out = save_file_atomic(
            {k: v.to(save_dtype) for k, v in sd.items()}, self.out / "transformer.safetensors", meta
        )
        if self.ema is not None:
            ema = {n: v.to(save_dtype) for n, v in self.ema.state_dict().items()}
            full = {k: ema.get(k, v.to(save_dtype)) for k, v in sd.items()}
            save_file_atomic(full, self.out / "transformer_ema.safetensors", meta)
        return out

    def _output_path(self) -> Path:
        return self.out / ("lora.safetensors" if self.cfg.train.mode == "lora" else "transformer.safetensors")

    def _finish_done_run(self, path: Path, state: dict, rank_state: dict, step: int) -> TrainResult:
        """Re-running a finished run: nothing to train; write the final weights if a kill lost them."""
        if not self._output_path().is_file():
            self.sampler = None
            self._setup_model()
            self._load_checkpoint(path, state, rank_state)
            self._save_outputs()
        self.acc.wait_for_everyone()
        log.info("%s: already trained to step %d", self.out, step)
        return TrainResult(step, {}, self._output_path(), path, self.skipped, step, [])

    def train(self, resume: str | Path | None = "auto") -> TrainResult:
        """Run (or continue) training up to ``train.max_steps``.

        ``resume``: ``"auto"`` (newest complete checkpoint in ``output_dir/checkpoints``, if any),
        a checkpoint folder, or None (start fresh).
        """
        cfg, acc = self.cfg, self.acc
        t = cfg.train
        self.timesteps = cfg.timesteps.build()
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            ckpt.write_json(self.out / "config.json", cfg.to_dict())
        acc.wait_for_everyone()

        resume_path: Path | None = None
        if resume == "auto":
            resume_path = ckpt.find_latest(self.ckpt_root)
        elif resume is not None:
            resume_path = Path(resume)
        elif acc.is_main_process and ckpt.complete_checkpoints(self.ckpt_root):
            # Starting over: move the old run's checkpoints aside so they are neither pruned
            # into nor resumed from by mistake.
            aside = self.ckpt_root.with_name(f"checkpoints.old-{time.strftime('%Y%m%d-%H%M%S')}")
            self.ckpt_root.rename(aside)
            log.warning("starting over: previous checkpoints moved to %s", aside)
        acc.wait_for_everyone()
        state, rank_state = self._read_resume_state(resume_path) if resume_path else ({}, {})
        start_step = int(state.get("step", 0))
        per_step = acc.num_processes * t.grad_accum
        if state and (state["world_size"] * state["grad_accum"]) != per_step:
            raise ValueError(
                f"{resume_path}: saved with {state['world_size']} process(es) x {state['grad_accum']} accumulation; "
                f"resuming needs the same global batch ({per_step} batches per step now)"
            )
        start_position = (state.get("sampler") or {}).get("position", 0) if state else 0
        if resume_path is not None and start_step >= t.max_steps:
            return self._finish_done_run(resume_path, state, rank_state, start_step)
        if acc.is_main_process:
            log.info(
                "training %s on %d process(es) (%s, %s), %s precision, %d batch(es) per process per step",
                t.mode,
                acc.num_processes,
                acc.distributed_type.value,
                self.device,
                acc.mixed_precision,
                t.grad_accum,
            )
        data = self._setup_data(start_position, {int(k): v for k, v in rank_state.get("stream", {}).items()})
        self._setup_model()
        if resume_path:
            self._load_checkpoint(resume_path, state, rank_state)
            log.info("resumed from %s (step %d)", resume_path, start_step)

        losses: dict[int, float] = {}
        loss_log = None
        if acc.is_main_process:
            tb = str(self.out / "tensorboard") if t.tensorboard else None
            loss_log = LossLog(self.out / "loss_log.csv", start_step, tb)
        progress = None
        if acc.is_main_process and t.progress:
            from tqdm.auto import tqdm

            progress = tqdm(
                total=t.max_steps, initial=start_step, desc="lens-train", unit="step", dynamic_ncols=True
            )

        last_ckpt = resume_path
        previews: list[Path] = []
        step = start_step
        position = start_position
        try:
            while step < t.max_steps:
                started = time.perf_counter()
                self.optimizer.zero_grad(set_to_none=True)
                loss_sum = torch.zeros((), device=self.device)
                images = tokens = 0
                for k in range(t.grad_accum):
                    batch = next(data)
                    if getattr(batch, "stream", None) is not None:
                        w, n = batch.stream
                        self.stream_state[w] = n + 1
                    loss, b, n_tok = self._micro_step(
                        batch, batch.position, t.grad_accum, k == t.grad_accum - 1
                    )
                    loss_sum += loss
                    images += b
                    tokens = n_tok
                grad_norm = (
                    # all parameters (frozen ones have no gradient): under FSDP accelerate then uses
                    # the sharded model's own clip, which computes the global norm
                    self.acc.clip_grad_norm_(self.model.parameters(), t.grad_clip)
                    if t.grad_clip > 0
                    else torch.zeros(())
                )
                lr = self.optimizer.param_groups[0]["lr"]  # the rate this step used
                self.optimizer.step()
                self.scheduler.step()
                if self.ema is not None:
                    self.ema.update()
                step += 1
                position += per_step
                if self.sampler is not None:
                    self.sampler.position = position
                mean_loss = acc.reduce(loss_sum / t.grad_accum, reduction="mean").item()
                total_images = int(
                    acc.reduce(torch.tensor(images, device=self.device), reduction="sum").item()
                )
                losses[step] = mean_loss
                elapsed = time.perf_counter() - started
                if loss_log is not None and (step % max(1, t.log_every) == 0 or step == t.max_steps):
                    loss_log.write(
                        {
                            "step": step,
                            "loss": mean_loss,
                            "lr": lr,
                            "grad_norm": float(grad_norm),
                            "images": total_images,
                            "tokens": tokens,
                            "skipped": self.skipped.count,
                            "seconds": round(elapsed, 6),
                        }
                    )
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(
                        loss=f"{mean_loss:.4f}", img_s=f"{total_images / max(elapsed, 1e-9):.1f}"
                    )
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(
                        f"loss became {mean_loss} at step {step}; lower the learning rate"
                    )
                if t.checkpoint_every and step % t.checkpoint_every == 0 and step < t.max_steps:
                    last_ckpt = self.save_checkpoint(step)
                if cfg.sample.every and step % cfg.sample.every == 0 and step < t.max_steps:
                    previews += self._previews(step)
                if self.on_step_end is not None:
                    self.on_step_end(step)
            last_ckpt = self.save_checkpoint(step)
            output = self._save_outputs()
            previews += self._previews(step)
        finally:
            if progress is not None:
                progress.close()
            if loss_log is not None:
                loss_log.close()
        if self.skipped.count:
            log.warning("%s", self.skipped.summary())
        acc.wait_for_everyone()
        return TrainResult(step, losses, output, last_ckpt, self.skipped, start_step, previews)
