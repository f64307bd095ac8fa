"""Training configuration: typed sections, read from TOML, every unknown key reported.

A run is described by one TOML file (``lens-train run.toml``); every field has a default, so the
smallest config names only the model, the data and the output folder::

    [model]
    path = "/models/Lens"            # pipeline root with transformer/ text_encoder/ vae/

    [data]
    kind = "folder"                  # "folder" | "manifest" | "tar"
    path = "/data/my-style"

    [train]
    output_dir = "runs/my-style"
    mode = "lora"                    # or "full"
    max_steps = 2000

Relative paths are resolved against the config file's folder. See ``training/README.md`` for
every option (and the FSDP setup for full fine-tuning).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from lens_core.resolution import ASPECT_RATIOS

from .objective import DEFAULT_SHIFT_POINTS, TimestepConfig


@dataclass
class ModelConfig:
    """Where the three components are. ``path`` (a pipeline root) fills any of the others left empty.

    ``tokenizer`` empty = the bundled o200k_harmony (identical ids; validated on load).
    """

    path: str = ""
    transformer: str = ""
    text_encoder: str = ""
    vae: str = ""
    tokenizer: str = ""

    def component(self, name: str) -> str:
        value = getattr(self, name) or self.path
        if not value:
            raise ValueError(f"[model] needs 'path' (a pipeline folder) or '{name}'")
        return value


@dataclass
class DataConfig:
    """The training images. ``kind``: ``folder`` (image + same-name .txt), ``manifest`` (JSONL/CSV)
    or ``tar`` (WebDataset shards: a glob, a ``{000..099}`` range or a list in ``shards``)."""

    kind: str = "folder"
    path: str = ""
    shards: list[str] = field(default_factory=list)
    caption_ext: str = ".txt"
    image_field: str = ""
    caption_field: str = ""
    num_workers: int = 2


@dataclass
class BucketConfig:
    """Aspect-ratio buckets (see :mod:`training.buckets`). Empty lists take the stage's paper defaults.

    ``stage``: ``mixed`` (256^2/512^2/1024^2 x 9 ratios, batch 24/10/6) or ``low_res`` (512^2).
    ``area_policy``: ``random`` (any area the image covers, fixed per image) or ``fit`` (largest).
    """

    stage: str = "mixed"
    areas: list[int] = field(default_factory=list)
    aspect_ratios: list[str] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    area_policy: str = "random"
    max_upscale: float = 1.0
    drop_last: bool = True

    def __post_init__(self) -> None:
        for a in self.aspect_ratios:
            if a not in ASPECT_RATIOS:
                raise ValueError(f"[buckets] aspect ratio {a!r} is not one of {', '.join(ASPECT_RATIOS)}")


@dataclass
class CacheConfig:
    """Latent/feature cache (:mod:`training.cache`). On by default: the encoder then never sits
    beside the training MMDiT. ``dir`` empty = ``<output_dir>/cache``."""

    enabled: bool = True
    dir: str = ""
    latent_dtype: str = "float32"
    text_dtype: str = "bfloat16"
    batch_size: int = 8


@dataclass
class TimestepSection:
    """Logit-normal timesteps and their token-count shift (see :mod:`training.objective`)."""

    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: str = "interpolate"
    shift_points: list[list[float]] = field(default_factory=lambda: [list(p) for p in DEFAULT_SHIFT_POINTS])
    mu: float = 0.0
    sampler_steps: int = 20

    def build(self) -> TimestepConfig:
        pts = self.shift_points
        if len(pts) != 2 or any(len(p) != 2 for p in pts):
            raise ValueError("[timesteps] shift_points must be two [tokens, mu] pairs")
        return TimestepConfig(
            self.logit_mean,
            self.logit_std,
            self.shift,
            ((float(pts[0][0]), float(pts[0][1])), (float(pts[1][0]), float(pts[1][1]))),
            self.mu,
            self.sampler_steps,
        )


@dataclass
class LoraSection:
    """LoRA size. ``alpha`` 0 = rank (scaling 1). ``save_kohya`` also writes a kohya-named copy."""

    rank: int = 16
    alpha: float = 0.0
    dropout: float = 0.0
    save_dtype: str = "bfloat16"
    save_kohya: bool = True


@dataclass
class SampleSection:
    """Preview images every ``every`` steps (0 = only at the end) with fixed prompts and seeds."""

    every: int = 0
    prompts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    negative_prompt: str = ""
    steps: int = 20
    cfg: float = 5.0
    width: int = 1024
    height: int = 1024
    use_ema: bool = True


@dataclass
class TrainSection:
    """Optimisation and bookkeeping.

    ``mixed_precision``: ``auto`` = bf16 autocast on CUDA, fp32 on the CPU; or ``bf16``/``no``.
    ``bf16`` pays on CPUs with bf16 matrix units too (Intel AMX / AVX512-BF16: matmuls about 10x
    fp32 there, see ``benchmarks/bench_training.py``).
    ``compile``: run the MMDiT through ``torch.compile`` (fused kernels; the first steps compile).
    ``base_dtype`` (LoRA only): dtype of the frozen weights; ``auto`` = bf16 on CUDA, fp32 on CPU.
    ``grad_accum`` micro-batches per optimizer step per process. ``ema_decay`` 0 = no EMA.
    ``checkpoint_every`` 0 = only at the end; ``keep_checkpoints`` newest complete ones kept.
    ``caption_dropout``: fraction of captions replaced by the empty prompt (what CFG's
    unconditional branch sees); 0.1 is usual when training from scratch, 0 for fine-tunes.
    ``decay_steps``: the LR falls linearly to 0 over the last this-many steps of ``max_steps``
    (warm-up, constant, then decay); 0 = constant to the end, as the paper.
    """

    output_dir: str = "lens-train-output"
    mode: str = "lora"
    max_steps: int = 1000
    learning_rate: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01
    eps: float = 1e-8
    warmup_steps: int = 100
    decay_steps: int = 0
    grad_clip: float = 1.0
    grad_accum: int = 1
    mixed_precision: str = "auto"
    base_dtype: str = "auto"
    compile: bool = False
    gradient_checkpointing: bool = True
    ema_decay: float = 0.0
    caption_dropout: float = 0.0
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 1
    tensorboard: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.mode not in ("lora", "full"):
            raise ValueError(f"[train] mode must be 'lora' or 'full', got {self.mode!r}")
        if self.mixed_precision not in ("auto", "bf16", "no"):
            raise ValueError(
                f"[train] mixed_precision must be auto, bf16 or no, got {self.mixed_precision!r}"
            )
        if self.grad_accum < 1 or self.max_steps < 1:
            raise ValueError("[train] grad_accum and max_steps must be >= 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"[train] ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"[train] caption_dropout must be in [0, 1], got {self.caption_dropout}")
        if not 0 <= self.decay_steps <= self.max_steps:
            raise ValueError(f"[train] decay_steps must be in [0, max_steps={self.max_steps}], got {self.decay_steps}")


@dataclass
class TrainConfig:
    """The whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    buckets: BucketConfig = field(default_factory=BucketConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    timesteps: TimestepSection = field(default_factory=TimestepSection)
    lora: LoraSection = field(default_factory=LoraSection)
    sample: SampleSection = field(default_factory=SampleSection)
    train: TrainSection = field(default_factory=TrainSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_PATH_FIELDS = {
    ("model", "path"),
    ("model", "transformer"),
    ("model", "text_encoder"),
    ("model", "vae"),
    ("model", "tokenizer"),
    ("data", "path"),
    ("cache", "dir"),
    ("train", "output_dir"),
}


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"[{where}] unknown option(s) {unknown}; known: {sorted(names)}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ValueError(f"[{name}] must be a table")
            kwargs[name] = _build(hint, value, name)
            continue
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        expected = getattr(hint, "__origin__", hint)
        if expected in (int, float, str, bool, list) and not isinstance(value, expected):
            raise ValueError(f"[{where}] {name} must be {expected.__name__}, got {value!r}")
        if expected is int and isinstance(value, bool):
            raise ValueError(f"[{where}] {name} must be int, got {value!r}")
        kwargs[name] = value
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any], base_dir: str | Path | None = None) -> TrainConfig:
    """Build and validate a :class:`TrainConfig`; relative paths are taken from ``base_dir``."""
    cfg: TrainConfig = _build(TrainConfig, data, "config")
    if base_dir is not None:
        base = Path(base_dir)
        for section, name in _PATH_FIELDS:
            sec = getattr(cfg, section)
            value = getattr(sec, name)
            if value and not Path(value).expanduser().is_absolute():
                setattr(sec, name, str((base / value).resolve()))
        cfg.data.shards = [
            s if Path(s).expanduser().is_absolute() else str(base / s) for s in cfg.data.shards
        ]
    return cfg


def load_config(path: str | Path) -> TrainConfig:
    """Read a TOML config file (``tomllib``; ``tomli`` on Python 3.10)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: invalid TOML ({e})") from e
    return config_from_dict(data, path.parent)
