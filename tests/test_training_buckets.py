"""Aspect-ratio bucketing and the one-bucket batch sampler (training/buckets.py)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from PIL import Image

from lens_core.resolution import ASPECT_RATIOS, BUCKETS
from training.buckets import (
    BucketBatchSampler,
    area_class,
    assign_bucket,
    make_buckets,
    resize_and_crop,
    stage_buckets,
)
from training.data import RawSample, stream_bucket_batches


def test_paper_buckets_27_multiples_of_16_official_table():
    buckets = stage_buckets("mixed")
    assert len(buckets) == 27
    assert all(b.height % 16 == 0 and b.width % 16 == 0 for b in buckets)
    assert [b.batch_size for b in buckets] == [24] * 9 + [10] * 9 + [6] * 9
    large = {b.aspect: (b.height, b.width) for b in buckets if b.base == 1024}
    assert large == BUCKETS[1024]  # the released inference buckets
    for base in (256, 512):  # computed areas stay within ~6% of base^2 and keep the aspect ordering
        sizes = [b for b in buckets if b.base == base]
        assert [b.aspect for b in sizes] == list(ASPECT_RATIOS)
        assert all(abs(b.height * b.width / base**2 - 1) < 0.07 for b in sizes)
        assert [b.width / b.height for b in sizes] == sorted(b.width / b.height for b in sizes)
    low = stage_buckets("low_res")
    assert [(b.height, b.width, b.batch_size) for b in low] == [(512, 512, 24)]
    assert {b.tokens for b in low} == {1024}


def test_tiny_areas_merge_duplicate_sizes():
    buckets = make_buckets([64], ASPECT_RATIOS, [3])
    sizes = [(b.height, b.width) for b in buckets]
    assert len(sizes) == len(set(sizes)) < 9
    assert [b.index for b in buckets] == list(range(len(buckets)))


def test_every_image_lands_in_nearest_bucket_of_its_area_class():
    buckets = stage_buckets("mixed")
    rng = np.random.default_rng(0)
    for _ in range(500):
        w, h = (int(v) for v in rng.integers(100, 3000, 2))
        for policy in ("fit", "random"):
            b = assign_bucket(w, h, buckets, policy, key=f"{w}x{h}")
            # area class: never above the image area (unless it is below the smallest area)
            if w * h >= 256**2:
                assert b.base**2 <= w * h
            if policy == "fit":
                assert b.base == max([a for a in (256, 512, 1024) if a * a <= w * h] or [256])
            same_area = [c for c in buckets if c.base == b.base]
            best = min(abs(math.log(c.width / c.height) - math.log(w / h)) for c in same_area)
            assert abs(math.log(b.width / b.height) - math.log(w / h)) == pytest.approx(best)


def test_random_area_policy_is_stable_per_key_and_spread():
    areas = [256, 512, 1024]
    picks = [area_class(2048, 2048, areas, "random", key=f"img{i}", seed=3) for i in range(600)]
    assert picks == [area_class(2048, 2048, areas, "random", key=f"img{i}", seed=3) for i in range(600)]
    counts = np.bincount(picks, minlength=3)
    assert all(150 < c < 250 for c in counts)  # uniform over the three eligible areas
    assert area_class(300, 300, areas, "random", key="x") == 0  # only the small area fits
    assert area_class(100, 100, areas, "fit") == 0  # below every area: the smallest


def test_resize_and_crop_covers_and_centres():
    a = np.zeros((100, 300, 3), dtype=np.uint8)
    a[:, 140:160] = 255  # a white stripe in the centre
    out = resize_and_crop(Image.fromarray(a), 64, 64)
    assert out.size == (64, 64)
    arr = np.asarray(out)
    assert arr[:, 28:36].mean() > 200 and arr[:, :10].mean() < 5  # stripe stays centred
    assert resize_and_crop(Image.new("RGB", (17, 9)), 48, 16).size == (16, 48)  # upscales when needed


def _sampler(seed=0, n=40, drop_last=True):
    buckets = make_buckets([32, 48], ["1:2", "1:1", "2:1"], [3, 2])
    rng = np.random.default_rng(1)
    bucket_of = [int(b) for b in rng.integers(0, len(buckets), n)]
    return BucketBatchSampler(bucket_of, buckets, seed=seed, drop_last=drop_last), bucket_of, buckets


def test_sampler_one_bucket_per_batch_and_batch_sizes():
    sampler, bucket_of, buckets = _sampler()
    for batch in itertools.islice(iter(sampler), 3 * sampler.batches_per_epoch):
        assert {bucket_of[i] for i in batch.indices} == {batch.bucket}
        assert len(batch.indices) == buckets[batch.bucket].batch_size
    # one epoch uses every item at most once; with drop_last=False exactly once
    full, *_ = _sampler(drop_last=False)
    epoch = [i for k in range(full.batches_per_epoch) for i in full.batch(k).indices]
    assert sorted(epoch) == list(range(40))


def test_sampler_deterministic_and_resumable():
    a, *_ = _sampler(seed=5)
    b, *_ = _sampler(seed=5)
    c, *_ = _sampler(seed=6)
    seq_a = [x.indices for x in itertools.islice(iter(a), 30)]
    assert seq_a == [x.indices for x in itertools.islice(iter(b), 30)]
    assert seq_a != [x.indices for x in itertools.islice(iter(c), 30)]
    # resume: a fresh sampler loaded with the state continues the same sequence
    cont = [x.indices for x in itertools.islice(iter(a), 10)]
    fresh, *_ = _sampler(seed=5)
    fresh.load_state_dict(a.state_dict() | {"position": 30})
    assert [x.indices for x in itertools.islice(iter(fresh), 10)] == cont
    other, *_ = _sampler(seed=5, n=41)
    with pytest.raises(ValueError, match="changed"):
        other.load_state_dict(a.state_dict())


def test_rank_batches_partition_matches_accumulation():
    sampler, *_ = _sampler()
    two_ranks = [list(itertools.islice(sampler.rank_batches(7, r, world=2, accum=1), 5)) for r in (0, 1)]
    one_rank = list(itertools.islice(sampler.rank_batches(7, 0, world=1, accum=2), 10))
    for step in range(5):  # the same global batches per optimizer step
        both = {two_ranks[0][step].position, two_ranks[1][step].position}
        assert both == {one_rank[2 * step].position, one_rank[2 * step + 1].position}


def test_sampler_refuses_when_no_bucket_fills():
    buckets = make_buckets([32], ["1:1"], [8])
    with pytest.raises(ValueError, match="no bucket has a full batch"):
        BucketBatchSampler([0, 0, 0], buckets)


def test_streaming_batches_group_by_bucket():
    buckets = make_buckets([32, 48], ["1:2", "1:1", "2:1"], [2, 2])
    sizes = [(32, 32), (48, 24), (32, 32), (24, 48), (48, 24), (24, 48)]
    samples = [RawSample(f"k{i}", "c", b"", "s", i, w, h) for i, (w, h) in enumerate(sizes)]
    out = list(stream_bucket_batches(samples, buckets))
    assert [(b.aspect, [s.key for s in ss]) for b, ss in out] == [
        ("1:1", ["k0", "k2"]),
        ("2:1", ["k1", "k4"]),
        ("1:2", ["k3", "k5"]),
    ]
