"""draw_kps: the IdentityNet keypoint image (limbs at 60 % to the nose, discs of radius 10, black ground)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from instantid.keypoints import KPS_COLORS, LIMB_INTENSITY, POINT_RADIUS, draw_kps

KPS = np.array([[100.0, 120.0], [180.0, 120.0], [140.0, 170.0], [105.0, 230.0], [175.0, 230.0]])


def pixel(img: Image.Image, x: float, y: float) -> tuple[int, ...]:
    return tuple(int(v) for v in np.asarray(img)[int(y), int(x)])


@pytest.mark.parametrize(
    "size", [(320, 300), Image.new("RGB", (320, 300), "white"), np.full((300, 320, 3), 255, np.uint8)]
)
def test_canvas_takes_the_size_only(size: object) -> None:
    img = draw_kps(size, KPS)  # type: ignore[arg-type]
    assert img.mode == "RGB" and img.size == (320, 300)
    assert pixel(img, 5, 5) == (0, 0, 0)  # black ground, not the white input


def test_points_are_full_colour_discs() -> None:
    img = draw_kps((320, 300), KPS)
    for (x, y), colour in zip(KPS, KPS_COLORS, strict=True):
        assert pixel(img, x, y) == colour
        assert pixel(img, x - (POINT_RADIUS - 1), y) == colour  # inside the radius
    # Outside the nose's disc, away from the limbs: black.
    assert pixel(img, 140 + POINT_RADIUS + 3, 170 + POINT_RADIUS + 3) == (0, 0, 0)


def test_limbs_join_outer_points_to_the_nose_at_60_percent() -> None:
    img = draw_kps((320, 300), KPS)
    nose = KPS[2]
    for index in (0, 1, 3, 4):
        middle = (KPS[index] + nose) / 2
        expected = tuple(int(c * LIMB_INTENSITY) for c in KPS_COLORS[index])
        assert pixel(img, *middle) == expected
    # The limb is about 8 pixels wide: 6 pixels off the eye-nose line is black.
    left_eye_mid = (KPS[0] + nose) / 2
    direction = (nose - KPS[0]) / np.linalg.norm(nose - KPS[0])
    normal = np.array([-direction[1], direction[0]])
    assert pixel(img, *(left_eye_mid + 3 * normal)) != (0, 0, 0)
    assert pixel(img, *(left_eye_mid + 6 * normal)) == (0, 0, 0)
    # No limb between the two eyes.
    assert pixel(img, 140, 120) == (0, 0, 0)


def test_custom_colours() -> None:
    colours = [(10, 20, 30)] * 5
    img = draw_kps((320, 300), KPS, colours)
    assert pixel(img, *KPS[0]) == (10, 20, 30)
    assert pixel(img, *((KPS[0] + KPS[2]) / 2)) == (6, 12, 18)


@given(
    st.lists(st.tuples(st.integers(0, 255), st.integers(0, 255)), min_size=5, max_size=5).filter(
        lambda pts: (
            min(np.hypot(a[0] - b[0], a[1] - b[1]) for i, a in enumerate(pts) for b in pts[i + 1 :])
            > 2 * POINT_RADIUS + 1
        )
    )
)
def test_only_point_and_limb_colours_appear(points: list[tuple[int, int]]) -> None:
    img = np.asarray(draw_kps((256, 256), np.array(points, dtype=float)))
    allowed = {(0, 0, 0), *KPS_COLORS, *(tuple(int(c * LIMB_INTENSITY) for c in col) for col in KPS_COLORS)}
    codes = np.unique(img.astype(np.int64) @ np.array([1 << 16, 1 << 8, 1]))
    assert {(int(c) >> 16, (int(c) >> 8) & 255, int(c) & 255) for c in codes} <= allowed
    for (x, y), colour in zip(points, KPS_COLORS, strict=True):
        assert tuple(img[y, x]) == colour


@pytest.mark.parametrize(
    ("kps", "colours", "size", "message"),
    [
        (KPS[:4], KPS_COLORS, (64, 64), r"expected 5 keypoints as a \[5, 2\] array"),
        (np.full((5, 2), np.nan), KPS_COLORS, (64, 64), "NaN"),
        (KPS, KPS_COLORS[:3], (64, 64), "5 RGB colours"),
        (KPS, KPS_COLORS, (0, 64), "empty canvas of 0x64"),
    ],
)
def test_bad_input_is_refused(kps: np.ndarray, colours: list, size: tuple[int, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        draw_kps(size, kps, colours)
