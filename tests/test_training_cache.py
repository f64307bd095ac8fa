"""Latent / text-feature cache: keys, hits and misses, trimmed features (training/cache.py)."""

from __future__ import annotations

import torch

from lens_core.loading import load_text_encoder, load_vae
from lens_core.prompt import TEXT_OFFSET, split_features, tokenize_prompts
from lens_core.tokenizer import load_tokenizer
from training.buckets import BucketBatch, assign_bucket, make_buckets
from training.cache import CachedDataset, CacheSettings, FileHasher, build_cache
from training.data import FolderDataset, TarShardDataset, load_for_bucket
from training.testing import TINY_BUCKETS, write_broken_images, write_tar_shards, write_tiny_folder

BUCKETS = make_buckets(**{k: TINY_BUCKETS[k] for k in ("areas", "aspect_ratios", "batch_sizes")})
LAYERS = (0, 1, 2, 3)



class Loaders:
    """Counts how often the frozen models are loaded (a hit must not load them at all)."""

    def __init__(self, root):
        self.root, self.vae, self.encoder = root, 0, 0

    def load_vae(self):
        self.vae += 1
        return load_vae(self.root)

    def load_encoder(self):
        self.encoder += 1
        return load_text_encoder(self.root, LAYERS)


def _settings(root, cache, **kw):
    hasher = FileHasher(cache / "file_hashes.json")
    return CacheSettings(
        vae_identity=hasher.identity(root, "vae"),
        encoder_identity=hasher.identity(root, "text_encoder"),
        selected_layers=LAYERS,
        text_dtype="float32",
        **kw,
    )


def test_cache_hit_miss_and_contents(tmp_path, tiny_pipeline):
    data, cache = tmp_path / "data", tmp_path / "cache"
    write_tiny_folder(data, n=6)
    write_broken_images(data)
    tok = load_tokenizer(None)
    loads = Loaders(tiny_pipeline)
    ds = FolderDataset(data)
    settings = _settings(tiny_pipeline, cache)
    prompts = ["a preview prompt"]

    manifest, stats = build_cache(
        ds,
        BUCKETS,
        cache,
        settings,
        loads.load_vae,
        loads.load_encoder,
        tok,
        batch_size=4,
        extra_prompts=prompts,
    )
    captions = {r.caption for r in ds if not r.key.startswith("broken")}
    assert (stats.latent_hits, stats.latent_misses) == (0, 6)
    assert (stats.text_hits, stats.text_misses) == (0, len(captions) + 1)
    assert stats.skipped.count == 1 and "corrupt image" in stats.skipped.examples[0][1]  # the truncated JPEG
    assert (loads.vae, loads.encoder) == (1, 1)
    assert len(manifest.entries) == 6 and set(manifest.prompts) == set(prompts)
    assert not list(cache.rglob("*.tmp"))

    # stored features are the encoder's, after the 97-token prefix, padding trimmed, 4 layers
    cached = CachedDataset(cache, manifest, BUCKETS)
    entry = manifest.entries[2]
    encoder = load_text_encoder(tiny_pipeline, LAYERS)
    ids, mask = tokenize_prompts([entry["caption"], "a much longer caption " * 8], tok)
    with torch.no_grad():
        feats, fmask = split_features(encoder(ids, mask), mask)
    n = int(mask[0].sum()) - TEXT_OFFSET
    stored = cached.text_features(entry["text"])
    assert len(stored) == 4 and all(t.shape == (n, 32) for t in stored)
    for s, f in zip(stored, feats, strict=True):
        torch.testing.assert_close(s, f[0, :n], rtol=1e-5, atol=1e-5)
    # stored latents are the VAE's of the resized, centre-cropped image
    rec = next(r for r in ds if r.key == entry["key"])
    bucket = assign_bucket(rec.width, rec.height, BUCKETS, key=rec.key)
    with torch.no_grad():
        z = load_vae(tiny_pipeline).encode(load_for_bucket(rec.path, bucket)[None])
    torch.testing.assert_close(cached.latents.get(entry["latent"])[""], z[0], rtol=1e-5, atol=1e-5)
    batch = cached[BucketBatch(bucket.index, (2,), 0)]
    assert batch.latents.shape == (1, bucket.tokens, 128) and batch.mask.shape == (1, n)

    # second run: everything hits, neither model is loaded
    def rebuild(settings):
        return build_cache(
            FolderDataset(data), BUCKETS, cache, settings, loads.load_vae, loads.load_encoder, tok, extra_prompts=prompts
        )[1]

    again = rebuild(settings)
    assert (again.latent_misses, again.text_misses) == (0, 0) and (loads.vae, loads.encoder) == (1, 1)
    assert again.skipped.count == 1  # still reported from the manifest

    # one caption edited: one text miss, all latents hit, the VAE stays unloaded
    (data / "img003.txt").write_text("an edited caption")
    edited = rebuild(settings)
    assert (edited.latent_hits, edited.latent_misses, edited.text_misses) == (6, 0, 1)
    assert (loads.vae, loads.encoder) == (1, 2)

    # another VAE (different file content) or another latent dtype: every latent misses
    other_vae = _settings(tiny_pipeline, cache, latent_dtype="bfloat16")
    redone = rebuild(other_vae)
    assert (redone.latent_misses, redone.text_misses) == (6, 0) and loads.vae == 2


def test_cache_from_tar_shards(tmp_path, tiny_pipeline):
    write_tiny_folder(tmp_path / "imgs", n=6)
    write_broken_images(tmp_path / "imgs")
    shards = write_tar_shards(tmp_path / "imgs", tmp_path / "shards", per_shard=3)
    loads = Loaders(tiny_pipeline)
    cache = tmp_path / "cache"
    manifest, stats = build_cache(
        TarShardDataset(shards),
        BUCKETS,
        cache,
        _settings(tiny_pipeline, cache),
        loads.load_vae,
        loads.load_encoder,
        load_tokenizer(None),
    )
    assert len(manifest.entries) == 6 and stats.latent_misses == 6
    assert stats.skipped.count == 2  # the text file named .png and the truncated JPEG
    assert [e["key"] for e in manifest.entries] == sorted(e["key"] for e in manifest.entries)
