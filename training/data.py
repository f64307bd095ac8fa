"""Image-caption datasets for Lens training: a folder, a manifest, or WebDataset tar shards.

Three sources cover what people have:

* :class:`FolderDataset` -- ``photo.jpg`` + ``photo.txt`` side by side (kohya / musubi style);
* :class:`ManifestDataset` -- a JSONL or CSV file listing image paths and captions;
* :class:`TarShardDataset` -- WebDataset shards (``key.jpg``/``key.png`` + ``key.txt`` members)
  streamed with the standard ``tarfile`` module (no webdataset dependency), split across ranks
  and DataLoader workers by shard.

A broken image never stops training: a file that is not an image, a truncated JPEG or a
decompression bomb is skipped and counted in a :class:`SkipCounter` (and logged), wherever it is
found -- when the dataset is scanned (headers) or when the pixels are decoded. Decoding happens in
DataLoader workers, so skips found there travel back with the batch and are merged into the
trainer's counter.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import hashlib
import io
import json
import logging
import os
import tarfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .buckets import Bucket, BucketBatch, BucketBatchSampler, assign_bucket, resize_and_crop

log = logging.getLogger("training.data")

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
CAPTION_EXTENSIONS: tuple[str, ...] = (".txt", ".caption")
_EXIF_ORIENTATION = 0x0112
_LOG_FIRST = 20  # skips logged one by one; later ones every 100th


class UnreadableImage(Exception):
    """An image that cannot be decoded (not an image, truncated, too large...)."""


@dataclass
class SkipCounter:
    """Counts skipped samples by reason; the count is what the tests and the loss log report.

    ``examples`` keeps the first few ``(key, reason)`` pairs for error messages.
    """

    count: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    examples: list[tuple[str, str]] = field(default_factory=list)
    pending: list[tuple[str, str]] = field(default_factory=list, repr=False)
    quiet: bool = False  # counters inside workers stay quiet: the trainer logs what they report

    def add(self, key: str, reason: str, log_it: bool = True) -> None:
        self.count += 1
        self.pending.append((key, reason))
        short = reason.split(":", 1)[0]
        self.by_reason[short] = self.by_reason.get(short, 0) + 1
        if len(self.examples) < 10:
            self.examples.append((key, reason))
        if log_it and not self.quiet and (self.count <= _LOG_FIRST or self.count % 100 == 0):
            log.warning("skipped %s: %s (%d skipped so far)", key, reason, self.count)

    def merge(self, skipped: Iterable[tuple[str, str]], log_it: bool = True) -> None:
        for key, reason in skipped:
            self.add(key, reason, log_it)

    def absorb(self, other: SkipCounter) -> None:
        """Add another counter's totals (already logged where they happened)."""
        self.count += other.count
        for r, n in other.by_reason.items():
            self.by_reason[r] = self.by_reason.get(r, 0) + n
        self.examples.extend(other.examples[: max(0, 10 - len(self.examples))])

    def drain(self) -> list[tuple[str, str]]:
        """Skips recorded since the last drain (a worker sends them to the main process)."""
        out, self.pending = self.pending, []
        return out

    def summary(self) -> str:
        if not self.count:
            return "no samples skipped"
        parts = ", ".join(f"{n} {r}" for r, n in sorted(self.by_reason.items()))
        return f"{self.count} samples skipped ({parts})"


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning, Image.DecompressionBombError)


@contextlib.contextmanager
def _open(source: str | os.PathLike | bytes, problem: str) -> Iterator[Image.Image]:
    """Open an image (a path or encoded bytes); every Pillow failure, decompression-bomb warnings
    included, becomes UnreadableImage ("``problem``: ...")."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
                yield im
    except _IMAGE_ERRORS as e:
        raise UnreadableImage(f"{problem}: {type(e).__name__}: {e}") from e


def probe_image(source: str | os.PathLike | bytes) -> tuple[int, int]:
    """``(width, height)`` as displayed (EXIF rotation applied), reading only the header.

    Raises UnreadableImage for anything Pillow cannot identify. A truncated body is only found
    by :func:`decode_image`.
    """
    with _open(source, "unreadable image") as im:
        w, h = im.size
        orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    if w < 1 or h < 1:
        raise UnreadableImage(f"unreadable image: empty size {w}x{h}")
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def decode_image(source: str | os.PathLike | bytes) -> Image.Image:
    """Fully decode to RGB: EXIF rotation applied, transparency composited on white.

    Raises UnreadableImage for truncated or corrupt data (Pillow's ``LOAD_TRUNCATED_IMAGES`` is
    left off on purpose: a half-grey training image is worse than a skipped one).
    """
    with _open(source, "corrupt image") as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return im.convert("RGB")


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 ``[3, H, W]`` in [-1, 1] (what the VAE encoder expects)."""
    a = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(a.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def load_for_bucket(source: str | os.PathLike | bytes, bucket: Bucket) -> torch.Tensor:
    """Decode, resize-and-centre-crop to the bucket, and convert: ``[3, H, W]`` in [-1, 1]."""
    return image_to_tensor(resize_and_crop(decode_image(source), bucket.height, bucket.width))


# ---------------------------------------------------------------------------------------------
# Map-style datasets (folder, manifest)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRecord:
    """One training pair. ``path`` is the image file; ``width``/``height`` as displayed."""

    key: str
    caption: str
    path: str
    width: int
    height: int


class MapDataset:
    """Common part of the folder and manifest datasets: a list of probed records.

    Records whose image header cannot be read are left out at scan time and counted in
    ``skipped``; images that fail later (truncated data) are counted by the loader.
    """

    def __init__(self, records: list[ImageRecord], skipped: SkipCounter, source: str) -> None:
        self.records = records
        self.skipped = skipped
        self.source = source
        if not records:
            raise ValueError(f"{source}: no usable image-caption pairs found ({skipped.summary()})")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> ImageRecord:
        return self.records[i]

    def fingerprint(self) -> str:
        """Cheap identity of the data (paths, sizes, mtimes, captions): names the cache manifest."""
        h = hashlib.sha256(self.source.encode())
        for r in self.records:
            st = os.stat(r.path)
            h.update(f"{r.path}\0{st.st_size}\0{st.st_mtime_ns}\0{r.caption}\0".encode())
        return h.hexdigest()[:20]

    def bucket_of(
        self, buckets: Sequence[Bucket], policy: str = "random", seed: int = 0, max_upscale: float = 1.0
    ) -> list[int]:
        """Bucket index of every record (see :func:`training.buckets.assign_bucket`)."""
        return [
            assign_bucket(r.width, r.height, buckets, policy, r.key, seed, max_upscale).index
            for r in self.records
        ]


def _probe_records(pairs: Iterable[tuple[str, str, str]], skipped: SkipCounter) -> list[ImageRecord]:
    records = []
    for key, path, caption in pairs:
        try:
            w, h = probe_image(path)
        except UnreadableImage as e:
            skipped.add(key, str(e))
            continue
        except OSError as e:  # vanished file, permissions
            skipped.add(key, f"unreadable image: {e}")
            continue
        records.append(ImageRecord(key, caption, path, w, h))
    return records


def _read_caption(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace").strip()


class FolderDataset(MapDataset):
    """Images with a same-name caption file beside them (``a/b.png`` + ``a/b.txt``), recursively.

    Images without a caption are skipped and counted (``missing caption``); files are taken in
    sorted order so the dataset (and hence the batch order) is the same on every machine.
    """

    def __init__(self, root: str | os.PathLike, caption_ext: str = ".txt", recursive: bool = True) -> None:
        root_path = Path(root).expanduser()
        if not root_path.is_dir():
            raise ValueError(f"{root_path}: not a folder")
        skipped = SkipCounter()
        files = sorted(root_path.rglob("*") if recursive else root_path.iterdir())
        pairs = []
        for f in files:
            if not f.is_file() or f.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            key = f.relative_to(root_path).as_posix()
            cap = f.with_suffix(caption_ext)
            if not cap.is_file():
                skipped.add(key, "missing caption: no " + cap.name)
                continue
            pairs.append((key, str(f), _read_caption(cap)))
        super().__init__(_probe_records(pairs, skipped), skipped, f"folder:{root_path.resolve()}")


_IMAGE_FIELDS = ("image", "file_name", "path", "image_path", "img")
_CAPTION_FIELDS = ("caption", "text", "prompt")


def _pick(row: dict, preferred: str | None, fallbacks: Sequence[str], what: str, where: str) -> str:
    for name in ([preferred] if preferred else []) + list(fallbacks):
        if name in row and row[name] is not None:
            return str(row[name])
    raise ValueError(
        f"{where}: no {what} field (tried {[preferred, *fallbacks] if preferred else list(fallbacks)})"
    )


class ManifestDataset(MapDataset):
    """A JSONL (one object per line) or CSV/TSV (header row) manifest of image paths and captions.

    Field names default to the first of ``image``/``file_name``/``path`` and
    ``caption``/``text``/``prompt`` present; relative image paths are relative to the manifest's
    folder. Rows whose image is missing or unreadable are skipped and counted.
    """

    def __init__(
        self, path: str | os.PathLike, image_field: str | None = None, caption_field: str | None = None
    ) -> None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise ValueError(f"{path}: manifest not found")
        rows: list[dict] = []
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json", ".ndjson"):
            with path.open(encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except ValueError as e:
                            raise ValueError(f"{path}:{n}: not valid JSON ({e})") from e
        elif suffix in (".csv", ".tsv"):
            with path.open(encoding="utf-8", newline="") as f:
                rows = list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
        else:
            raise ValueError(f"{path}: manifest must be .jsonl or .csv/.tsv")
        skipped = SkipCounter()
        pairs = []
        for n, row in enumerate(rows, 1):
            where = f"{path}:{n}"
            image = Path(_pick(row, image_field, _IMAGE_FIELDS, "image", where)).expanduser()
            caption = _pick(row, caption_field, _CAPTION_FIELDS, "caption", where)
            if not image.is_absolute():
                image = path.parent / image
            key = f"{n}:{image.name}"
            if not image.is_file():
                skipped.add(key, f"missing image: {image}")
                continue
            pairs.append((key, str(image), caption.strip()))
        super().__init__(_probe_records(pairs, skipped), skipped, f"manifest:{path.resolve()}")


def open_dataset(kind: str, path: str | os.PathLike, **kwargs) -> MapDataset:
    """``kind`` ``"folder"`` or ``"manifest"`` (tar shards stream: see :class:`TarShardDataset`)."""
    if kind == "folder":
        return FolderDataset(path, **kwargs)
    if kind == "manifest":
        return ManifestDataset(path, **kwargs)
    raise ValueError(f"unknown map-style dataset kind {kind!r}")


@dataclass
class LoadedBatch:
    """Decoded pixels of one bucket batch, plus what was skipped while decoding it."""

    images: torch.Tensor  # [B, 3, H, W] in [-1, 1]
    captions: list[str]
    keys: list[str]
    bucket: int
    position: int
    skipped: list[tuple[str, str]]
    stream: tuple[int, int] | None = None  # (worker, batch number in its stream) for tar shards


class BucketBatchLoader(torch.utils.data.Dataset):
    """Decodes a :class:`~training.buckets.BucketBatch` of a map-style dataset into pixels.

    Used as ``DataLoader(loader, sampler=<iterable of BucketBatch>, batch_size=None)`` so the
    decoding runs in workers. Images that fail to decode are dropped and reported (the batch gets
    smaller, still one bucket). If every image of a batch fails, replacements are tried
    deterministically -- first from the same bucket, then from the others -- so a batch is never
    empty and every rank keeps stepping; only a dataset with no decodable image at all raises.
    """

    MAX_FALLBACKS = 64  # replacement attempts per bucket

    def __init__(self, dataset: MapDataset, buckets: Sequence[Bucket], sampler: BucketBatchSampler) -> None:
        self.dataset = dataset
        self.buckets = {b.index: b for b in buckets}
        self.sampler = sampler

    def __len__(self) -> int:  # not used by the DataLoader with a sampler; defined for completeness
        return len(self.dataset)

    def _try(self, i: int, bucket: Bucket, skipped: list[tuple[str, str]]) -> torch.Tensor | None:
        rec = self.dataset[i]
        try:
            return load_for_bucket(rec.path, bucket)
        except (UnreadableImage, OSError) as e:
            skipped.append((rec.key, str(e)))
            return None

    def __getitem__(self, batch: BucketBatch) -> LoadedBatch:
        skipped: list[tuple[str, str]] = []
        bucket = self.buckets[batch.bucket]
        loaded = [(i, t) for i in batch.indices if (t := self._try(i, bucket, skipped)) is not None]
        if not loaded:
            tried = set(batch.indices)
            order = [batch.bucket] + [b for b in self.buckets if b != batch.bucket]
            for b in order:
                members = self.sampler.members(b)
                for j in range(min(len(members), self.MAX_FALLBACKS)):
                    i = members[(batch.position + j) % len(members)]
                    if i in tried:
                        continue
                    tried.add(i)
                    t = self._try(i, self.buckets[b], skipped)
                    if t is not None:
                        bucket, loaded = self.buckets[b], [(i, t)]
                        break
                if loaded:
                    break
        if not loaded:
            raise RuntimeError(f"no image of {self.dataset.source} can be decoded ({len(skipped)} tried)")
        recs = [self.dataset[i] for i, _ in loaded]
        return LoadedBatch(
            torch.stack([t for _, t in loaded]),
            [r.caption for r in recs],
            [r.key for r in recs],
            bucket.index,
            batch.position,
            skipped,
        )


# ---------------------------------------------------------------------------------------------
# WebDataset tar shards
# ---------------------------------------------------------------------------------------------


@dataclass
class RawSample:
    """One sample read from a shard: the undecoded image bytes and its caption."""

    key: str
    caption: str
    data: bytes
    shard: str
    index: int  # position of the sample within its shard
    width: int = 0  # filled by probing (displayed size)
    height: int = 0


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset naming: the key is the path up to the first dot of the basename."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (dot + ext).lower()


def _caption_from(members: dict[str, bytes]) -> str | None:
    for ext in CAPTION_EXTENSIONS:
        if ext in members:
            return members[ext].decode("utf-8", errors="replace").strip()
    if ".json" in members:
        try:
            meta = json.loads(members[".json"])
        except ValueError:
            return None
        for name in _CAPTION_FIELDS:
            if isinstance(meta, dict) and isinstance(meta.get(name), str):
                return meta[name].strip()
    return None


def expand_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard paths from a list, a glob (``data/*.tar``) or a brace range (``shard-{000..009}.tar``)."""
    if not isinstance(spec, (str, os.PathLike)):
        out: list[str] = []
        for s in spec:
            out.extend(expand_shards(s))
        return out
    text = str(Path(spec).expanduser())
    if "{" in text and ".." in text:
        head, rest = text.split("{", 1)
        rng, tail = rest.split("}", 1)
        lo, hi = rng.split("..")
        width = len(lo)
        return [p for i in range(int(lo), int(hi) + 1) for p in expand_shards(f"{head}{i:0{width}d}{tail}")]
    if any(c in text for c in "*?["):
        return sorted(glob.glob(text))
    return [text]


class TarShardDataset(torch.utils.data.IterableDataset):
    """Streams ``(image bytes, caption)`` samples from WebDataset tar shards with ``tarfile``.

    Shards are split by rank (``shards[rank::world]``) and then by DataLoader worker; each epoch
    visits this split's shards in an order shuffled by ``(seed, epoch)``. A member group is a
    sample when it has one image (``.jpg``/``.png``/...) and a caption (``.txt``, ``.caption``
    or a ``.json`` with a ``caption``/``text`` field). Unreadable images, samples without
    caption or image and unreadable/truncated shards are skipped and counted in ``skipped``
    (per process: workers report through :class:`LoadedBatch`).

    ``epochs=None`` streams forever (training); ``epochs=1`` makes one pass (caching).
    """

    def __init__(
        self,
        shards: str | Sequence[str],
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        shuffle_shards: bool = True,
        epochs: int | None = 1,
        start_epoch: int = 0,
    ) -> None:
        super().__init__()
        self.shards = expand_shards(shards)
        if not self.shards:
            raise ValueError(f"no tar shards match {shards!r}")
        missing = [s for s in self.shards if not Path(s).is_file()]
        if missing:
            raise ValueError(f"tar shard(s) not found: {missing[:3]}")
        self.rank, self.world = rank, world
        self.seed = seed
        self.shuffle_shards = shuffle_shards
        self.epochs = epochs
        self.start_epoch = start_epoch
        self.skipped = SkipCounter(quiet=True)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for s in self.shards:
            st = os.stat(s)
            h.update(f"{Path(s).resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        return h.hexdigest()[:20]

    def split(self, worker: int = 0, num_workers: int = 1) -> list[str]:
        """This rank's and worker's shards (before the per-epoch shuffle)."""
        return self.shards[self.rank :: self.world][worker::num_workers]

    def _epoch_order(self, shards: list[str], epoch: int) -> list[str]:
        if not self.shuffle_shards:
            return list(shards)
        rng = np.random.Generator(np.random.PCG64([self.seed, epoch, self.rank]))
        return [shards[i] for i in rng.permutation(len(shards))]

    def read_shard(self, shard: str) -> Iterator[RawSample]:
        """Every sample of one shard in member order; skips are counted, nothing raises."""
        index = 0
        current: str | None = None
        members: dict[str, bytes] = {}

        def finish() -> RawSample | None:
            nonlocal index
            if current is None:
                return None
            index += 1
            key = f"{Path(shard).name}/{current}"
            image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
            caption = _caption_from(members)
            if image_ext is None:
                self.skipped.add(key, "missing image: no image member")
                return None
            if caption is None:
                self.skipped.add(key, "missing caption: no .txt/.caption/.json member")
                return None
            data = members[image_ext]
            try:
                w, h = probe_image(data)
            except UnreadableImage as e:
                self.skipped.add(key, str(e))
                return None
            return RawSample(key, caption, data, shard, index - 1, w, h)

        try:
            with tarfile.open(shard, mode="r|*") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    k, ext = _split_key(info.name)
                    if k != current:
                        sample = finish()
                        if sample is not None:
                            yield sample
                        current, members = k, {}
                    f = tar.extractfile(info)
                    members[ext] = f.read() if f is not None else b""
            sample = finish()
            if sample is not None:
                yield sample
        except (tarfile.TarError, OSError, EOFError) as e:
            self.skipped.add(Path(shard).name, f"unreadable shard: {type(e).__name__}: {e}")

    def __iter__(self) -> Iterator[RawSample]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shards = self.split(worker, num_workers)
        epoch = self.start_epoch
        while self.epochs is None or epoch < self.start_epoch + self.epochs:
            if not shards:
                return
            for shard in self._epoch_order(shards, epoch):
                yield from self.read_shard(shard)
            epoch += 1


def stream_bucket_batches(
    samples: Iterable[RawSample],
    buckets: Sequence[Bucket],
    policy: str = "random",
    seed: int = 0,
    max_upscale: float = 1.0,
) -> Iterator[tuple[Bucket, list[RawSample]]]:
    """Group a stream into one-bucket batches: a batch leaves as soon as its bucket's buffer is full.

    Only header sizes are used, so replaying a stream to resume costs reading, not decoding.
    """
    buffers: dict[int, list[RawSample]] = {}
    for s in samples:
        b = assign_bucket(s.width, s.height, buckets, policy, s.key, seed, max_upscale)
        buf = buffers.setdefault(b.index, [])
        buf.append(s)
        if len(buf) == b.batch_size:
            yield b, buf
            buffers[b.index] = []


class TarBucketStream(torch.utils.data.IterableDataset):
    """Online (uncached) training from shards: endless one-bucket :class:`LoadedBatch` es.

    Every batch carries ``stream = (worker, n)``: the n-th batch of that worker's stream. To
    resume, pass ``resume = {worker: next n}``; each worker replays its stream from the shard
    headers (no decoding) and starts there. With ``num_workers <= 1`` resuming is exact; with more
    workers each batch is still used once, but the DataLoader's round-robin may interleave the
    workers differently after the restart. Each rank needs at least ``num_workers`` shards.
    """

    def __init__(
        self,
        shards: TarShardDataset,
        buckets: Sequence[Bucket],
        policy: str = "random",
        seed: int = 0,
        max_upscale: float = 1.0,
        resume: dict[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.shards = shards
        self.buckets = list(buckets)
        self.policy, self.seed, self.max_upscale = policy, seed, max_upscale
        self.resume = dict(resume or {})

    def __iter__(self) -> Iterator[LoadedBatch]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        start = self.resume.get(worker, 0)
        counter = self.shards.skipped
        counter.drain()
        batches = stream_bucket_batches(
            iter(self.shards), self.buckets, self.policy, self.seed, self.max_upscale
        )
        for n, (bucket, samples) in enumerate(batches):
            if n < start:
                counter.drain()  # already reported before the restart
                continue
            images, captions, keys = [], [], []
            skipped = counter.drain()
            for s in samples:
                try:
                    images.append(load_for_bucket(s.data, bucket))
                except UnreadableImage as e:
                    skipped.append((s.key, str(e)))
                    continue
                captions.append(s.caption)
                keys.append(s.key)
            if not images:  # every image of the batch was corrupt; its skips go out with the next batch
                counter.pending[:0] = skipped
                continue
            position = (n * num_workers + worker) * self.shards.world + self.shards.rank
            yield LoadedBatch(
                torch.stack(images), captions, keys, bucket.index, position, skipped, stream=(worker, n)
            )
