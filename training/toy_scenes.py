"""Procedural flat-shape scenes: the training data and the evaluation prompts of Lens-Toy.

Lens-Toy is a small model with the Lens architecture that we can train from scratch and ship as
the default model. Natural images are out of reach for it, so it learns a world whose ground
truth is known exactly: a flat background with one to four circles, squares and triangles in
named colours and sizes. Because every attribute is known, the same scenes give

* dense, varied captions for training (:func:`caption_scene`), in the long descriptive style of
  the Lens paper, so the model learns to read colour, shape, size, count and layout;
* GenEval-style short prompts for evaluation (:func:`short_prompt`, :func:`make_prompt_set`),
  scored by the deterministic detector in ``training/toyeval.py``;
* a compositional held-out split (:func:`heldout_combinations`): colour/shape pairs that never
  occur in training, so evaluation can tell binding from memorisation.

Everything is pure numpy/Pillow and driven by a caller-supplied ``numpy.random.Generator`` so
data loading is reproducible per worker and per seed.

Geometry. Object centres are image fractions and object sides are fractions of
``min(width, height)``, so one scene renders at any aspect ratio with square (undistorted)
shapes. Placement is checked in the square frame, which is the worst case: on a wider or taller
canvas the objects only move further apart and further from the edges. Spatial relations are
checked with GenEval's rule (:func:`relation_axes`) on every aspect ratio up to
:data:`MAX_ASPECT`, with a margin so blur or a few pixels of drift cannot flip them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TypeVar

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# GenEval's ten colour names. The RGB values are chosen so that every pair is at least ~45 apart
# in CIELAB (Delta E 1976), which keeps nearest-colour classification exact on clean renders and
# tolerant to the colour drift and blur of a generative model.
OBJECT_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (245, 220, 30),
    "green": (40, 170, 60),
    "blue": (20, 100, 240),
    "purple": (128, 0, 128),
    "pink": (250, 150, 200),
    "brown": (120, 70, 30),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
}

BACKGROUND_COLORS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "light gray": (200, 200, 200),
    "gray": (128, 128, 128),
    "dark gray": (64, 64, 64),
    "black": (10, 10, 10),
    "beige": (235, 222, 195),
    "pale blue": (200, 225, 245),
    "navy": (25, 35, 80),
    "pale green": (205, 235, 205),
}

# Side length as a fraction of min(width, height).
SIZES: dict[str, float] = {"small": 0.14, "medium": 0.22, "large": 0.30}

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
INVERSE_RELATION: dict[str, str] = {
    "left of": "right of",
    "right of": "left of",
    "above": "below",
    "below": "above",
}

# GenEval's six categories. ``sample_scene(kind=None)`` additionally draws "free" scenes (one to
# four arbitrary objects, sometimes with a relation) so training sees layouts beyond the tests.
KINDS: tuple[str, ...] = ("single", "two", "counting", "colors", "position", "color_binding")
MIXED_KINDS: tuple[str, ...] = (*KINDS, "free")
SPLITS: tuple[str, ...] = ("train", "heldout")

# Colour/shape pairs that training never shows. One per shape at least, all in chromatic colours
# that are allowed on most backgrounds, so every kind can be sampled in the held-out split.
_HELDOUT: frozenset[tuple[str, str]] = frozenset(
    {("red", "triangle"), ("blue", "circle"), ("yellow", "square"), ("purple", "triangle")}
)

# Relations are guaranteed (with margin) for width/height between 1/MAX_ASPECT and MAX_ASPECT.
MAX_ASPECT = 3.0
# An object colour closer than this (CIELAB Delta E) to the background is not used on it: it would
# be hard to see, and the detector separates foreground from background by this distance.
MIN_BACKGROUND_DELTA_E = 40.0
# Geometry in the square frame (fractions of min(width, height)).
EDGE_MARGIN = 0.04  # free border around every object
OBJECT_GAP = 0.05  # free space between any two objects, so blur never merges them
# GenEval's position rule (see relation_axes): a relation holds when its component exceeds 0.5.
# Generated relations are stronger and nearly axis-aligned so they stay true under noise and are
# not also readable as the perpendicular relation.
POSITION_DIM_THRESHOLD = 0.1
RELATION_THRESHOLD = 0.5
_RELATION_CLEAR = 0.75
_RELATION_ORTHOGONAL_MAX = 0.3
_RELATION_JITTER = 0.05  # max perpendicular offset of a related pair (square-frame fraction)
_ASPECT_CHECKS = tuple(float(a) for a in np.geomspace(1.0 / MAX_ASPECT, MAX_ASPECT, 9))
_PLACEMENT_TRIES = 200
_SCENE_TRIES = 200

T = TypeVar("T")

NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}


@dataclass(frozen=True)
class ToyObject:
    """One flat shape. ``cx``/``cy`` are the centre of its bounding box as image fractions."""

    shape: str
    color: str
    size: str
    cx: float
    cy: float


@dataclass(frozen=True)
class ToyScene:
    """Background plus objects; ``relation = (i, r, j)`` states "object i is r object j"."""

    background: str
    objects: tuple[ToyObject, ...]
    relation: tuple[int, str, int] | None


def srgb_to_linear(rgb: np.ndarray) -> np.ndarray:
    """sRGB in 0..255 -> linear-light RGB in 0..1 (float32), undoing the sRGB transfer curve."""
    c = np.asarray(rgb, dtype=np.float32) / 255.0
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


_RGB_TO_XYZ = np.array(
    [
        [0.4124564, 0.3575761, 0.1804375],
        [0.2126729, 0.7151522, 0.0721750],
        [0.0193339, 0.1191920, 0.9503041],
    ],
    dtype=np.float32,
) / np.array([[0.95047], [1.0], [1.08883]], dtype=np.float32)  # rows divided by the D65 white


def linear_to_lab(linear: np.ndarray) -> np.ndarray:
    """Linear-light RGB in 0..1 (last axis 3) -> CIELAB (D65).

    Split from :func:`srgb_to_lab` so ToyEval can linearise whole images through a lookup table.
    """
    xyz = linear @ _RGB_TO_XYZ.T
    delta = 6.0 / 29.0
    f = np.where(xyz > delta**3, np.cbrt(xyz), xyz / (3 * delta**2) + 4.0 / 29.0)
    return np.stack(
        [116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]), 200.0 * (f[..., 1] - f[..., 2])], axis=-1
    )


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in 0..255 (any leading shape, last axis 3) -> CIELAB (D65).

    Lab distances track perceived colour difference far better than RGB distances, which is what
    both the background exclusion here and the colour classifier in ToyEval need.
    """
    return linear_to_lab(srgb_to_linear(rgb))


def _allowed_colors() -> dict[str, tuple[str, ...]]:
    """Object colours usable on each background (far enough from it in Lab)."""
    names = list(OBJECT_COLORS)
    obj_lab = srgb_to_lab(np.array([OBJECT_COLORS[n] for n in names]))
    allowed = {}
    for bg, rgb in BACKGROUND_COLORS.items():
        dist = np.linalg.norm(obj_lab - srgb_to_lab(np.array(rgb)), axis=-1)
        allowed[bg] = tuple(n for n, d in zip(names, dist, strict=True) if d >= MIN_BACKGROUND_DELTA_E)
    return allowed


ALLOWED_COLORS: dict[str, tuple[str, ...]] = _allowed_colors()


def heldout_combinations() -> frozenset[tuple[str, str]]:
    """(colour, shape) pairs that ``split="train"`` never emits and ``split="heldout"`` always uses."""
    return _HELDOUT


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


def object_box(obj: ToyObject, width: int, height: int) -> tuple[int, int, int, int]:
    """Pixel bounding box ``(x0, y0, x1, y1)`` (end-exclusive) of ``obj`` on a ``width x height`` canvas."""
    side = max(3, round(SIZES[obj.size] * min(width, height)))
    x0 = round(obj.cx * width - side / 2)
    y0 = round(obj.cy * height - side / 2)
    return x0, y0, x0 + side, y0 + side


def relation_axes(
    box_a: tuple[float, float, float, float], box_b: tuple[float, float, float, float], relation: str
) -> tuple[float, float]:
    """GenEval's position rule: ``(along, across)`` components of A's offset from B for ``relation``.

    As in GenEval's ``relative_position``, the centre offset is shrunk on each axis by
    ``POSITION_DIM_THRESHOLD`` times the summed box extents and divided by the raw offset length.
    ``along`` is the component in the direction of ``relation`` ("left of" -> towards -x, y grows
    downwards); the relation holds when ``along > RELATION_THRESHOLD``. ``across`` is the signed
    perpendicular component, used by the generator to keep relations unambiguous.
    Boxes are ``(x0, y0, x1, y1)`` in one pixel space.
    """
    a = np.asarray(box_a, dtype=np.float64).reshape(2, 2)
    b = np.asarray(box_b, dtype=np.float64).reshape(2, 2)
    offset = a.mean(axis=0) - b.mean(axis=0)
    norm = float(np.linalg.norm(offset))
    if norm == 0.0:
        return 0.0, 0.0
    dims = np.diff(a, axis=0)[0] + np.diff(b, axis=0)[0]
    revised = np.maximum(np.abs(offset) - POSITION_DIM_THRESHOLD * dims, 0.0) * np.sign(offset) / norm
    dx, dy = float(revised[0]), float(revised[1])
    return {"left of": (-dx, dy), "right of": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[relation]


def _frame_box(cx: float, cy: float, side: float, aspect: float) -> tuple[float, float, float, float]:
    """Float box of a centre/side (fractions) on a canvas of the given aspect with min side 1."""
    w, h = (aspect, 1.0) if aspect >= 1.0 else (1.0, 1.0 / aspect)
    return cx * w - side / 2, cy * h - side / 2, cx * w + side / 2, cy * h + side / 2


def _relation_is_clear(
    a: tuple[float, float], side_a: float, b: tuple[float, float], side_b: float, relation: str
) -> bool:
    """True if ``a relation b`` holds with margin, and its perpendicular does not, at every checked aspect."""
    for aspect in _ASPECT_CHECKS:
        along, across = relation_axes(
            _frame_box(*a, side_a, aspect), _frame_box(*b, side_b, aspect), relation
        )
        if along < _RELATION_CLEAR or abs(across) > _RELATION_ORTHOGONAL_MAX:
            return False
    return True


def _separated(centres: list[tuple[float, float]], sides: list[float]) -> bool:
    """Every pair of boxes is at least OBJECT_GAP apart along x or y (square frame)."""
    for i in range(len(centres)):
        for j in range(i):
            reach = (sides[i] + sides[j]) / 2 + OBJECT_GAP
            if abs(centres[i][0] - centres[j][0]) < reach and abs(centres[i][1] - centres[j][1]) < reach:
                return False
    return True


def _uniform_centre(rng: np.random.Generator, side: float) -> tuple[float, float]:
    lo, hi = EDGE_MARGIN + side / 2, 1.0 - EDGE_MARGIN - side / 2
    return float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))


def _centre_beside(
    rng: np.random.Generator, anchor: tuple[float, float], side: float, anchor_side: float, relation: str
) -> tuple[float, float] | None:
    """A centre for an object of ``side`` that is ``relation`` the anchor, nearly aligned with it."""
    lo, hi = EDGE_MARGIN + side / 2, 1.0 - EDGE_MARGIN - side / 2
    reach = (side + anchor_side) / 2 + OBJECT_GAP
    horizontal = relation in ("left of", "right of")
    main, cross = (anchor[0], anchor[1]) if horizontal else (anchor[1], anchor[0])
    span = (lo, main - reach) if relation in ("left of", "above") else (main + reach, hi)
    if span[0] > span[1]:
        return None
    along = float(rng.uniform(*span))
    across = float(np.clip(cross + rng.uniform(-_RELATION_JITTER, _RELATION_JITTER), lo, hi))
    return (along, across) if horizontal else (across, along)


def _place(
    rng: np.random.Generator, sides: list[float], relation: tuple[int, str, int] | None
) -> list[tuple[float, float]] | None:
    """Rejection-sample non-overlapping centres; None if this size combination does not fit."""
    for _ in range(_PLACEMENT_TRIES):
        centres = [_uniform_centre(rng, s) for s in sides]
        if relation is not None:
            i, rel, j = relation
            beside = _centre_beside(rng, centres[j], sides[i], sides[j], rel)
            if beside is None or not _relation_is_clear(beside, sides[i], centres[j], sides[j], rel):
                continue
            centres[i] = beside
        if _separated(centres, sides):
            return centres
    return None


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def _pick(rng: np.random.Generator, options: Sequence[T]) -> T:
    """rng.choice for sequences of tuples or strings (numpy would turn them into arrays)."""
    return options[int(rng.integers(len(options)))]


def _pairs(
    background: str, split: str, exclude_shapes: set[str], exclude_colors: set[str]
) -> list[tuple[str, str]]:
    """Colour/shape pairs allowed on ``background`` for ordinary objects of ``split``."""
    return [
        (c, s)
        for c in ALLOWED_COLORS[background]
        for s in SHAPES
        if s not in exclude_shapes
        and c not in exclude_colors
        and (split == "heldout" or (c, s) not in _HELDOUT)
    ]


def _sample_pairs(rng: np.random.Generator, kind: str, background: str, split: str) -> list[tuple[str, str]]:
    """Colour/shape pairs for the objects of one scene.

    In the held-out split one object (the "anchor") is forced to a held-out pair; the others are
    free. Every background allows at least one held-out colour (checked by the tests).
    """
    if split == "heldout":
        first = _pick(rng, [(c, s) for c, s in sorted(_HELDOUT) if c in ALLOWED_COLORS[background]])
    else:
        first = _pick(rng, _pairs(background, split, set(), set()))
    if kind in ("single", "colors"):
        return [first]
    if kind == "counting":
        return [first] * int(rng.integers(2, 5))
    if kind in ("two", "position", "color_binding"):
        other_colors = {first[0]} if kind == "color_binding" else set()
        others = _pairs(background, split, {first[1]}, other_colors)
        pairs = [first, _pick(rng, others)]
        return [pairs[k] for k in rng.permutation(2)]
    # free: one to four arbitrary objects, the anchor at a random position
    n = int(rng.integers(1, 5))
    pairs = [first] + [_pick(rng, _pairs(background, split, set(), set())) for _ in range(n - 1)]
    return [pairs[k] for k in rng.permutation(n)]


def sample_scene(rng: np.random.Generator, kind: str | None = None, split: str = "train") -> ToyScene:
    """Draw one scene of a GenEval ``kind`` (None: any of :data:`MIXED_KINDS`).

    Kinds: "single"/"colors" one object; "two" two objects of different shapes; "counting" two to
    four identical objects; "position" two objects of different shapes with a relation;
    "color_binding" two objects differing in both shape and colour; "free" one to four arbitrary
    objects, with a relation between two uniquely described ones half of the time.
    ``split="train"`` never uses :func:`heldout_combinations`; ``split="heldout"`` always includes
    at least one of them (for counting, the counted objects are one).
    """
    if kind is not None and kind not in MIXED_KINDS:
        raise ValueError(f"unknown scene kind {kind!r}; expected one of {MIXED_KINDS} or None")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if kind is None:
        kind = MIXED_KINDS[int(rng.integers(len(MIXED_KINDS)))]
    backgrounds = list(BACKGROUND_COLORS)
    for _ in range(_SCENE_TRIES):
        background = backgrounds[int(rng.integers(len(backgrounds)))]
        pairs = _sample_pairs(rng, kind, background, split)
        if kind == "counting":
            sizes = [list(SIZES)[int(rng.integers(len(SIZES)))]] * len(pairs)
        else:
            sizes = [list(SIZES)[int(k)] for k in rng.integers(len(SIZES), size=len(pairs))]
        relation = _sample_relation(rng, kind, pairs)
        centres = _place(rng, [SIZES[s] for s in sizes], relation)
        if centres is None:
            continue
        objects = tuple(
            ToyObject(shape=s, color=c, size=z, cx=round(x, 4), cy=round(y, 4))
            for (c, s), z, (x, y) in zip(pairs, sizes, centres, strict=True)
        )
        return ToyScene(background=background, objects=objects, relation=relation)
    raise RuntimeError(f"could not place a {kind!r} scene in {_SCENE_TRIES} tries")


def _sample_relation(
    rng: np.random.Generator, kind: str, pairs: list[tuple[str, str]]
) -> tuple[int, str, int] | None:
    """A relation for position scenes, and for half of the free scenes with two describable objects."""
    relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
    if kind == "position":
        return 0, relation, 1
    if kind != "free" or rng.random() < 0.5:
        return None
    counts = Counter(pairs)
    unique = [k for k, p in enumerate(pairs) if counts[p] == 1]
    if len(unique) < 2:
        return None
    i, j = (unique[int(k)] for k in rng.choice(len(unique), size=2, replace=False))
    return i, relation, j


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def render_scene(scene: ToyScene, width: int, height: int) -> Image.Image:
    """Draw ``scene`` as an RGB image, without anti-aliasing so every pixel has an exact palette colour.

    Triangles point up and fill half of their bounding box; circles and squares fill it.
    """
    if width < 16 or height < 16:
        raise ValueError(f"canvas {width}x{height} is too small; both sides must be >= 16 pixels")
    image = Image.new("RGB", (width, height), BACKGROUND_COLORS[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        x0, y0, x1, y1 = object_box(obj, width, height)
        fill = OBJECT_COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) / 2, y0)], fill=fill)
        else:
            raise ValueError(f"unknown shape {obj.shape!r}")
    return image


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _with_article(phrase: str) -> str:
    return f"{_article(phrase)} {phrase}"


def _join(items: list[str], rng: np.random.Generator | None = None) -> str:
    """English list: "a", "a and b", "a, b and c" (Oxford comma at random when rng is given)."""
    if len(items) <= 2:
        return " and ".join(items)
    comma = "," if rng is not None and rng.random() < 0.5 else ""
    return ", ".join(items[:-1]) + f"{comma} and " + items[-1]


def _groups(scene: ToyScene) -> list[tuple[str, str, list[int]]]:
    """Objects grouped by (colour, shape), in order of first appearance."""
    groups: dict[tuple[str, str], list[int]] = {}
    for k, obj in enumerate(scene.objects):
        groups.setdefault((obj.color, obj.shape), []).append(k)
    return [(c, s, idx) for (c, s), idx in groups.items()]


_SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little"),
    "medium": ("medium-sized", "mid-sized", "medium"),
    "large": ("large", "big"),
}

_RELATION_WORDS: dict[str, tuple[str, ...]] = {
    "left of": ("to the left of", "left of", "on the left side of"),
    "right of": ("to the right of", "right of", "on the right side of"),
    "above": ("above", "higher up than", "over"),
    "below": ("below", "beneath", "under", "lower down than"),
}

_PROMPT_RELATION: dict[str, str] = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}

_LOCATION_WORDS: dict[tuple[str, str], tuple[str, ...]] = {
    ("top", "left"): ("in the upper left", "toward the top left", "in the top-left area"),
    ("top", "center"): ("at the top", "near the top center", "in the upper middle"),
    ("top", "right"): ("in the upper right", "toward the top right", "in the top-right area"),
    ("middle", "left"): ("on the left side", "at the left", "in the left part of the image"),
    ("middle", "center"): ("in the center", "in the middle", "near the center"),
    ("middle", "right"): ("on the right side", "at the right", "in the right part of the image"),
    ("bottom", "left"): ("in the lower left", "toward the bottom left", "in the bottom-left area"),
    ("bottom", "center"): ("at the bottom", "near the bottom center", "in the lower middle"),
    ("bottom", "right"): ("in the lower right", "toward the bottom right", "in the bottom-right area"),
}

_OPENINGS: tuple[str, ...] = (
    "A minimalist flat illustration of {objects}",
    "A simple digital drawing showing {objects}",
    "A clean vector-style image featuring {objects}",
    "This picture shows {objects}",
    "An abstract geometric composition with {objects}",
    "A flat graphic containing {objects}",
    "{Objects} {are} shown",
    "{Objects} {are} arranged in a simple flat design",
)

_BACKGROUND_CLAUSES: tuple[str, ...] = (
    "on a plain {bg} background",
    "set against a solid {bg} backdrop",
    "over a uniform {bg} background",
)

_BACKGROUND_SENTENCES: tuple[str, ...] = (
    "The background is a flat, uniform {bg}.",
    "Everything sits on a plain {bg} background.",
    "The backdrop is solid {bg} with no texture.",
    "Behind the shapes is an even {bg} background.",
)

_TOTAL_SENTENCES: tuple[str, ...] = (
    "In total there are {n} shapes.",
    "The image contains {n} objects in all.",
    "Altogether, {n} shapes are visible.",
    "There are exactly {n} objects in the scene.",
)

_SINGLE_TOTAL_SENTENCES: tuple[str, ...] = (
    "It is the only object in the image.",
    "There is nothing else in the picture.",
    "No other shapes are present.",
)

_STYLE_SENTENCES: tuple[str, ...] = (
    "The shapes are flat and evenly colored, with crisp edges and no shading.",
    "There is no text, texture or shading anywhere in the image.",
    "The style is minimal, like a simple vector graphic.",
    "Each shape is a solid block of color with sharp outlines.",
)


def _location(obj: ToyObject) -> tuple[str, str] | None:
    """(vertical, horizontal) region of an object, or None when it sits near a region boundary."""

    def region(v: float, low: str, mid: str, high: str) -> str | None:
        if v < 0.38:
            return low
        if v > 0.62:
            return high
        if 0.44 <= v <= 0.56:
            return mid
        return None

    h = region(obj.cx, "left", "center", "right")
    v = region(obj.cy, "top", "middle", "bottom")
    return None if h is None or v is None else (v, h)


def _size_word(rng: np.random.Generator, size: str) -> str:
    return _pick(rng, _SIZE_WORDS[size])


def _group_phrase(rng: np.random.Generator, scene: ToyScene, color: str, shape: str, idx: list[int]) -> str:
    """Noun phrase for one (colour, shape) group with sizes and count word, e.g. "two small red circles"."""
    sizes = [scene.objects[k].size for k in idx]
    if len(idx) == 1:
        return _with_article(f"{_size_word(rng, sizes[0])} {color} {shape}")
    count = NUMBER_WORDS[len(idx)]
    if len(set(sizes)) == 1:
        return f"{count} {_size_word(rng, sizes[0])} {color} {shape}s"
    per_size = Counter(sizes)
    parts = [f"{NUMBER_WORDS[per_size[z]]} {_size_word(rng, z)}" for z in SIZES if z in per_size]
    return f"{count} {color} {shape}s ({_join(parts)})"


def _reference(scene: ToyScene, k: int, rng: np.random.Generator) -> str:
    """Definite description of a uniquely coloured-and-shaped object, sometimes with its size."""
    obj = scene.objects[k]
    size = f"{_size_word(rng, obj.size)} " if rng.random() < 0.3 else ""
    return f"the {size}{obj.color} {obj.shape}"


def _capitalise(text: str) -> str:
    return text[0].upper() + text[1:]


_RELATION_TEMPLATES: tuple[str, ...] = (
    "{A} is {rel} {b}.",
    "{A} has been placed {rel} {b}.",
    "{Rel} {b} is {a}.",
    "{A} appears {rel} {b}.",
)

_SINGLE_LOCATION_TEMPLATES: tuple[str, ...] = (
    "The {ref} is {loc}.",
    "The {ref} sits {loc}.",
    "{Loc}, there is {a_ref}.",
)


def _relation_sentence(scene: ToyScene, rng: np.random.Generator) -> str:
    assert scene.relation is not None
    i, rel, j = scene.relation
    a, b = _reference(scene, i, rng), _reference(scene, j, rng)
    if rng.random() < 0.3:  # state it from the other object's point of view
        a, b, rel = b, a, INVERSE_RELATION[rel]
    words = _pick(rng, _RELATION_WORDS[rel])
    return _pick(rng, _RELATION_TEMPLATES).format(
        a=a, A=_capitalise(a), b=b, rel=words, Rel=_capitalise(words)
    )


def _arrangement_sentence(
    scene: ToyScene, color: str, shape: str, idx: list[int], rng: np.random.Generator
) -> str:
    """How a group of identical objects is laid out, for groups whose members sit between regions."""
    xs = [scene.objects[k].cx for k in idx]
    ys = [scene.objects[k].cy for k in idx]
    spread_x, spread_y = max(xs) - min(xs), max(ys) - min(ys)
    if spread_x > 2 * spread_y:
        layout = _pick(rng, ("side by side", "in a horizontal row", "next to each other from left to right"))
    elif spread_y > 2 * spread_x:
        layout = _pick(rng, ("one above the other", "in a vertical column", "stacked from top to bottom"))
    else:
        layout = _pick(rng, ("scattered across the image", "at different heights and positions"))
    return f"The {NUMBER_WORDS[len(idx)]} {color} {shape}s are arranged {layout}."


def _location_sentences(scene: ToyScene, rng: np.random.Generator) -> list[str]:
    """Where each (colour, shape) group sits, for groups whose members all have a clear region."""
    sentences = []
    for color, shape, idx in _groups(scene):
        regions = [_location(scene.objects[k]) for k in idx]
        places = [_pick(rng, _LOCATION_WORDS[r]) for r in regions if r is not None]
        if len(places) < len(idx):
            if len(idx) > 1:
                sentences.append(_arrangement_sentence(scene, color, shape, idx, rng))
            continue
        if len(idx) == 1:
            ref = f"{color} {shape}"
            sentences.append(
                _pick(rng, _SINGLE_LOCATION_TEMPLATES).format(
                    ref=ref, loc=places[0], Loc=_capitalise(places[0]), a_ref=_with_article(ref)
                )
            )
        else:
            verb = _pick(rng, ("are", "are placed", "appear"))
            sentences.append(f"The {NUMBER_WORDS[len(idx)]} {color} {shape}s {verb} {_join(places, rng)}.")
    return sentences


def caption_scene(scene: ToyScene, rng: np.random.Generator) -> str:
    """Long descriptive caption for training, with randomised templates, synonyms and sentence order.

    Every object's colour and shape is named, counts are written as words ("two red circles"),
    sizes and the background are described, regions are named where an object is clearly inside
    one, and the scene's relation is stated (sometimes inverted: "B is right of A"). Shape and
    colour words are always the canonical names used by :func:`short_prompt`, so the vocabulary
    the model learns is the vocabulary it is evaluated on; variety comes from everything else.
    """
    groups = _groups(scene)
    objects = _join([_group_phrase(rng, scene, c, s, idx) for c, s, idx in groups], rng)
    total = len(scene.objects)
    opening = _pick(rng, _OPENINGS)
    main = opening.format(objects=objects, Objects=_capitalise(objects), are="are" if total > 1 else "is")
    extras: list[str] = []
    if rng.random() < 0.5:
        main += " " + _pick(rng, _BACKGROUND_CLAUSES).format(bg=scene.background)
    else:
        extras.append(_pick(rng, _BACKGROUND_SENTENCES).format(bg=scene.background))
    main += "."
    if scene.relation is not None:
        extras.append(_relation_sentence(scene, rng))
    extras.extend(_location_sentences(scene, rng))
    if total == 1:
        if rng.random() < 0.5:
            extras.append(_pick(rng, _SINGLE_TOTAL_SENTENCES))
    elif rng.random() < 0.7:
        extras.append(_pick(rng, _TOTAL_SENTENCES).format(n=NUMBER_WORDS[total]))
    if rng.random() < 0.5:
        extras.append(_pick(rng, _STYLE_SENTENCES))
    order = rng.permutation(len(extras))
    return " ".join([main, *(extras[k] for k in order)])


def short_prompt(scene: ToyScene) -> str:
    """GenEval-style prompt, e.g. "a photo of two blue squares" or
    "a photo of a red circle to the left of a green triangle".

    Colours are always named (unlike GenEval's single/two/counting/position prompts) because the
    held-out colour/shape pairs must appear in the prompt to be tested; ``training/toyeval.py``
    says which categories score them.
    """
    phrases = {}
    for color, shape, idx in _groups(scene):
        noun = f"{color} {shape}"
        phrase = _with_article(noun) if len(idx) == 1 else f"{NUMBER_WORDS[len(idx)]} {noun}s"
        phrases[idx[0]] = phrase
    if scene.relation is not None and len(scene.objects) == 2:
        i, rel, j = scene.relation
        return f"a photo of {phrases[i]} {_PROMPT_RELATION[rel]} {phrases[j]}"
    text = f"a photo of {_join(list(phrases.values()))}"
    if scene.relation is not None:
        i, rel, j = scene.relation
        a, b = scene.objects[i], scene.objects[j]
        text += f", with the {a.color} {a.shape} {_PROMPT_RELATION[rel]} the {b.color} {b.shape}"
    return text


# --------------------------------------------------------------------------------------------
# Serialisation and prompt sets
# --------------------------------------------------------------------------------------------


def scene_to_dict(scene: ToyScene) -> dict:
    """JSON-serialisable form of a scene (lists instead of tuples)."""
    return {
        "background": scene.background,
        "objects": [asdict(o) for o in scene.objects],
        "relation": None if scene.relation is None else list(scene.relation),
    }


def scene_from_dict(data: dict) -> ToyScene:
    """Inverse of :func:`scene_to_dict`, e.g. for a prompt set read back from JSON."""
    relation = data.get("relation")
    return ToyScene(
        background=data["background"],
        objects=tuple(ToyObject(**o) for o in data["objects"]),
        relation=None if relation is None else (int(relation[0]), str(relation[1]), int(relation[2])),
    )


def make_prompt_set(n: int, seed: int, split: str = "heldout") -> list[dict]:
    """``n`` evaluation prompts, kinds in round-robin so the six categories differ by at most one.

    Entry ``k`` depends only on ``(seed, k, split)``, so a longer set extends a shorter one and
    results on the first prompts stay comparable. Entries: ``{"prompt", "kind", "scene"}``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    out = []
    for k in range(n):
        kind = KINDS[k % len(KINDS)]
        scene = sample_scene(np.random.default_rng([seed, k]), kind, split=split)
        out.append({"prompt": short_prompt(scene), "kind": kind, "scene": scene_to_dict(scene)})
    return out
