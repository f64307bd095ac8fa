"""ToyEval: a deterministic GenEval-style scorer for Lens-Toy images.

GenEval scores text-to-image models with an object detector; Lens-Toy draws flat shapes on flat
backgrounds, so an exact classical pipeline replaces the learned detector and makes the metric
reproducible bit for bit, with no weights to download:

1. estimate the background as the most common colour on the image border;
2. mark pixels whose CIELAB distance to it exceeds ``FOREGROUND_DELTA_E`` (after a 3x3 box blur,
   so pixel noise from the generator does not fragment shapes);
3. label 8-connected components with a vectorised union-find and drop specks;
4. per component: colour = nearest named colour (in Lab) to the median of its most saturated
   quarter of pixels, which blur and noise leave intact; outline redrawn half-way between
   background and object colour; shape = nearest prototype in (bounding-box fill ratio,
   half-mass asymmetry, aspect) space; size class from the box side; position from the box
   centre, as GenEval uses box centres.

The rules of :func:`score_image` follow GenEval's per category. Prompts from
``training.toy_scenes.short_prompt`` always name colours; "colors", "color_binding" and
"counting" ("two blue squares" means two *blue* squares) score them, while "single", "two" and
"position" score shapes only, as GenEval does, so those categories measure presence and layout
rather than colour a second time.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from training.toy_scenes import (
    KINDS,
    OBJECT_COLORS,
    RELATION_THRESHOLD,
    SIZES,
    ToyScene,
    linear_to_lab,
    relation_axes,
    scene_from_dict,
    srgb_to_lab,
    srgb_to_linear,
)

# Objects are at least toy_scenes.MIN_BACKGROUND_DELTA_E (40) from the background; splitting at
# about half of that puts the mask edge at the middle of a blurred edge.
FOREGROUND_DELTA_E = 18.0
# Components smaller than this fraction of min(W, H)**2 are noise: the smallest real object
# (a small triangle) covers about 0.0098.
MIN_AREA_FRACTION = 0.002
# Shape prototypes in (fill ratio of the bounding box, asymmetry) space. Asymmetry is how far the
# half-box mass split is from 50/50 along the more lopsided axis: an axis-aligned triangle puts a
# quarter of its area in the half with the apex (0.25), circle and square split evenly (0).
# The values are those of pixelised renders rather than ideal shapes (a rasterised triangle
# fills 0.52-0.58 of its box), and the square's is moved below 1.0 because blur rounds square
# corners (fill 0.86-0.99 under the blur and noise in the tests) while circles stay at 0.73-0.79.
SHAPE_PROTOTYPES: dict[str, tuple[float, float]] = {
    "circle": (float(np.pi / 4), 0.0),
    "square": (0.95, 0.0),
    "triangle": (0.55, 0.22),
}
# Asymmetry is the one feature that tells a blunted (blurred) triangle from a circle, so it counts
# double in the distance.
ASYMMETRY_WEIGHT = 2.0
# A component farther than this from every prototype (distance including the log aspect ratio
# of its box) is "unknown": a blob or a stretched shape, which never satisfies a prompt.
MAX_SHAPE_DISTANCE = 0.3
UNKNOWN_SHAPE = "unknown"
_BORDER = 2  # border width (pixels) sampled for the background colour
# An object's colour is read from the quarter of its pixels farthest from the background: blur
# and noise pull edge pixels towards the background, which would bias both the colour name and
# the half-way threshold that redraws the outline.
_CORE_QUANTILE = 0.75

_COLOR_NAMES = tuple(OBJECT_COLORS)
_COLOR_LAB = srgb_to_lab(np.array([OBJECT_COLORS[c] for c in _COLOR_NAMES], dtype=np.float32))


@dataclass(frozen=True)
class Detection:
    """One detected object. ``cx``/``cy`` are the box centre as image fractions (like ToyObject)."""

    shape: str
    color: str
    size: str
    cx: float
    cy: float
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, end-exclusive
    area: int
    fill: float


def _as_uint8(img: Image.Image | np.ndarray) -> np.ndarray:
    """HxWx3 uint8. Float arrays are taken to be in 0..1 (decoder output) and rounded like a saved PNG."""
    if isinstance(img, Image.Image):
        return np.asarray(img.convert("RGB"), dtype=np.uint8)
    arr = np.asarray(img)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"expected an HxWx3 image array, got shape {arr.shape}")
    arr = arr[..., :3]
    if np.issubdtype(arr.dtype, np.floating):
        return np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
    return np.clip(arr, 0, 255).astype(np.uint8)


# Linear-light value of every possible 3x3 sum of uint8 samples (0..9*255): the box-blurred image
# is linearised by table lookup instead of a float power over every pixel.
_LINEAR_OF_SUM9 = srgb_to_linear(np.arange(9 * 255 + 1, dtype=np.float32) / 9.0)


def _smooth(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3x3 box blur (edge replicated) as ``(srgb, lab)``: cuts per-pixel noise 3x, barely moves edges."""
    h, w = rgb.shape[:2]
    padded = np.pad(rgb.astype(np.int32), ((1, 1), (1, 1), (0, 0)), mode="edge")
    total = sum(padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3))
    return total.astype(np.float32) / 9.0, linear_to_lab(_LINEAR_OF_SUM9[total])


def _border(a: np.ndarray) -> np.ndarray:
    """The pixels of a ``_BORDER``-wide frame of an HxWxC array, as an Nx C array."""
    b, c = _BORDER, a.shape[-1]
    parts = (a[:b], a[-b:], a[b:-b, :b], a[b:-b, -b:])
    return np.concatenate([p.reshape(-1, c) for p in parts])


def _background(srgb: np.ndarray, lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(srgb, lab)`` of the most common border colour: coarse Lab bins, then the median near the winner.

    The mode rather than the mean, because objects may touch the border; binning because noise
    makes every exact colour unique.
    """
    border_lab, border_rgb = _border(lab), _border(srgb)
    bins = np.floor(border_lab / 8.0).astype(np.int64) + 32  # L, a, b bins all land in 0..63
    keys = (bins[:, 0] * 64 + bins[:, 1]) * 64 + bins[:, 2]
    values, counts = np.unique(keys, return_counts=True)
    centre = np.median(border_lab[keys == values[np.argmax(counts)]], axis=0)
    near = ((border_lab - centre) ** 2).sum(axis=1) < (FOREGROUND_DELTA_E / 2) ** 2
    rgb = np.median(border_rgb[near], axis=0)
    return rgb, srgb_to_lab(rgb)


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected labelling of a boolean mask: ``(labels, n)``, labels 1..n, 0 for background.

    scipy is not a dependency and a per-pixel Python flood fill would dominate scoring time, so
    this is a vectorised union-find: every adjacent foreground pair is an edge; each round hooks the larger
    root of every still-split edge under the smaller one (``np.minimum.at``) and then compresses
    all paths by pointer jumping. Parents never exceed their index, so no cycles can form, and the
    number of rounds grows only logarithmically with component size in practice.
    """
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    index = np.arange(h * w, dtype=np.int64).reshape(h, w)
    heads, tails = [], []
    for a, b in (
        (np.s_[:, :-1], np.s_[:, 1:]),
        (np.s_[:-1, :], np.s_[1:, :]),
        (np.s_[:-1, :-1], np.s_[1:, 1:]),
        (np.s_[:-1, 1:], np.s_[1:, :-1]),
    ):
        both = mask[a] & mask[b]
        heads.append(index[a][both])
        tails.append(index[b][both])
    u, v = np.concatenate(heads), np.concatenate(tails)
    parent = np.arange(h * w, dtype=np.int64)
    while True:
        pu, pv = parent[u], parent[v]
        split = pu != pv
        if not split.any():
            break
        np.minimum.at(parent, np.maximum(pu[split], pv[split]), np.minimum(pu[split], pv[split]))
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
    flat_mask = mask.reshape(-1)
    is_root = flat_mask & (parent == np.arange(h * w))
    number = np.cumsum(is_root, dtype=np.int32)  # 1..n at the roots, in raster order
    labels = np.where(flat_mask, number[parent], 0).reshape(h, w)
    return labels, int(number[-1]) if number.size else 0


def _half_mass(profile: np.ndarray) -> float:
    """Fraction of a 1-D mass profile lying before the midpoint of its extent (pixels are unit cells)."""
    n = len(profile)
    weights = np.clip(n / 2.0 - np.arange(n), 0.0, 1.0)
    return float((profile * weights).sum() / profile.sum())


def classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """``(shape, fill)`` of a component cropped to its bounding box.

    Fill ratio separates the three shapes (ideally triangle 0.5, circle pi/4, square 1.0);
    asymmetry tells a triangle from a blob of the same fill, and the aspect term rejects
    stretched shapes. Axis-aligned triangles pointing any way count; rotated squares do not
    (Lens-Toy never sees them).
    """
    h, w = mask.shape
    fill = float(mask.sum()) / (h * w)
    top = _half_mass(mask.sum(axis=1))
    left = _half_mass(mask.sum(axis=0))
    asymmetry = max(abs(top - 0.5), abs(left - 0.5))
    aspect = float(np.log(w / h))
    best, best_distance = UNKNOWN_SHAPE, MAX_SHAPE_DISTANCE
    for shape, (p_fill, p_asym) in SHAPE_PROTOTYPES.items():
        distance = float(
            np.sqrt((fill - p_fill) ** 2 + (ASYMMETRY_WEIGHT * (asymmetry - p_asym)) ** 2 + aspect**2)
        )
        if distance < best_distance:
            best, best_distance = shape, distance
    return best, fill


def _classify_size(side_fraction: float) -> str:
    """Nearest size class in log space (sizes are ratios, so log distance is the fair one)."""
    names = list(SIZES)
    logs = np.log([SIZES[n] for n in names])
    return names[int(np.argmin(np.abs(logs - np.log(side_fraction))))]


def detect_objects(img: Image.Image | np.ndarray) -> list[Detection]:
    """Find the flat objects in an image, largest first. See the module docstring for the method.

    ``img``: PIL image, or HxWx3 array (uint8 0..255, or float 0..1 as a decoder would return).
    """
    rgb = _as_uint8(img)
    h, w = rgb.shape[:2]
    if h <= 2 * _BORDER or w <= 2 * _BORDER:
        raise ValueError(f"image {w}x{h} is too small to score")
    smooth_rgb, smooth_lab = _smooth(rgb)
    background_rgb, background_lab = _background(smooth_rgb, smooth_lab)
    distance = ((smooth_lab - background_lab) ** 2).sum(axis=-1)  # squared Delta E
    foreground = distance > FOREGROUND_DELTA_E**2
    labels, n = label_components(foreground)
    areas = np.bincount(labels.reshape(-1), minlength=n + 1)
    short_side = min(h, w)
    detections = []
    for k in np.nonzero(areas[1:] >= MIN_AREA_FRACTION * short_side**2)[0] + 1:
        detection = _measure(labels == k, rgb, smooth_rgb, distance, background_rgb, short_side)
        if detection is not None:
            detections.append(detection)
    detections.sort(key=lambda d: (-d.area, d.box))
    return detections


def _bounds(mask: np.ndarray) -> tuple[int, int, int, int]:
    """End-exclusive ``(x0, y0, x1, y1)`` of the True pixels of a non-empty mask."""
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _measure(
    component: np.ndarray,
    rgb: np.ndarray,
    smooth_rgb: np.ndarray,
    distance: np.ndarray,
    background_rgb: np.ndarray,
    short_side: int,
) -> Detection | None:
    """Colour, refined outline, shape, size and box of one connected component.

    The component came from a low, fixed threshold, so on a blurred image its outline sits on the
    faint outer tail of the edge and rounds every corner. Once the object's own colour is known, the outline is
    redrawn half-way from background to object colour, which is where the true edge lies under
    any symmetric blur; shape and box are measured on that outline. The half-way point is taken in
    sRGB, the space in which images are blurred and decoded, because in Lab it drifts outwards.
    """
    x0, y0, x1, y1 = _bounds(component)
    crop = component[y0:y1, x0:x1]
    strength = distance[y0:y1, x0:x1][crop]
    core = crop.copy()
    core[crop] = strength >= np.quantile(strength, _CORE_QUANTILE)
    object_rgb = np.median(rgb[y0:y1, x0:x1][core], axis=0)
    object_lab = srgb_to_lab(object_rgb)
    color = _COLOR_NAMES[int(np.argmin(((_COLOR_LAB - object_lab) ** 2).sum(axis=1)))]
    contrast = object_rgb - background_rgb
    along = (smooth_rgb[y0:y1, x0:x1] - background_rgb) @ contrast / max(float(contrast @ contrast), 1e-6)
    refined = crop & (along > 0.5)
    if not refined.any():
        return None
    rx0, ry0, rx1, ry1 = _bounds(refined)
    refined = refined[ry0:ry1, rx0:rx1]
    shape, fill = classify_shape(refined)
    box = (x0 + rx0, y0 + ry0, x0 + rx1, y0 + ry1)
    h, w = rgb.shape[:2]
    return Detection(
        shape=shape,
        color=color,
        size=_classify_size(max(box[2] - box[0], box[3] - box[1]) / short_side),
        cx=(box[0] + box[2]) / 2 / w,
        cy=(box[1] + box[3]) / 2 / h,
        box=box,
        area=int(refined.sum()),
        fill=fill,
    )


def _matches(d: Detection, shape: str, color: str | None) -> bool:
    return d.shape == shape and (color is None or d.color == color)


def score_image(img: Image.Image | np.ndarray, spec: dict) -> dict[str, bool]:
    """GenEval's rule for ``spec["kind"]`` applied to ``spec["scene"]`` (an entry of ``make_prompt_set``).

    * single: an object of the shape is present;
    * two: both shapes are present;
    * counting: exactly N objects of the shape in the asked colour (others may be present);
    * colors: an object of the shape has the asked colour;
    * position: both shapes present and the largest of each satisfies the relation under
      GenEval's box-offset rule (``toy_scenes.relation_axes``), the largest standing in for
      GenEval's most confident detection;
    * color_binding: each shape is present in its asked colour.

    Returns each named check plus ``"correct"``, the conjunction GenEval reports.
    """
    kind = spec["kind"]
    scene = spec["scene"] if isinstance(spec["scene"], ToyScene) else scene_from_dict(spec["scene"])
    detections = detect_objects(img)
    checks: dict[str, bool] = {}

    def present(shape: str, color: str | None = None, at_least: int = 1) -> bool:
        found = sum(_matches(d, shape, color) for d in detections) >= at_least
        name = " ".join(p for p in (color, shape) if p)
        checks[f"{name} present" if at_least == 1 else f"{at_least} {name} present"] = found
        return found

    if kind in ("single", "two"):
        for shape, count in Counter(o.shape for o in scene.objects).items():
            present(shape, at_least=count)
    elif kind == "counting":
        target = scene.objects[0]
        n = len(scene.objects)
        found = sum(_matches(d, target.shape, target.color) for d in detections)
        checks[f"exactly {n} {target.color} {target.shape}"] = found == n
    elif kind in ("colors", "color_binding"):
        for obj in scene.objects:
            present(obj.shape, obj.color)
    elif kind == "position":
        if scene.relation is None:
            raise ValueError("a position spec needs a scene with a relation")
        i, rel, j = scene.relation
        a_shape, b_shape = scene.objects[i].shape, scene.objects[j].shape
        holds = False
        a = next((d for d in detections if d.shape == a_shape), None)
        b = next((d for d in detections if d.shape == b_shape and d is not a), None)
        checks[f"{a_shape} present"] = a is not None
        checks[f"{b_shape} present"] = b is not None
        if a is not None and b is not None:
            holds = relation_axes(a.box, b.box, rel)[0] > RELATION_THRESHOLD
        checks[f"{a_shape} {rel} {b_shape}"] = holds
    else:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    checks["correct"] = all(checks.values())
    return checks


def evaluate(images: Iterable[Image.Image | np.ndarray], specs: Iterable[dict]) -> dict:
    """Score ``images[k]`` against ``specs[k]``; per-category accuracy and their mean.

    ``overall`` is the unweighted mean over the categories present, as GenEval reports it, so an
    unbalanced prompt set cannot hide a weak category. Returns ``{"accuracy": {kind: float},
    "count": {kind: int}, "overall": float, "n": int}``.
    """
    correct: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for img, spec in zip(images, specs, strict=True):
        total[spec["kind"]] += 1
        correct[spec["kind"]] += score_image(img, spec)["correct"]
    kinds = [k for k in KINDS if total[k]]
    accuracy = {k: correct[k] / total[k] for k in kinds}
    return {
        "accuracy": accuracy,
        "count": {k: total[k] for k in kinds},
        "overall": float(np.mean(list(accuracy.values()))) if accuracy else 0.0,
        "n": sum(total.values()),
    }


def format_table(result: dict) -> str:
    """Plain-text table of an :func:`evaluate` result, one row per category plus the overall mean."""
    rows = [f"{'category':<15}{'n':>6}{'accuracy':>10}"]
    rows += [f"{k:<15}{result['count'][k]:>6}{v:>10.3f}" for k, v in result["accuracy"].items()]
    rows.append(f"{'overall':<15}{result['n']:>6}{result['overall']:>10.3f}")
    return "\n".join(rows)
