"""Resolution buckets (W:H names, width-first API), size validation and UI labels."""

from __future__ import annotations

import warnings

import pytest

from lens_core.errors import ResolutionError
from lens_core.resolution import (
    ASPECT_RATIOS,
    BUCKETS,
    LensResolutionWarning,
    aspect_label,
    resolve_bucket,
    scaled_bucket,
    snap_to_multiple,
    validate_size,
)


def test_bucket_tables_match_the_reference() -> None:
    assert ASPECT_RATIOS == ("1:2", "9:16", "2:3", "3:4", "1:1", "4:3", "3:2", "16:9", "2:1")
    assert set(BUCKETS) == {1024, 1440}
    portrait = {  # (height, width) of the portrait half, from REFERENCE.md
        1024: [(1472, 736), (1376, 768), (1248, 832), (1152, 864), (1024, 1024)],
        1440: [(2080, 1040), (1936, 1088), (1760, 1168), (1616, 1216), (1440, 1440)],
    }
    for base, sizes in portrait.items():
        assert tuple(BUCKETS[base]) == ASPECT_RATIOS
        assert [BUCKETS[base][name] for name in ASPECT_RATIOS[:5]] == sizes
        # The landscape half transposes the portrait half: 4:3 is 3:4 turned on its side.
        assert [BUCKETS[base][name][::-1] for name in ASPECT_RATIOS[4:]] == sizes[::-1]


@pytest.mark.parametrize("base", [1024, 1440])
@pytest.mark.parametrize("name", ASPECT_RATIOS)
def test_every_bucket_is_valid_and_named_width_to_height(base: int, name: str) -> None:
    width, height = resolve_bucket(base, name)
    assert (height, width) == BUCKETS[base][name]
    assert width % 16 == 0 and height % 16 == 0
    w, h = (int(x) for x in name.split(":"))
    assert abs(width / height - w / h) < 0.03  # the name is W:H
    assert abs(width * height / base**2 - 1) < 0.06  # about base^2 pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # official buckets never warn
        validate_size(width, height)


def test_orientation() -> None:
    assert resolve_bucket(1024, "16:9") == (1376, 768)  # landscape: wider than tall
    assert resolve_bucket(1024, "9:16") == (768, 1376)
    assert resolve_bucket(1440, "2:1") == (2080, 1040)
    assert resolve_bucket(1024, "1:1") == (1024, 1024)
    assert resolve_bucket(1024, aspect_label("16:9")) == (1376, 768)


def test_unknown_bucket_lists_the_choices() -> None:
    with pytest.raises(ResolutionError, match=r"'5:4'.*1:2, 9:16, 2:3, 3:4, 1:1, 4:3, 3:2, 16:9, 2:1"):
        resolve_bucket(1024, "5:4")
    with pytest.raises(ResolutionError, match="1024, 1440"):
        resolve_bucket(512, "1:1")


@pytest.mark.parametrize(
    ("width", "height"), [(1000, 1024), (1024, 0), (-16, 1024), (1024.0, 1024), ("1024", 1024), (True, 16)]
)
def test_invalid_sizes(width: object, height: object) -> None:
    with pytest.raises(ResolutionError, match="multiple of 16"):
        validate_size(width, height)  # type: ignore[arg-type]


def test_nearest_size_is_suggested() -> None:
    with pytest.raises(ResolutionError, match="nearest valid: 1008"):
        validate_size(1000, 1024)


@pytest.mark.parametrize(("width", "height"), [(2048, 1008), (512, 1040), (1600, 1600), (2080, 1056)])
def test_untrained_sizes_warn(width: int, height: int) -> None:
    with pytest.warns(LensResolutionWarning):
        validate_size(width, height)


def test_trained_range_does_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for width, height in [(512, 512), (1024, 512), (512, 1024), (1440, 1440), (1280, 720), (16, 16)]:
            validate_size(width, height)


def test_snap_to_multiple() -> None:
    assert [snap_to_multiple(v) for v in (0, 1, 8, 23, 24, 1000, 1017, 1920.4)] == [
        16,
        16,
        16,
        16,
        32,
        1008,
        1024,
        1920,
    ]
    assert snap_to_multiple(100, 64) == 128


def test_aspect_labels() -> None:
    assert aspect_label("16:9") == "16:9 (landscape)"
    assert aspect_label("9:16") == "9:16 (portrait)"
    assert aspect_label("1:1") == "1:1 (square)"
    assert [aspect_label(n).split(" ")[1] for n in ASPECT_RATIOS] == ["(portrait)"] * 4 + ["(square)"] + [
        "(landscape)"
    ] * 4
    for bad in ("wide", "16x9", "0:1"):
        with pytest.raises(ResolutionError):
            aspect_label(bad)


def test_scaled_bucket_keeps_official_buckets_and_scales_the_shape() -> None:
    for base in BUCKETS:
        for name in ASPECT_RATIOS:
            assert scaled_bucket(base, name) == resolve_bucket(base, name)
    assert scaled_bucket(128, "1:1") == (128, 128)
    assert scaled_bucket(128, "16:9") == (176, 96)  # 1376x768 / 8, snapped to 16
    assert scaled_bucket(128, "9:16 (portrait)") == (96, 176)
    with pytest.raises(ResolutionError, match="at least 16"):
        scaled_bucket(8, "1:1")
