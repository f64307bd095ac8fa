"""Tests of the Lens-Toy scene generator: the data it emits must be exactly what its captions say."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from training.toy_scenes import (
    ALLOWED_COLORS,
    BACKGROUND_COLORS,
    KINDS,
    MAX_ASPECT,
    MIN_BACKGROUND_DELTA_E,
    MIXED_KINDS,
    NUMBER_WORDS,
    OBJECT_COLORS,
    OBJECT_GAP,
    RELATION_THRESHOLD,
    SHAPES,
    SIZES,
    ToyObject,
    ToyScene,
    caption_scene,
    heldout_combinations,
    make_prompt_set,
    relation_axes,
    render_scene,
    sample_scene,
    scene_from_dict,
    scene_to_dict,
    short_prompt,
    srgb_to_lab,
)

CANVASES = [(256, 256), (320, 192), (192, 320), (384, 128), (128, 384)]


def scenes(kind: str | None, n: int, seed: int = 0, split: str = "train") -> list[ToyScene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, kind, split=split) for _ in range(n)]


def pixel_box(scene: ToyScene, k: int, width: int, height: int) -> tuple[int, int, int, int]:
    """Box of object k measured in a render of that object alone (so colours may repeat in the scene)."""
    alone = render_scene(replace(scene, objects=(scene.objects[k],), relation=None), width, height)
    background = np.array(BACKGROUND_COLORS[scene.background])
    ys, xs = np.nonzero((np.asarray(alone) != background).any(axis=-1))
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def test_same_seed_same_scenes_and_captions() -> None:
    assert scenes(None, 50, seed=3) == scenes(None, 50, seed=3)
    assert scenes(None, 50, seed=3) != scenes(None, 50, seed=4)
    scene = scenes("free", 1, seed=5)[0]
    rng_a, rng_b = np.random.default_rng(9), np.random.default_rng(9)
    assert [caption_scene(scene, rng_a) for _ in range(5)] == [caption_scene(scene, rng_b) for _ in range(5)]
    a, b = render_scene(scene, 320, 192), render_scene(scene, 320, 192)
    assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("kind", KINDS)
def test_kinds_have_their_geneval_structure(kind: str) -> None:
    for scene in scenes(kind, 60, seed=1):
        objs = scene.objects
        shapes, colors = [o.shape for o in objs], [o.color for o in objs]
        assert all(o.shape in SHAPES and o.color in OBJECT_COLORS and o.size in SIZES for o in objs)
        if kind in ("single", "colors"):
            assert len(objs) == 1
        elif kind == "counting":
            assert 2 <= len(objs) <= 4 and len({(o.shape, o.color, o.size) for o in objs}) == 1
        else:
            assert len(objs) == 2 and shapes[0] != shapes[1]
        if kind == "color_binding":
            assert colors[0] != colors[1]
        assert (scene.relation is not None) == (kind == "position")


def test_mixed_sampling_covers_every_kind_and_up_to_four_objects() -> None:
    counts = Counter(len(s.objects) for s in scenes(None, 400, seed=2))
    assert set(counts) == {1, 2, 3, 4}
    assert any(s.relation is not None for s in scenes("free", 50, seed=2))
    with pytest.raises(ValueError, match="kind"):
        sample_scene(np.random.default_rng(0), "three")
    with pytest.raises(ValueError, match="split"):
        sample_scene(np.random.default_rng(0), "single", split="test")


def test_object_colours_stand_out_from_the_background() -> None:
    for scene in scenes(None, 300, seed=4):
        bg = srgb_to_lab(np.array(BACKGROUND_COLORS[scene.background]))
        for obj in scene.objects:
            assert (
                np.linalg.norm(srgb_to_lab(np.array(OBJECT_COLORS[obj.color])) - bg) >= MIN_BACKGROUND_DELTA_E
            )
    # every background hosts six or more colours, including a held-out one for the held-out split
    for background, colors in ALLOWED_COLORS.items():
        assert len(colors) >= 6 and {c for c, _ in heldout_combinations()} & set(colors), background
    # the palette itself: at least six named colours, pairwise well separated in Lab
    lab = srgb_to_lab(np.array(list(OBJECT_COLORS.values())))
    distances = np.linalg.norm(lab[:, None] - lab[None], axis=-1) + np.eye(len(lab)) * 1e9
    assert len(OBJECT_COLORS) >= 6 and distances.min() > 40


@pytest.mark.parametrize(("width", "height"), CANVASES)
def test_every_aspect_ratio_renders_exact_separate_objects(width: int, height: int) -> None:
    gap = OBJECT_GAP * min(width, height) - 2  # minus rounding of both boxes
    for scene in scenes(None, 40, seed=width + height):
        image = render_scene(scene, width, height)
        assert image.size == (width, height) and image.mode == "RGB"
        palette = {BACKGROUND_COLORS[scene.background]} | {OBJECT_COLORS[o.color] for o in scene.objects}
        codes = np.unique(np.asarray(image).astype(np.int64) @ np.array([65536, 256, 1]))
        assert {(c >> 16, (c >> 8) & 255, c & 255) for c in codes.tolist()} <= palette  # no anti-aliasing
        boxes = [pixel_box(scene, k, width, height) for k in range(len(scene.objects))]
        for k, (x0, y0, x1, y1) in enumerate(boxes):
            assert min(x0, y0) >= 0 and x1 <= width and y1 <= height
            assert x1 - x0 == y1 - y0  # shapes stay undistorted
            for m in range(k):
                ox0, oy0, ox1, oy1 = boxes[m]
                assert max(ox0 - x1, x0 - ox1, oy0 - y1, y0 - oy1) >= gap, "objects touch"


@pytest.mark.parametrize(("width", "height"), CANVASES)
def test_relations_hold_in_rendered_pixels(width: int, height: int) -> None:
    assert max(width / height, height / width) <= MAX_ASPECT
    related = [s for s in scenes("position", 40, seed=6) + scenes("free", 120, seed=6) if s.relation]
    assert len(related) > 50
    for scene in related:
        i, rel, j = scene.relation
        a, b = pixel_box(scene, i, width, height), pixel_box(scene, j, width, height)
        # unambiguous: A's box lies wholly on the asked side of B's box ...
        clearance = {
            "left of": b[0] - a[2],
            "right of": a[0] - b[2],
            "above": b[1] - a[3],
            "below": a[1] - b[3],
        }
        assert clearance[rel] > 0, (scene, rel)
        # ... GenEval's rule agrees with margin, and does not also read the perpendicular relation
        along, across = relation_axes(a, b, rel)
        assert along > RELATION_THRESHOLD + 0.15 and abs(across) < RELATION_THRESHOLD


def test_heldout_pairs_never_in_train_and_always_in_heldout() -> None:
    heldout = heldout_combinations()
    assert heldout and all(c in OBJECT_COLORS and s in SHAPES for c, s in heldout)
    assert {s for _, s in heldout} == set(SHAPES)  # every shape has an unseen colour
    for kind in MIXED_KINDS:
        for scene in scenes(kind, 150, seed=7, split="train"):
            assert not {(o.color, o.shape) for o in scene.objects} & heldout
        for scene in scenes(kind, 60, seed=7, split="heldout"):
            assert {(o.color, o.shape) for o in scene.objects} & heldout
    for entry in make_prompt_set(24, seed=0):
        scene = scene_from_dict(entry["scene"])
        pairs = {(o.color, o.shape) for o in scene.objects} & heldout
        assert any(f"{c} {s}" in entry["prompt"] for c, s in pairs)


def _mentions(caption: str, color: str, shape: str) -> bool:
    return re.search(rf"\b{color} {shape}s?\b", caption) is not None


def test_captions_vary_and_describe_every_object() -> None:
    for scene in scenes(None, 150, seed=8):
        rng = np.random.default_rng(len(scene.objects))
        captions = [caption_scene(scene, rng) for _ in range(6)]
        assert len(set(captions)) >= 4
        for caption in captions:
            assert len(caption) > len(short_prompt(scene)) + 40
            assert scene.background in caption
            for color, shape in {(o.color, o.shape) for o in scene.objects}:
                assert _mentions(caption, color, shape), (caption, color, shape)
            for (color, shape), n in Counter((o.color, o.shape) for o in scene.objects).items():
                if n > 1:
                    assert re.search(rf"(?i)\b{NUMBER_WORDS[n]}\b[^.]*\b{color} {shape}s\b", caption), caption
    openings = {
        caption_scene(s, np.random.default_rng(k)).split(" ")[1] for k, s in enumerate(scenes(None, 60))
    }
    assert len(openings) >= 5  # several templates in use


def _relation_pattern(a: str, words: str, b: str) -> re.Pattern[str]:
    """ "<a> is <words> <b>" or "<Words> <b> is <a>", allowing a size word before either noun."""
    size = r"(?:[\w-]+ )?"
    return re.compile(
        rf"(?i)\bthe {size}{a} (?:is|has been placed|appears) (?:{words}) the {size}{b}\b"
        rf"|\b(?:{words}) the {size}{b} is the {size}{a}\b"
    )


def test_captions_state_the_relation_either_way_round() -> None:
    scene = ToyScene(
        "white",
        (ToyObject("circle", "red", "medium", 0.25, 0.5), ToyObject("triangle", "green", "small", 0.75, 0.5)),
        (0, "left of", 1),
    )
    left_words, right_words = (
        "to the left of|left of|on the left side of",
        "to the right of|right of|on the right side of",
    )
    direct = _relation_pattern("red circle", left_words, "green triangle")
    inverse = _relation_pattern("green triangle", right_words, "red circle")
    wrong = [
        _relation_pattern("red circle", right_words, "green triangle"),
        _relation_pattern("green triangle", left_words, "red circle"),
    ]
    captions = [caption_scene(scene, np.random.default_rng(k)) for k in range(60)]
    assert all(direct.search(c) or inverse.search(c) for c in captions)
    assert any(direct.search(c) for c in captions) and any(inverse.search(c) for c in captions)
    assert not any(p.search(c) for p in wrong for c in captions)


def test_short_prompts_are_geneval_style() -> None:
    def obj(shape: str, color: str, cx: float) -> ToyObject:
        return ToyObject(shape, color, "small", cx, 0.5)

    two_blue = ToyScene("white", (obj("square", "blue", 0.2), obj("square", "blue", 0.7)), None)
    assert short_prompt(two_blue) == "a photo of two blue squares"
    left = ToyScene("white", (obj("circle", "red", 0.2), obj("triangle", "green", 0.7)), (0, "left of", 1))
    assert short_prompt(left) == "a photo of a red circle to the left of a green triangle"
    assert (
        short_prompt(ToyScene("gray", (obj("square", "orange", 0.5),), None)) == "a photo of an orange square"
    )
    pair = ToyScene("white", (obj("circle", "red", 0.2), obj("triangle", "green", 0.7)), None)
    assert short_prompt(pair) == "a photo of a red circle and a green triangle"


def test_prompt_set_is_deterministic_balanced_and_json() -> None:
    prompts = make_prompt_set(63, seed=11)
    assert prompts == make_prompt_set(63, seed=11)
    assert make_prompt_set(20, seed=11) == prompts[:20]  # a longer set extends a shorter one
    assert make_prompt_set(20, seed=12) != prompts[:20]
    counts = Counter(p["kind"] for p in prompts)
    assert set(counts) == set(KINDS) and max(counts.values()) - min(counts.values()) <= 1
    restored = json.loads(json.dumps(prompts))
    for entry in restored:
        assert set(entry) == {"prompt", "kind", "scene"}
        scene = scene_from_dict(entry["scene"])
        assert scene_to_dict(scene) == entry["scene"]
        assert short_prompt(scene) == entry["prompt"]
    assert all(
        not {(o.color, o.shape) for o in scene_from_dict(p["scene"]).objects} & heldout_combinations()
        for p in make_prompt_set(30, seed=0, split="train")
    )
