"""Image sizes Lens generates well: the inference buckets and checks on free-form sizes.

Lens was trained on buckets of three areas and nine aspect ratios, and generalises to aspect
ratios 1:2..2:1 up to about 1440x1440. Sizes must be multiples of 16 (VAE /8, then 2x2 patches).
Aspect ratios are named W:H, so "16:9" is landscape (wider than tall).
"""

from __future__ import annotations

import warnings
from numbers import Integral, Real

from .errors import ResolutionError

MULTIPLE = 16

ASPECT_RATIOS: tuple[str, ...] = ("1:2", "9:16", "2:3", "3:4", "1:1", "4:3", "3:2", "16:9", "2:1")

# base resolution -> aspect name (W:H) -> (height, width), as the reference lists them.
BUCKETS: dict[int, dict[str, tuple[int, int]]] = {
    1024: {
        "1:2": (1472, 736),
        "9:16": (1376, 768),
        "2:3": (1248, 832),
        "3:4": (1152, 864),
        "1:1": (1024, 1024),
        "4:3": (864, 1152),
        "3:2": (832, 1248),
        "16:9": (768, 1376),
        "2:1": (736, 1472),
    },
    1440: {
        "1:2": (2080, 1040),
        "9:16": (1936, 1088),
        "2:3": (1760, 1168),
        "3:4": (1616, 1216),
        "1:1": (1440, 1440),
        "4:3": (1216, 1616),
        "3:2": (1168, 1760),
        "16:9": (1088, 1936),
        "2:1": (1040, 2080),
    },
}
BASE_RESOLUTIONS: tuple[int, ...] = tuple(BUCKETS)

# Largest trained area: the 1440 family's 1:2 bucket (2080x1040), slightly above 1440^2, so that
# no official bucket triggers the warning.
MAX_TRAINED_AREA = max(h * w for table in BUCKETS.values() for h, w in table.values())
MIN_ASPECT, MAX_ASPECT = 0.5, 2.0  # width / height


class LensResolutionWarning(UserWarning):
    """A size Lens can generate but was not trained for; expect weaker images."""


def resolve_bucket(base: int, aspect_ratio: str) -> tuple[int, int]:
    """Return ``(width, height)`` of the bucket -- width first, as the CLI and nodes use it.

    (``BUCKETS`` itself stores ``(height, width)`` like the reference.) ``aspect_ratio`` is a W:H
    name from ASPECT_RATIOS, or its ``aspect_label`` form such as "16:9 (landscape)".
    """
    if base not in BUCKETS:
        raise ResolutionError(
            f"unknown base resolution {base!r}; choose one of {', '.join(map(str, BASE_RESOLUTIONS))}"
        )
    name = aspect_ratio.strip().split(" ", 1)[0]
    if name not in BUCKETS[base]:
        raise ResolutionError(
            f"unknown aspect ratio {aspect_ratio!r}; choose one of {', '.join(ASPECT_RATIOS)} (W:H)"
        )
    height, width = BUCKETS[base][name]
    return width, height


def scaled_bucket(base: int, aspect_ratio: str) -> tuple[int, int]:
    """``(width, height)`` of the 1024 bucket of ``aspect_ratio`` scaled to ``base`` and snapped to
    multiples of 16: the official bucket for an official base, otherwise the same shape at the base
    a smaller model was trained at (Lens-Toy: 128 -> 128x128, 16:9 -> 176x96)."""
    if base in BUCKETS:
        return resolve_bucket(base, aspect_ratio)
    if base < MULTIPLE:
        raise ResolutionError(f"base resolution must be at least {MULTIPLE}, got {base}")
    width, height = resolve_bucket(1024, aspect_ratio)
    return tuple(max(MULTIPLE, round(side * base / 1024 / MULTIPLE) * MULTIPLE) for side in (width, height))


def validate_size(width: int, height: int) -> None:
    """Raise ResolutionError unless both sides are positive multiples of 16.

    Warns (LensResolutionWarning) for sizes outside what Lens was trained on: aspect ratio beyond
    1:2..2:1, or more pixels than the largest 1440-base bucket.
    """
    for side, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, Integral) or value <= 0 or value % MULTIPLE:
            hint = f" (nearest valid: {snap_to_multiple(value)})" if isinstance(value, Real) else ""
            raise ResolutionError(f"{side} must be a positive multiple of {MULTIPLE}, got {value!r}{hint}")
    aspect = width / height
    if not MIN_ASPECT <= aspect <= MAX_ASPECT:
        warnings.warn(
            f"{width}x{height} has aspect ratio {aspect:.2f} (W/H), outside the trained 1:2..2:1; "
            "expect distorted or repeated content",
            LensResolutionWarning,
            stacklevel=2,
        )
    if width * height > MAX_TRAINED_AREA:
        warnings.warn(
            f"{width}x{height} is larger than the largest trained size (about 1440x1440); "
            "expect repeated content and high memory use",
            LensResolutionWarning,
            stacklevel=2,
        )


def snap_to_multiple(value: float, multiple: int = MULTIPLE) -> int:
    """Nearest multiple of ``multiple`` to ``value`` (halves round up), never below ``multiple``."""
    return max(multiple, int((value + multiple / 2) // multiple) * multiple)


def aspect_label(name: str) -> str:
    """UI label of a W:H aspect name, e.g. "16:9 (landscape)", "9:16 (portrait)", "1:1 (square)"."""
    try:
        w, h = (int(part) for part in name.split(":"))
    except ValueError:
        raise ResolutionError(f"aspect ratio {name!r} is not of the form W:H") from None
    if w <= 0 or h <= 0:
        raise ResolutionError(f"aspect ratio {name!r} must have positive sides")
    shape = "landscape" if w > h else "portrait" if w < h else "square"
    return f"{name} ({shape})"
