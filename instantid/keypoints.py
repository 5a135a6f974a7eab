"""The 5-point face keypoint image that InstantID's IdentityNet ControlNet takes as its condition.

On a black canvas of the target size: four limbs, filled ellipses of half-width 4 pixels from each outer
point (eyes, mouth corners) to the nose, in the outer point's colour, at 60 % intensity (the whole limb
layer is scaled by 0.6 and truncated to integers); then five filled discs of radius 10 at the points,
full intensity, drawn over the limbs. Point colours (RGB): red, green, blue, yellow, magenta for left
eye, right eye, nose, left and right mouth corner. Coordinates are truncated to integer pixels, as the
published pipeline does. This is the image the model was trained on, so its look must not change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np
from PIL import Image

KPS_COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (255, 255, 0),
    (255, 0, 255),
)
NOSE = 2
LIMB_HALF_WIDTH = 4
LIMB_INTENSITY = 0.6
POINT_RADIUS = 10

SizeOrImage = tuple[int, int] | Image.Image | np.ndarray


def canvas_size(size_or_image: SizeOrImage) -> tuple[int, int]:
    """(width, height) of a PIL image, of an ``HxW[xC]`` array, or a ``(width, height)`` pair."""
    if isinstance(size_or_image, Image.Image):
        return size_or_image.size
    if isinstance(size_or_image, np.ndarray):
        if size_or_image.ndim not in (2, 3):
            raise ValueError(f"expected an HxW or HxWxC image array, got shape {size_or_image.shape}")
        return int(size_or_image.shape[1]), int(size_or_image.shape[0])
    width, height = size_or_image
    return int(width), int(height)


def draw_kps(
    size_or_image: SizeOrImage,
    kps: np.ndarray | Sequence[Sequence[float]],
    colors: Sequence[tuple[int, int, int]] = KPS_COLORS,
) -> Image.Image:
    """Draw the keypoint condition image for ``kps`` (``[5, 2]`` x, y pixels) at the size of
    ``size_or_image`` (only its size is used; the image is not drawn on). Returns a new RGB PIL image.

    Raises ``ValueError`` when ``kps`` is not five finite points, ``colors`` not five RGB triples, or the
    size is empty.
    """
    width, height = canvas_size(size_or_image)
    if width <= 0 or height <= 0:
        raise ValueError(f"cannot draw keypoints on an empty canvas of {width}x{height}")
    points = np.asarray(kps, dtype=np.float64)
    if points.shape != (5, 2):
        raise ValueError(f"expected 5 keypoints as a [5, 2] array of (x, y), got shape {points.shape}")
    if not np.all(np.isfinite(points)):
        raise ValueError("keypoints contain NaN or infinite values")
    if len(colors) != 5 or any(len(c) != 3 for c in colors):
        raise ValueError("expected 5 RGB colours, one per keypoint")

    limbs = np.zeros((height, width, 3), dtype=np.float64)
    nose = points[NOSE]
    for index, outer in enumerate(points):
        if index == NOSE:
            continue
        dx, dy = outer - nose
        centre = (int((outer[0] + nose[0]) / 2), int((outer[1] + nose[1]) / 2))
        axes = (int(math.hypot(dx, dy) / 2), LIMB_HALF_WIDTH)
        angle = int(math.degrees(math.atan2(dy, dx)))
        polygon = np.asarray(cv2.ellipse2Poly(centre, axes, angle, 0, 360, 1), dtype=np.int32)
        cv2.fillConvexPoly(limbs, polygon, tuple(float(c) for c in colors[index]))
    canvas = (limbs * LIMB_INTENSITY).astype(np.uint8)
    for index, (x, y) in enumerate(points):
        cv2.circle(canvas, (int(x), int(y)), POINT_RADIUS, tuple(int(c) for c in colors[index]), -1)
    return Image.fromarray(canvas)
