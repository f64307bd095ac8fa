"""Aspect-ratio bucketing as Lens was trained: base areas x the nine W:H aspect ratios.

The paper pre-trains at one low resolution (512^2, 1024 tokens) and then continues with 27
buckets = 3 base areas x 9 aspect ratios, each batch drawn from ONE bucket so every tensor in it
has the same shape, with per-area batch sizes (24 / 10 / 6 for small / medium / large) chosen so
that ranks finish a step in about the same wall-clock time whatever bucket they drew.

Everything here is pure Python + Pillow (no model, no torch tensors) so it can be tested on its
own and used by the cache builder, the online loader and the streaming tar loader alike.

Bucket sizes: for bases 1024 and 1440 the official inference table of
:mod:`lens_core.resolution` is used (what the model was trained and is run at); for other bases
(256, 512, tiny test areas) a bucket is the exact-area size ``(base*sqrt(r), base/sqrt(r))``
rounded to multiples of 16. Buckets of one area that round to the same size are merged.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from lens_core.resolution import ASPECT_RATIOS, BUCKETS

MULTIPLE = 16
PAPER_AREAS: tuple[int, ...] = (256, 512, 1024)
"""Default base sides of the mixed-resolution stage (small / medium / large area)."""
PAPER_BATCH_SIZES: tuple[int, ...] = (24, 10, 6)
"""Per-rank batch size for each base area of :data:`PAPER_AREAS` (from the paper)."""
LOW_RES_AREA = 512
"""The low-resolution pre-training stage: fixed 512^2 (1024 image tokens)."""

AREA_POLICIES = ("random", "fit")


@dataclass(frozen=True)
class Bucket:
    """One training resolution. ``height``/``width`` are pixels (multiples of 16)."""

    index: int
    height: int
    width: int
    base: int  # base side of the area class (e.g. 512 for 512^2)
    area_index: int  # position of ``base`` in the configured areas
    aspect: str  # W:H name, e.g. "16:9"
    batch_size: int

    @property
    def tokens(self) -> int:
        """MMDiT image tokens: (H/16) * (W/16)."""
        return (self.height // 16) * (self.width // 16)

    @property
    def grid_hw(self) -> tuple[int, int]:
        return self.height // 16, self.width // 16

    @property
    def log_aspect(self) -> float:
        return math.log(self.width / self.height)


def _round_multiple(value: float, multiple: int = MULTIPLE) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def _ratio(name: str) -> float:
    w, h = (int(p) for p in name.split(":"))
    return w / h


def bucket_size(base: int, aspect: str) -> tuple[int, int]:
    """``(height, width)`` of the ``aspect`` (W:H) bucket of area ``base^2``."""
    if base in BUCKETS and aspect in BUCKETS[base]:
        return BUCKETS[base][aspect]
    r = _ratio(aspect)
    return _round_multiple(base / math.sqrt(r)), _round_multiple(base * math.sqrt(r))


def make_buckets(
    areas: Sequence[int] = PAPER_AREAS,
    aspect_ratios: Sequence[str] = ASPECT_RATIOS,
    batch_sizes: Sequence[int] = PAPER_BATCH_SIZES,
) -> list[Bucket]:
    """All buckets, area-major, aspect ratios in the given order (duplicates within an area merged).

    ``batch_sizes[i]`` is the batch size of every bucket of ``areas[i]``.
    """
    if len(areas) != len(batch_sizes):
        raise ValueError(f"need one batch size per area: {len(areas)} areas, {len(batch_sizes)} batch sizes")
    if list(areas) != sorted(set(areas)):
        raise ValueError(f"areas must be strictly increasing, got {list(areas)}")
    for a in aspect_ratios:
        try:
            _ratio(a)
        except ValueError:
            raise ValueError(f"aspect ratio {a!r} is not of the form W:H") from None
    buckets: list[Bucket] = []
    for ai, (base, bs) in enumerate(zip(areas, batch_sizes, strict=True)):
        if base < MULTIPLE or bs < 1:
            raise ValueError(f"area {base} must be >= {MULTIPLE} and batch size {bs} >= 1")
        seen: set[tuple[int, int]] = set()
        for aspect in aspect_ratios:
            h, w = bucket_size(base, aspect)
            if (h, w) in seen:
                continue
            seen.add((h, w))
            buckets.append(Bucket(len(buckets), h, w, base, ai, aspect, int(bs)))
    return buckets


def stage_buckets(
    stage: str,
    areas: Sequence[int] | None = None,
    aspect_ratios: Sequence[str] | None = None,
    batch_sizes: Sequence[int] | None = None,
) -> list[Bucket]:
    """Buckets of a training stage of the paper, with any part overridden.

    ``"low_res"``: one area (512^2), square only unless ``aspect_ratios`` says otherwise, batch 24.
    ``"mixed"``: 256^2 / 512^2 / 1024^2 x 9 aspect ratios, batch sizes 24 / 10 / 6.
    """
    if stage == "low_res":
        areas = areas or (LOW_RES_AREA,)
        aspect_ratios = aspect_ratios or ("1:1",)
        batch_sizes = batch_sizes or (PAPER_BATCH_SIZES[0],) * len(areas)
    elif stage == "mixed":
        areas = areas or PAPER_AREAS
        aspect_ratios = aspect_ratios or ASPECT_RATIOS
        batch_sizes = batch_sizes or PAPER_BATCH_SIZES
    else:
        raise ValueError(f"unknown stage {stage!r}; choose 'low_res' or 'mixed'")
    return make_buckets(areas, aspect_ratios, batch_sizes)


def _stable_unit(seed: int, key: str) -> float:
    """A uniform number in [0, 1) from (seed, key), identical on every machine and run."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def area_class(
    width: int,
    height: int,
    areas: Sequence[int],
    policy: str = "random",
    key: str = "",
    seed: int = 0,
    max_upscale: float = 1.0,
) -> int:
    """Index of the base area an image of ``width x height`` trains at.

    Areas the image covers without upscaling by more than ``max_upscale`` (per side) are
    eligible; none eligible -> the smallest. ``"fit"`` takes the largest eligible area;
    ``"random"`` one of them uniformly, fixed per image by a hash of ``(seed, key)`` so the
    choice does not depend on dataset order and a cached latent stays valid.
    """
    if policy not in AREA_POLICIES:
        raise ValueError(f"unknown area policy {policy!r}; choose one of {AREA_POLICIES}")
    pixels = width * height * max_upscale * max_upscale
    eligible = [i for i, base in enumerate(areas) if base * base <= pixels] or [0]
    if policy == "fit":
        return eligible[-1]
    return eligible[int(_stable_unit(seed, key) * len(eligible))]


def assign_bucket(
    width: int,
    height: int,
    buckets: Sequence[Bucket],
    policy: str = "random",
    key: str = "",
    seed: int = 0,
    max_upscale: float = 1.0,
) -> Bucket:
    """The bucket of an image: its area class, then the nearest aspect ratio (in log space)."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    areas = sorted({b.base for b in buckets})
    ai = area_class(width, height, areas, policy, key, seed, max_upscale)
    base = areas[ai]
    target = math.log(width / height)
    candidates = [b for b in buckets if b.base == base]
    return min(candidates, key=lambda b: (abs(b.log_aspect - target), b.index))


def resize_and_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """Scale ``image`` to cover ``width x height`` (aspect kept), then centre-crop to it.

    Downscaling uses Lanczos with ``reducing_gap`` (fast and alias-free for big reductions);
    the crop box is centred, rounded half down so it is identical on every platform.
    """
    w, h = image.size
    scale = max(width / w, height / h)
    new_w = max(width, math.ceil(w * scale - 1e-6))
    new_h = max(height, math.ceil(h * scale - 1e-6))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.LANCZOS, reducing_gap=3.0)
    left = (new_w - width) // 2
    top = (new_h - height) // 2
    return image.crop((left, top, left + width, top + height))


# ---------------------------------------------------------------------------------------------
# Batch samplers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BucketBatch:
    """One batch: dataset indices that all belong to ``bucket``; ``position`` = global batch number."""

    bucket: int
    indices: tuple[int, ...]
    position: int


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (stable; used for per-epoch and per-batch generators)."""
    digest = hashlib.blake2b(",".join(map(str, values)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass
class BucketBatchSampler:
    """Endless, seeded sequence of one-bucket batches over a map-style dataset.

    Every epoch shuffles each bucket's items, cuts them into batches of the bucket's batch size
    (the last partial batch is dropped unless ``drop_last=False``) and shuffles the order of all
    batches, so consecutive batches come from different buckets. The whole sequence is a pure
    function of ``(seed, bucket_of, batch sizes)``: :meth:`batch` computes batch ``i`` directly,
    which is what makes resuming exact and what lets every rank agree on the global order
    without communication. ``position`` is the next global batch to hand out; a trainer with
    ``world`` ranks and ``accum`` micro-batches per step consumes ``world * accum`` per step.
    """

    bucket_of: Sequence[int]
    buckets: Sequence[Bucket]
    seed: int = 0
    drop_last: bool = True
    shuffle: bool = True
    position: int = 0
    _epoch_cache: tuple[int, list[tuple[int, tuple[int, ...]]]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.bucket_of = list(self.bucket_of)
        members: dict[int, list[int]] = {b.index: [] for b in self.buckets}
        for i, b in enumerate(self.bucket_of):
            if b not in members:
                raise ValueError(f"item {i} is in bucket {b}, which is not configured")
            members[b].append(i)
        self._members = members
        per_epoch = 0
        for b in self.buckets:
            n = len(members[b.index])
            per_epoch += n // b.batch_size if self.drop_last else math.ceil(n / b.batch_size)
        if per_epoch == 0:
            sizes = {f"{b.width}x{b.height}": len(members[b.index]) for b in self.buckets if members[b.index]}
            raise ValueError(
                f"no bucket has a full batch (items per bucket: {sizes}); use smaller batch sizes, "
                "more images, or drop_last = false"
            )
        self.batches_per_epoch = per_epoch

    def bucket_counts(self) -> dict[int, int]:
        """Items per bucket index."""
        return {b: len(m) for b, m in self._members.items()}

    def fingerprint(self) -> str:
        """Identifies the batch sequence; a resume with another dataset or buckets is refused."""
        h = hashlib.sha256()
        h.update(repr((self.seed, self.drop_last, self.shuffle)).encode())
        h.update(repr([(b.height, b.width, b.batch_size) for b in self.buckets]).encode())
        h.update(np.asarray(self.bucket_of, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]

    def _epoch(self, epoch: int) -> list[tuple[int, tuple[int, ...]]]:
        if self._epoch_cache is not None and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        rng = np.random.Generator(np.random.PCG64(mix_seed(self.seed, epoch)))
        batches: list[tuple[int, tuple[int, ...]]] = []
        for b in self.buckets:
            items = np.asarray(self._members[b.index], dtype=np.int64)
            if self.shuffle:
                items = items[rng.permutation(len(items))]
            stop = len(items) - len(items) % b.batch_size if self.drop_last else len(items)
            for start in range(0, stop, b.batch_size):
                batches.append((b.index, tuple(int(i) for i in items[start : start + b.batch_size])))
        if self.shuffle:
            order = rng.permutation(len(batches))
            batches = [batches[i] for i in order]
        self._epoch_cache = (epoch, batches)
        return batches

    def batch(self, position: int) -> BucketBatch:
        """Global batch number ``position`` (epoch = position // batches_per_epoch)."""
        epoch, offset = divmod(position, self.batches_per_epoch)
        bucket, indices = self._epoch(epoch)[offset]
        return BucketBatch(bucket, indices, position)

    def epoch_of(self, position: int) -> int:
        return position // self.batches_per_epoch

    def members(self, bucket: int) -> list[int]:
        """Dataset indices in ``bucket`` (replacements for a batch whose images all fail to decode)."""
        return self._members[bucket]

    def __iter__(self) -> Iterator[BucketBatch]:
        while True:
            batch = self.batch(self.position)
            self.position += 1
            yield batch

    def rank_batches(
        self, start: int, rank: int = 0, world: int = 1, accum: int = 1
    ) -> Iterator[BucketBatch]:
        """The micro-batches of one rank from global batch ``start`` on, in consumption order.

        Step ``t`` uses global batches ``start + t*world*accum ... + world*accum - 1``; micro-batch
        ``k`` of rank ``r`` is ``... + k*world + r``. One process with ``accum = A*W`` therefore sees
        exactly the batches ``W`` processes with ``accum = A`` see together.
        """
        per_step = world * accum
        step = 0
        while True:
            base = start + step * per_step
            for k in range(accum):
                yield self.batch(base + k * world + rank)
            step += 1

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("fingerprint") not in (None, self.fingerprint()):
            raise ValueError(
                "cannot resume the batch sampler: the dataset, buckets, batch sizes or seed changed "
                f"(saved {state.get('fingerprint')}, now {self.fingerprint()})"
            )
        self.position = int(state["position"])
