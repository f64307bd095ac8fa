"""Disk cache of VAE latents and GPT-OSS features, so the MMDiT trains with neither model loaded.

The 20B encoder (~13-41 GB) and the MMDiT (8 GB bf16 + optimizer state) do not fit one GPU
together. Caching runs the VAE over every image (encoder not loaded), then the encoder over every
distinct caption (VAE released), and stores the results; training then reads tensors only.

Layout of ``cache_dir``::

    latents/<shard>.safetensors   tensors "<key>" = [128, H/16, W/16] normalised latent
    text/<shard>.safetensors      tensors "<key>/0".."<key>/3" = [S, 2880] encoder layer outputs
    manifests/<id>.json           one entry per usable image: latent key, text key, bucket
    file_hashes.json              memoised content hashes of the model files

Keys are SHA-256 digests of everything that determines the tensor, so a stale entry can never be
returned: a latent's key covers the VAE files' content hash, the bucket size, the preprocessing
version, the stored dtype and the image bytes; a caption's key covers the encoder files' content
hash, the selected layers, the stored dtype and the exact token ids (hence the tokenizer, the
prompt template and the 512-token truncation). Features are stored as the MMDiT sees them: after
the fixed 97-token prefix, padding trimmed, four layer tensors per caption.

Shards are written whole with ``save_file_atomic`` (temp file + rename): a killed caching run
keeps every finished shard and loses only the buffer, and re-running resumes with cache hits.
The index is rebuilt from the shard headers on open, so there is no index file to corrupt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from lens_core.loading import component_path
from lens_core.prompt import split_features, tokenize_prompts
from lens_core.safetensors_io import find_weight_files, read_header, save_file_atomic
from lens_core.vae import pack_latents

from .buckets import Bucket, BucketBatch, assign_bucket
from .data import MapDataset, SkipCounter, TarShardDataset, UnreadableImage, load_for_bucket

log = logging.getLogger("training.cache")

PREPROCESS_VERSION = "lanczos-cover-centercrop-exif-white-v1"
"""Bump when image preprocessing changes, so old latents stop matching."""
_HASH_CHUNK = 1 << 22


def _digest(payload: Mapping | Sequence | str) -> str:
    text = payload if isinstance(payload, str) else json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:40]


# ---------------------------------------------------------------------------------------------
# Model identity
# ---------------------------------------------------------------------------------------------


class FileHasher:
    """SHA-256 of file contents, memoised by ``(path, size, mtime_ns)`` in a JSON file.

    Content (not name or header) identifies a model: two fine-tunes with the same layout have
    identical headers. Hashing a 13 GB encoder takes a while once; later runs read the memo.
    """

    def __init__(self, memo: str | os.PathLike | None = None) -> None:
        self.memo_path = Path(memo) if memo else None
        self.memo: dict[str, str] = {}
        if self.memo_path and self.memo_path.is_file():
            try:
                self.memo = json.loads(self.memo_path.read_text())
            except ValueError:
                self.memo = {}

    def file_hash(self, path: str | os.PathLike) -> str:
        path = Path(path).resolve()
        st = path.stat()
        memo_key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
        if memo_key in self.memo:
            return self.memo[memo_key]
        h = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                h.update(chunk)
        self.memo[memo_key] = h.hexdigest()
        if self.memo_path:
            self.memo_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.memo_path.with_name(f".{self.memo_path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.memo, indent=1, sort_keys=True))
            os.replace(tmp, self.memo_path)
        return self.memo[memo_key]

    def identity(self, path: str | os.PathLike, component: str) -> str:
        """Content identity of a component's weights (file, sharded folder or pipeline root)."""
        files = find_weight_files(component_path(path, component))
        return _digest([self.file_hash(f) for f in files])


# ---------------------------------------------------------------------------------------------
# Sharded key -> tensors store
# ---------------------------------------------------------------------------------------------


class TensorStore:
    """Append-only store of ``key -> {name: tensor}`` in safetensors shards under one folder.

    Reading is lazy (memory-mapped ``safe_open`` handles, opened per process so DataLoader
    workers can share a store). Writing buffers entries and writes a shard when the buffer holds
    ``shard_bytes``; call :meth:`flush` at the end.
    """

    def __init__(self, folder: str | os.PathLike, shard_bytes: int = 256 << 20, tag: str = "") -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shard_bytes = shard_bytes
        self.tag = tag
        self.index: dict[str, tuple[Path, list[str]]] = {}
        self._shards: set[Path] = set()
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_keys: set[str] = set()
        self._buffer_bytes = 0
        self._handles: dict[Path, object] = {}
        self._pid = os.getpid()
        self._written = 0
        self.refresh()

    def refresh(self) -> None:
        """(Re)build the index from the shard headers on disk."""
        for shard in sorted(self.folder.glob("*.safetensors")):
            if shard in self._shards:
                continue
            self._shards.add(shard)
            try:
                header, _ = read_header(shard)
            except Exception as e:  # a foreign or damaged file: ignore it, its entries get recomputed
                log.warning("ignoring unreadable cache shard %s (%s)", shard, e)
                continue
            entries: dict[str, list[str]] = {}
            for name in header:
                key, _, part = name.partition("/")
                entries.setdefault(key, []).append(name)
            for key, names in entries.items():
                self.index[key] = (shard, sorted(names))

    def __contains__(self, key: str) -> bool:
        return key in self.index or key in self._buffer_keys

    def __len__(self) -> int:
        return len(self.index)

    def get(self, key: str) -> dict[str, torch.Tensor]:
        """The tensors of ``key`` by their part name (``""`` for a single tensor)."""
        from safetensors import safe_open

        if os.getpid() != self._pid:  # forked DataLoader worker: do not share file handles
            self._handles, self._pid = {}, os.getpid()
        shard, names = self.index[key]
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = safe_open(str(shard), framework="pt", device="cpu")
        return {n.partition("/")[2]: handle.get_tensor(n) for n in names}

    def put(self, key: str, tensors: Mapping[str, torch.Tensor]) -> None:
        self._buffer_keys.add(key)
        for part, t in tensors.items():
            name = f"{key}/{part}" if part else key
            t = t.detach().cpu().contiguous()
            self._buffer[name] = t
            self._buffer_bytes += t.numel() * t.element_size()
        if self._buffer_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        self._written += 1
        name = f"{time.time_ns():x}-{self.tag}{os.getpid()}-{self._written}.safetensors"
        path = save_file_atomic(self._buffer, self.folder / name, {"lens_cache": self.folder.name})
        self._shards.add(path)
        entries: dict[str, list[str]] = {}
        for n in self._buffer:
            entries.setdefault(n.partition("/")[0], []).append(n)
        for key, names in entries.items():
            self.index[key] = (path, sorted(names))
        self._buffer, self._buffer_bytes, self._buffer_keys = {}, 0, set()


# ---------------------------------------------------------------------------------------------
# Building the cache
# ---------------------------------------------------------------------------------------------


@dataclass
class CacheSettings:
    """Everything besides the data that decides what goes in the cache."""

    vae_identity: str
    encoder_identity: str
    selected_layers: tuple[int, ...]
    latent_dtype: str = "float32"
    text_dtype: str = "bfloat16"
    policy: str = "random"
    seed: int = 0
    max_upscale: float = 1.0


@dataclass
class CacheStats:
    """Hit/miss counts of one :func:`build_cache` call (misses = tensors computed)."""

    latent_hits: int = 0
    latent_misses: int = 0
    text_hits: int = 0
    text_misses: int = 0
    skipped: SkipCounter = field(default_factory=SkipCounter)
    vae_loaded: bool = False
    encoder_loaded: bool = False


@dataclass
class CacheManifest:
    """The cached training set: one entry per usable image, plus the cached extra prompts."""

    entries: list[dict]
    prompts: dict[str, str]
    settings: dict
    path: Path | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    n_skipped: int = 0

    def bucket_of(self, buckets: Sequence[Bucket]) -> list[int]:
        """Bucket index of every entry (matched by size: entries store ``[height, width]``)."""
        by_size = {(b.height, b.width): b.index for b in buckets}
        try:
            return [by_size[tuple(e["bucket"])] for e in self.entries]
        except KeyError as e:
            raise ValueError(
                f"cached entry of size {e} is in no configured bucket: rebuild the cache"
            ) from None


def latent_key(settings: CacheSettings, bucket: Bucket, image_sha: str) -> str:
    return _digest(
        {
            "kind": "latent",
            "vae": settings.vae_identity,
            "size": [bucket.height, bucket.width],
            "pre": PREPROCESS_VERSION,
            "dtype": settings.latent_dtype,
            "image": image_sha,
        }
    )


def text_key(settings: CacheSettings, token_ids: Sequence[int]) -> str:
    return _digest(
        {
            "kind": "text",
            "encoder": settings.encoder_identity,
            "layers": list(settings.selected_layers),
            "dtype": settings.text_dtype,
            "ids": hashlib.sha256(json.dumps(list(token_ids)).encode()).hexdigest(),
        }
    )


def _dtype(name: str) -> torch.dtype:
    try:
        dt = getattr(torch, name)
    except AttributeError:
        dt = None
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ValueError(f"unknown floating dtype {name!r} (use float32 or bfloat16)")
    return dt


def _items(
    source: MapDataset | TarShardDataset, rank: int, world: int
) -> Iterator[tuple[tuple, str, str, object, int, int]]:
    """``(order, key, caption, image bytes or path, width, height)`` of this rank's part of the data."""
    if isinstance(source, MapDataset):
        for i in range(rank, len(source), world):
            r = source[i]
            yield (i,), r.key, r.caption, r.path, r.width, r.height
    else:
        shard_pos = {s: n for n, s in enumerate(source.shards)}
        for shard in source.shards[rank::world]:
            for s in source.read_shard(shard):
                yield (shard_pos[shard], s.index), s.key, s.caption, s.data, s.width, s.height


def _read_bytes(src: object) -> bytes:
    return src if isinstance(src, bytes) else Path(src).read_bytes()


def build_cache(
    source: MapDataset | TarShardDataset,
    buckets: Sequence[Bucket],
    cache_dir: str | os.PathLike,
    settings: CacheSettings,
    load_vae: Callable[[], torch.nn.Module],
    load_encoder: Callable[[], torch.nn.Module],
    tokenizer,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    extra_prompts: Iterable[str] = (),
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] = lambda: None,
    release: Callable[[torch.nn.Module], None] | None = None,
) -> tuple[CacheManifest, CacheStats]:
    """Cache latents, then caption features, for every image; return the manifest and hit/miss stats.

    Models are loaded through ``load_vae``/``load_encoder`` only if something is missing, and the
    VAE is released before the encoder is loaded. With ``world > 1`` each rank caches its share
    (items ``rank::world``, shards ``rank::world``); ``barrier`` syncs the ranks, after which all of
    them return the same manifest. ``extra_prompts`` (sample prompts) get cached features too.
    """
    cache_dir = Path(cache_dir)
    stats = CacheStats()
    extra_prompts = list(extra_prompts)
    manifest_id = _digest(
        {
            "data": source.fingerprint(),
            "settings": settings.__dict__,
            "buckets": [[b.height, b.width] for b in buckets],
        }
    )
    mdir = cache_dir / "manifests"
    known = load_manifest(mdir / f"{manifest_id}.json")
    if (
        known is not None
        and set(extra_prompts) <= set(known.prompts)
        and manifest_is_complete(cache_dir, known)
    ):
        # Same data files, same settings, every tensor present: nothing to read or hash.
        stats.latent_hits = len(known.entries)
        stats.text_hits = len({e["text"] for e in known.entries} | set(known.prompts.values()))
        stats.skipped.quiet = True
        stats.skipped.merge(known.skipped)  # what caching found broken (logged back then)
        stats.skipped.count = max(stats.skipped.count, known.n_skipped)
        return known, stats
    latents = TensorStore(cache_dir / "latents", tag=f"r{rank}-")
    texts = TensorStore(cache_dir / "text", tag=f"r{rank}-")
    latent_dtype, text_dtype = _dtype(settings.latent_dtype), _dtype(settings.text_dtype)

    # ---- phase 1: latents (the encoder is not loaded) --------------------------------------
    vae = None
    pending: dict[int, list[tuple[str, torch.Tensor]]] = {}

    def encode_pending(bucket_index: int) -> None:
        nonlocal vae
        batch = pending.pop(bucket_index, [])
        if not batch:
            return
        if vae is None:
            vae = load_vae()
            stats.vae_loaded = True
        with torch.inference_mode():
            images = torch.stack([img for _, img in batch]).to(device)
            z = vae.encode(images).float().cpu()
        for (key, _), lat in zip(batch, z, strict=True):
            latents.put(key, {"": lat.to(latent_dtype)})

    entries: list[dict] = []
    for order, key, caption, src, w, h in _items(source, rank, world):
        bucket = assign_bucket(w, h, buckets, settings.policy, key, settings.seed, settings.max_upscale)
        try:
            data = _read_bytes(src)
        except OSError as e:
            stats.skipped.add(key, f"unreadable image: {e}")
            continue
        lkey = latent_key(settings, bucket, hashlib.sha256(data).hexdigest())
        if lkey in latents:
            stats.latent_hits += 1
        else:
            try:
                image = load_for_bucket(data, bucket)
            except UnreadableImage as e:
                stats.skipped.add(key, str(e))
                continue
            stats.latent_misses += 1
            pending.setdefault(bucket.index, []).append((lkey, image))
            if len(pending[bucket.index]) >= batch_size:
                encode_pending(bucket.index)
        entries.append(
            {
                "order": list(order),
                "key": key,
                "caption": caption,
                "latent": lkey,
                "bucket": [bucket.height, bucket.width],
            }
        )
    for b in list(pending):
        encode_pending(b)
    latents.flush()
    if isinstance(source, TarShardDataset):  # skips found while reading the shards
        for key, reason in source.skipped.drain():
            stats.skipped.add(key, reason)
    if vae is not None:
        if release is not None:
            release(vae)
        del vae

    # ---- phase 2: caption features (the VAE is gone) ---------------------------------------
    captions = sorted({e["caption"] for e in entries} | set(extra_prompts))
    tkeys: dict[str, str] = {}
    missing: list[tuple[str, str, int]] = []
    for cap in captions:
        ids, _ = tokenize_prompts([cap], tokenizer)
        k = text_key(settings, ids[0].tolist())
        tkeys[cap] = k
        if k in texts:
            stats.text_hits += 1
        else:
            stats.text_misses += 1
            missing.append((cap, k, ids.shape[1]))
    if missing:
        encoder = load_encoder()
        stats.encoder_loaded = True
        missing.sort(key=lambda m: m[2])  # similar lengths together: less padding
        for start in range(0, len(missing), batch_size):
            chunk = missing[start : start + batch_size]
            ids, mask = tokenize_prompts([c for c, _, _ in chunk], tokenizer)
            with torch.inference_mode():
                feats = encoder(ids.to(device), mask.to(device))
            feats, fmask = split_features(feats, mask)
            for row, (_, k, _) in enumerate(chunk):
                n = int(fmask[row].sum())
                texts.put(k, {str(layer): f[row, :n].to(text_dtype) for layer, f in enumerate(feats)})
        if release is not None:
            release(encoder)
        del encoder
    texts.flush()
    for e in entries:
        e["text"] = tkeys[e["caption"]]

    # ---- manifest: merge the ranks' parts in data order ------------------------------------
    mdir.mkdir(parents=True, exist_ok=True)
    part = {
        "entries": entries,
        "prompts": {p: tkeys[p] for p in extra_prompts},
        "skipped": stats.skipped.examples,
        "n_skipped": stats.skipped.count,
    }
    _write_json(mdir / f"{manifest_id}.part{rank}of{world}.json", part)
    barrier()
    merged: list[dict] = []
    prompts: dict[str, str] = {}
    skipped: list[tuple[str, str]] = []
    n_skipped = 0
    for r in range(world):
        p = json.loads((mdir / f"{manifest_id}.part{r}of{world}.json").read_text())
        merged.extend(p["entries"])
        prompts.update(p["prompts"])
        skipped.extend(tuple(x) for x in p["skipped"])
        n_skipped += p["n_skipped"]
    merged.sort(key=lambda e: e["order"])
    manifest = CacheManifest(
        merged, prompts, dict(settings.__dict__), mdir / f"{manifest_id}.json", skipped, n_skipped
    )
    if rank == 0:
        _write_json(
            manifest.path,
            {
                "entries": merged,
                "prompts": prompts,
                "settings": manifest.settings,
                "skipped": skipped,
                "n_skipped": n_skipped,
            },
        )
    if world > 1:  # report the skips of all ranks, not just this one's
        total = SkipCounter(quiet=True)
        total.merge(skipped)
        total.count = n_skipped
        stats.skipped = total
    barrier()
    if rank == 0:
        for r in range(world):
            (mdir / f"{manifest_id}.part{r}of{world}.json").unlink(missing_ok=True)
    if not merged:
        raise ValueError(f"no usable images to cache ({stats.skipped.summary()})")
    return manifest, stats


def load_manifest(path: str | os.PathLike) -> CacheManifest | None:
    """A manifest written by :func:`build_cache`, or None if absent or unreadable."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return CacheManifest(
        data["entries"],
        data["prompts"],
        data["settings"],
        path,
        [tuple(x) for x in data.get("skipped", [])],
        int(data.get("n_skipped", 0)),
    )


def manifest_is_complete(cache_dir: str | os.PathLike, manifest: CacheManifest) -> bool:
    """Whether every latent and feature the manifest names is in the cache."""
    latents = TensorStore(Path(cache_dir) / "latents")
    texts = TensorStore(Path(cache_dir) / "text")
    return all(e["latent"] in latents and e["text"] in texts for e in manifest.entries) and all(
        k in texts for k in manifest.prompts.values()
    )


def _write_json(path: Path, data: object) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Reading cached batches
# ---------------------------------------------------------------------------------------------


@dataclass
class CachedBatch:
    """What the MMDiT needs for one batch, read from the cache."""

    latents: torch.Tensor  # [B, N, 128] tokens
    feats: list[torch.Tensor]  # num_text_layers x [B, S, D], zero-padded
    mask: torch.Tensor  # [B, S] bool
    grid_hw: tuple[int, int]
    bucket: int
    position: int
    captions: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)


def pad_features(rows: Sequence[Sequence[torch.Tensor]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-caption ``[S_i, D]`` layer tensors -> zero-padded ``[B, S_max, D]`` per layer and the mask."""
    length = max(r[0].shape[0] for r in rows)
    n_layers = len(rows[0])
    feats = [
        torch.stack([F.pad(r[layer], (0, 0, 0, length - r[layer].shape[0])) for r in rows])
        for layer in range(n_layers)
    ]
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, r in enumerate(rows):
        mask[i, : r[0].shape[0]] = True
    return feats, mask


class CachedDataset(torch.utils.data.Dataset):
    """Map-style view of a :class:`CacheManifest`; ``dataset[BucketBatch]`` gives a :class:`CachedBatch`."""

    def __init__(
        self, cache_dir: str | os.PathLike, manifest: CacheManifest, buckets: Sequence[Bucket]
    ) -> None:
        cache_dir = Path(cache_dir)
        self.manifest = manifest
        self.buckets = {b.index: b for b in buckets}
        self.latents = TensorStore(cache_dir / "latents")
        self.texts = TensorStore(cache_dir / "text")
        missing = [
            e["key"]
            for e in manifest.entries
            if e["latent"] not in self.latents or e["text"] not in self.texts
        ]
        if missing:
            raise ValueError(
                f"{len(missing)} cache entries are missing (e.g. {missing[:3]}): rebuild the cache"
            )

    def __len__(self) -> int:
        return len(self.manifest.entries)

    def text_features(self, key: str) -> list[torch.Tensor]:
        parts = self.texts.get(key)
        return [parts[str(i)] for i in range(len(parts))]

    def __getitem__(self, batch: BucketBatch) -> CachedBatch:
        bucket = self.buckets[batch.bucket]
        entries = [self.manifest.entries[i] for i in batch.indices]
        lat = torch.stack([self.latents.get(e["latent"])[""] for e in entries]).float()
        feats, mask = pad_features([self.text_features(e["text"]) for e in entries])
        return CachedBatch(
            pack_latents(lat),
            feats,
            mask,
            bucket.grid_hw,
            batch.bucket,
            batch.position,
            [e["caption"] for e in entries],
        )
