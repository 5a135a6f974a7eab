"""Test images: the photos insightface ships, with face tags the small test detector finds.

``load_photo(name)`` reads one of insightface's package photos (``t1.jpg``: 1280 x 886, a group)
as an HxWx3 uint8 RGB array. ``tagged_crop(left, top)`` cuts a square from ``t1.jpg`` with a face
tag (``instantid.testing.face_models.paste_face_tag``) in its centre: one face for the detector of
``instantid.testing.face_models``; ``faceless_crop()`` cuts one without a tag, where it finds none.
``to_comfy_image`` turns arrays into a ComfyUI IMAGE tensor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from instantid.testing.face_models import paste_face_tag


def photos_folder() -> Path:
    """The folder of photos in insightface's package data."""
    import insightface

    return Path(insightface.__file__).parent / "data" / "images"


def load_photo(name: str = "t1.jpg") -> np.ndarray:
    """An HxWx3 uint8 RGB photo from insightface's package data; ``FileNotFoundError`` if it cannot be read."""
    import cv2

    path = photos_folder() / name
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(f"cannot read {path}")
    return np.ascontiguousarray(bgr[..., ::-1])


def tagged_crop(left: int, top: int, size: int = 320, tag: int = 24) -> np.ndarray:
    """A ``size`` x ``size`` RGB crop of ``t1.jpg`` at ``(left, top)`` with a face tag of side ``tag`` in its centre."""
    crop = np.ascontiguousarray(load_photo()[top : top + size, left : left + size])
    return paste_face_tag(crop, (size // 2, size // 2), tag)


def faceless_crop(size: int = 320) -> np.ndarray:
    """The top-left ``size`` x ``size`` RGB crop of ``t1.jpg``, without a tag: the test detector finds no face."""
    return np.ascontiguousarray(load_photo()[:size, :size])


def to_comfy_image(*images: np.ndarray) -> Any:
    """A ComfyUI IMAGE (float ``[B, H, W, 3]`` in 0..1) of equally sized uint8 RGB arrays."""
    import torch

    return torch.from_numpy(np.stack(images).astype(np.float32) / 255.0)
