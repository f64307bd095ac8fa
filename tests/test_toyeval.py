"""Tests of ToyEval: near-perfect on true renders, robust to model-like blur and noise, and able to fail."""

from __future__ import annotations

from collections import deque
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from training.toy_scenes import (
    ALLOWED_COLORS,
    BACKGROUND_COLORS,
    KINDS,
    ToyObject,
    ToyScene,
    make_prompt_set,
    render_scene,
    scene_from_dict,
)
from training.toyeval import (
    UNKNOWN_SHAPE,
    detect_objects,
    evaluate,
    format_table,
    label_components,
    score_image,
)

CANVASES = [(256, 256), (320, 192), (192, 320), (384, 128)]


def flood_fill_labels(mask: np.ndarray) -> np.ndarray:
    """Reference 8-connected labelling by breadth-first search."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    n = 0
    for start in zip(*np.nonzero(mask), strict=True):
        if labels[start]:
            continue
        n += 1
        labels[start] = n
        queue = deque([start])
        while queue:
            y, x = queue.popleft()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    q = (y + dy, x + dx)
                    if 0 <= q[0] < mask.shape[0] and 0 <= q[1] < mask.shape[1] and mask[q] and not labels[q]:
                        labels[q] = n
                        queue.append(q)
    return labels


@pytest.mark.parametrize("density", [0.0, 0.3, 0.45, 0.6, 1.0])
def test_label_components_matches_flood_fill(density: float) -> None:
    mask = np.random.default_rng(int(density * 10)).random((37, 53)) < density
    labels, n = label_components(mask)
    expected = flood_fill_labels(mask)
    assert n == expected.max()
    # both number components in raster order of their first pixel, so the labelings are identical
    assert np.array_equal(labels, expected)


def test_detects_exact_attributes_on_a_clean_render() -> None:
    scene = ToyScene(
        "beige",
        (
            ToyObject("circle", "red", "large", 0.25, 0.3),
            ToyObject("square", "blue", "small", 0.75, 0.3),
            ToyObject("triangle", "green", "medium", 0.5, 0.75),
        ),
        None,
    )
    detections = detect_objects(render_scene(scene, 320, 192))
    found = sorted((d.shape, d.color, d.size, round(d.cx, 2), round(d.cy, 2)) for d in detections)
    assert found == [
        ("circle", "red", "large", 0.25, 0.3),
        ("square", "blue", "small", 0.75, 0.3),
        ("triangle", "green", "medium", 0.5, 0.75),
    ]


def test_array_inputs_match_pil_input() -> None:
    scene = scene_from_dict(make_prompt_set(5, seed=1)[4]["scene"])
    image = render_scene(scene, 256, 256)
    as_uint8 = np.asarray(image)
    assert detect_objects(image) == detect_objects(as_uint8) == detect_objects(as_uint8 / 255.0)
    with pytest.raises(ValueError, match="HxWx3"):
        detect_objects(as_uint8[..., 0])


def blur_and_noise(image: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """What a generative model adds: soft edges and pixel noise."""
    soft = np.asarray(image.filter(ImageFilter.GaussianBlur(1.5)), dtype=np.float32)
    return np.clip(soft + rng.normal(0.0, 12.0, soft.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def specs() -> list[dict]:
    """192 prompts, all six kinds, held-out and training pairs."""
    return make_prompt_set(96, seed=0, split="heldout") + make_prompt_set(96, seed=1, split="train")


@pytest.fixture(scope="module")
def renders(specs: list[dict]) -> list[Image.Image]:
    return [
        render_scene(scene_from_dict(s["scene"]), *CANVASES[k % len(CANVASES)]) for k, s in enumerate(specs)
    ]


def test_scores_clean_renders_as_correct(specs: list[dict], renders: list[Image.Image]) -> None:
    result = evaluate(renders, specs)
    print("\nclean renders\n" + format_table(result))
    assert set(result["accuracy"]) == set(KINDS)
    assert min(result["accuracy"].values()) >= 0.98


def test_scores_blurred_noisy_renders_as_correct(specs: list[dict], renders: list[Image.Image]) -> None:
    rng = np.random.default_rng(0)
    result = evaluate([blur_and_noise(r, rng) for r in renders], specs)
    print("\nblurred + noisy renders\n" + format_table(result))
    assert min(result["accuracy"].values()) >= 0.9


def first_of(specs: list[dict], kind: str) -> tuple[dict, ToyScene]:
    spec = next(s for s in specs if s["kind"] == kind)
    return spec, scene_from_dict(spec["scene"])


def other_color(scene: ToyScene, avoid: set[str]) -> str:
    return next(c for c in ALLOWED_COLORS[scene.background] if c not in avoid)


def test_wrong_colour_fails(specs: list[dict]) -> None:
    spec, scene = first_of(specs, "colors")
    obj = scene.objects[0]
    wrong = replace(scene, objects=(replace(obj, color=other_color(scene, {obj.color})),))
    assert score_image(render_scene(scene, 256, 256), spec)["correct"]
    assert not score_image(render_scene(wrong, 256, 256), spec)["correct"]


def test_swapped_colours_fail_binding(specs: list[dict]) -> None:
    spec, scene = first_of(specs, "color_binding")
    a, b = scene.objects
    swapped = replace(scene, objects=(replace(a, color=b.color), replace(b, color=a.color)))
    result = score_image(render_scene(swapped, 256, 256), spec)
    assert not result["correct"]
    assert not any(v for k, v in result.items() if k != "correct")


def test_wrong_count_fails(specs: list[dict]) -> None:
    spec, scene = first_of(specs, "counting")
    assert score_image(render_scene(scene, 256, 256), spec)["correct"]
    one_fewer = replace(scene, objects=scene.objects[1:])
    assert not score_image(render_scene(one_fewer, 256, 256), spec)["correct"]
    first = scene.objects[0]
    recoloured = replace(
        scene, objects=(replace(first, color=other_color(scene, {first.color})), *scene.objects[1:])
    )
    assert not score_image(render_scene(recoloured, 256, 256), spec)["correct"]


def test_swapped_positions_fail(specs: list[dict]) -> None:
    for spec in [s for s in specs if s["kind"] == "position"][:8]:
        scene = scene_from_dict(spec["scene"])
        a, b = scene.objects
        swapped = replace(scene, objects=(replace(a, cx=b.cx, cy=b.cy), replace(b, cx=a.cx, cy=a.cy)))
        result = score_image(render_scene(swapped, 320, 192), spec)
        assert not result["correct"]
        assert sum(result.values()) == 2  # both shapes still found; only the relation is wrong


def test_wrong_or_missing_shape_fails(specs: list[dict]) -> None:
    spec, scene = first_of(specs, "single")
    obj = scene.objects[0]
    other = next(s for s in ("circle", "square", "triangle") if s != obj.shape)
    assert not score_image(
        render_scene(replace(scene, objects=(replace(obj, shape=other),)), 256, 256), spec
    )["correct"]
    spec, scene = first_of(specs, "two")
    assert not score_image(render_scene(replace(scene, objects=scene.objects[:1]), 256, 256), spec)["correct"]


@pytest.mark.parametrize("kind", KINDS)
def test_blank_image_fails_every_kind(specs: list[dict], kind: str) -> None:
    spec, scene = first_of(specs, kind)
    blank = Image.new("RGB", (256, 256), BACKGROUND_COLORS[scene.background])
    noisy_blank = blur_and_noise(blank, np.random.default_rng(1))
    assert detect_objects(blank) == [] and detect_objects(noisy_blank) == []
    assert not score_image(blank, spec)["correct"]
    assert not score_image(noisy_blank, spec)["correct"]


def test_stretched_blob_is_no_shape() -> None:
    image = Image.new("RGB", (256, 256), BACKGROUND_COLORS["white"])
    ImageDraw.Draw(image).ellipse((40, 100, 200, 150), fill=(220, 30, 30))
    (detection,) = detect_objects(image)
    assert detection.shape == UNKNOWN_SHAPE and detection.color == "red"


def test_evaluate_reports_mean_over_categories(specs: list[dict], renders: list[Image.Image]) -> None:
    chosen = [k for k, s in enumerate(specs) if s["kind"] in ("single", "counting")][:9]
    blank = Image.new("RGB", (64, 64), (250, 250, 250))
    images = [blank if specs[k]["kind"] == "counting" else renders[k] for k in chosen]
    result = evaluate(images, [specs[k] for k in chosen])
    assert result["accuracy"] == {"single": 1.0, "counting": 0.0}
    assert result["overall"] == 0.5 and result["n"] == 9
    table = format_table(result)
    assert "single" in table and "counting" in table and "overall" in table and "0.500" in table
    with pytest.raises(ValueError):
        evaluate(images[:2], [specs[k] for k in chosen])
