"""Datasets: folder, manifest, WebDataset tar shards, and broken-image handling (training/data.py)."""

from __future__ import annotations

import io
import tarfile

import pytest
import torch
from PIL import Image

from training.buckets import BucketBatch, BucketBatchSampler, make_buckets
from training.data import (
    BucketBatchLoader,
    FolderDataset,
    ManifestDataset,
    TarBucketStream,
    TarShardDataset,
    decode_image,
    expand_shards,
    probe_image,
)
from training.testing import (
    TINY_BUCKETS,
    write_broken_images,
    write_manifest,
    write_tar_shards,
    write_tiny_folder,
)

BUCKETS = make_buckets(**{k: TINY_BUCKETS[k] for k in ("areas", "aspect_ratios", "batch_sizes")})


def test_folder_dataset_pairs_and_skips_broken(tmp_path):
    write_tiny_folder(tmp_path, n=6)
    broken_jpeg, fake_png = write_broken_images(tmp_path)
    (tmp_path / "nocaption.png").write_bytes((tmp_path / "img000.png").read_bytes())
    ds = FolderDataset(tmp_path)
    keys = [r.key for r in ds]
    # the text file named .png fails at the header; the truncated JPEG only when decoded
    assert "broken_text.png" not in keys and "broken_truncated.jpg" in keys and "nocaption.png" not in keys
    assert ds.skipped.count == 2 and ds.skipped.by_reason == {"unreadable image": 1, "missing caption": 1}
    second = ds[keys.index("img001.png")]
    assert second.caption.endswith("background") and (second.width, second.height) == (48, 24)
    # decoding the truncated JPEG is a counted skip, never an exception out of the loader
    idx = keys.index("broken_truncated.jpg")
    good = keys.index("img004.png")  # same bucket class (64x64 image)
    bucket = next(b for b in BUCKETS if (b.height, b.width) == (48, 48))
    sampler = BucketBatchSampler([bucket.index] * len(ds), BUCKETS, drop_last=False)
    batch = BucketBatchLoader(ds, BUCKETS, sampler)[BucketBatch(bucket.index, (idx, good), 0)]
    assert batch.images.shape == (1, 3, 48, 48) and len(batch.skipped) == 1
    assert "corrupt image" in batch.skipped[0][1]
    only_bad = BucketBatchLoader(ds, BUCKETS, sampler)[BucketBatch(bucket.index, (idx,), 0)]
    assert only_bad.images.shape[0] == 1 and only_bad.bucket == bucket.index  # replaced from the same bucket
    # a bucket holding only broken images borrows from another bucket, so the batch is never empty
    other = next(b for b in BUCKETS if b.index != bucket.index)
    lonely = BucketBatchSampler(
        [bucket.index if i == idx else other.index for i in range(len(ds))], BUCKETS, drop_last=False
    )
    moved = BucketBatchLoader(ds, BUCKETS, lonely)[BucketBatch(bucket.index, (idx,), 3)]
    assert moved.bucket == other.index and moved.images.shape == (1, 3, other.height, other.width)


def test_decode_exif_rotation_and_alpha(tmp_path):
    im = Image.new("RGBA", (40, 20), (255, 0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    im.save(tmp_path / "a.png", exif=exif)
    assert probe_image(tmp_path / "a.png") == (20, 40)
    out = decode_image((tmp_path / "a.png").read_bytes())
    assert out.size == (20, 40) and out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_manifest_dataset(tmp_path, fmt):
    write_tiny_folder(tmp_path / "imgs", n=5)
    manifest = write_manifest(tmp_path / "imgs", tmp_path / f"list.{fmt}", fmt)
    with manifest.open("a") as f:  # a row whose image does not exist
        f.write('{"image": "gone.png", "caption": "x"}\n' if fmt == "jsonl" else "gone.png,x\n")
    ds = ManifestDataset(manifest)
    assert len(ds) == 5 and ds.skipped.count == 1
    assert ds[0].caption == (tmp_path / "imgs" / "img000.txt").read_text()


def _tar_with_problems(path):
    """A shard with a good sample, a corrupt image, a sample without caption, then a good one."""
    good = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(good, "PNG")
    members = [
        ("a.png", good.getvalue()),
        ("a.txt", b"good one"),
        ("b.jpg", b"\xff\xd8\xff\xe0 not really a jpeg"),
        ("b.txt", b"bad image"),
        ("c.png", good.getvalue()),
        ("sub/d.png", good.getvalue()),
        ("sub/d.json", b'{"caption": "from json"}'),
    ]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_tar_shards_stream_split_and_skip(tmp_path):
    write_tiny_folder(tmp_path / "imgs", n=10)
    shards = write_tar_shards(tmp_path / "imgs", tmp_path / "shards", per_shard=3)
    assert expand_shards(str(tmp_path / "shards" / "shard-{000..003}.tar")) == [str(s) for s in shards]
    assert expand_shards(str(tmp_path / "shards" / "*.tar")) == [str(s) for s in shards]
    one = list(TarShardDataset(str(tmp_path / "shards" / "*.tar"), shuffle_shards=False))
    assert [s.key for s in one] == [f"shard-{i // 3:03d}.tar/img{i:03d}" for i in range(10)]
    assert one[1].caption == (tmp_path / "imgs" / "img001.txt").read_text() and (
        one[1].width,
        one[1].height,
    ) == (48, 24)
    ranks = [{s.key for s in TarShardDataset(shards, rank=r, world=2, seed=1)} for r in (0, 1)]
    assert not ranks[0] & ranks[1] and len(ranks[0] | ranks[1]) == 10  # disjoint, complete

    bad = tmp_path / "bad.tar"
    _tar_with_problems(bad)
    cut_header = tmp_path / "cut_header.tar"  # ends inside the second member's header
    cut_header.write_bytes(shards[0].read_bytes()[:1500])
    cut_data = tmp_path / "cut_data.tar"  # ends inside the first image's data
    cut_data.write_bytes(shards[0].read_bytes()[:600])
    ds = TarShardDataset([str(bad), str(cut_header), str(cut_data)], shuffle_shards=False)
    got = list(ds)
    assert [s.caption for s in got] == ["good one", "from json"]
    assert ds.skipped.by_reason == {"unreadable image": 1, "missing caption": 2, "unreadable shard": 1}


def test_tar_bucket_stream_resume(tmp_path):
    write_tiny_folder(tmp_path / "imgs", n=12)
    shards = write_tar_shards(tmp_path / "imgs", tmp_path / "shards", per_shard=4)
    buckets = make_buckets([32, 48], ["1:2", "1:1", "2:1"], [2, 2])

    def stream(resume=None):
        src = TarShardDataset(shards, seed=0, epochs=None)
        return iter(TarBucketStream(src, buckets, resume=resume))

    full = [next(s) for s in [stream()] for _ in range(8)]
    assert all(b.images.shape[0] == 2 for b in full)
    restarted = stream(resume={0: full[4].stream[1] + 1})
    for expected in full[5:]:
        got = next(restarted)
        assert got.keys == expected.keys and torch.equal(got.images, expected.images)
