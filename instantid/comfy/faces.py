"""ComfyUI IMAGE batches through ``instantid.face``: face embeddings and keypoint images.

An IMAGE is a float tensor ``[B, H, W, 3]`` in 0..1, RGB. ``insightface`` may be this pack's own
FACEANALYSIS or any object with insightface's ``FaceAnalysis`` interface (other packs pass theirs).
Like ComfyUI_InstantID, images without a face are skipped; only a batch without any face fails.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import Tensor

from instantid.face import (
    CombineMode,
    FaceResult,
    NoFaceDetectedError,
    analyze_face,
    analyze_faces,
    face_embeddings,
)
from instantid.keypoints import draw_kps

logger = logging.getLogger(__name__)


def image_arrays(image: Tensor) -> list[np.ndarray]:
    """A ComfyUI IMAGE ``[B, H, W, 3]`` (or one ``[H, W, 3]``) as ``HxWx3`` uint8 RGB arrays.

    Raises ``ValueError`` for a tensor of another shape.
    """
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[-1] != 3:
        raise ValueError(f"expected an IMAGE of shape [B, H, W, 3], got {tuple(image.shape)}")
    pixels = image.detach().float().mul(255).clamp(0, 255).to(torch.uint8).cpu().numpy()
    return list(pixels)


def embeddings(insightface: Any, image: Tensor, combine: CombineMode = "average") -> Tensor:
    """The face embedding(s) of the faces found in ``image``, combined across the batch (``[1, 512]``;
    ``[N, 512]`` for ``"concat"``). Raises ``NoFaceDetectedError`` ("No face detected ...") when no
    image holds a face."""
    return face_embeddings(analyze_faces(insightface, image_arrays(image), skip_missing=True), combine)


def _keypoint_image(array: np.ndarray, face: FaceResult) -> Tensor:
    drawn = np.asarray(draw_kps(array, face.kps), dtype=np.float32) / 255.0
    return torch.from_numpy(drawn)


def keypoint_images(insightface: Any, image: Tensor) -> Tensor | None:
    """The 5-point keypoint image of the largest face of each image that has one, as an IMAGE
    ``[N, H, W, 3]``, or ``None`` when no image has a face (logged as a warning)."""
    drawn = []
    for index, array in enumerate(image_arrays(image)):
        try:
            drawn.append(_keypoint_image(array, analyze_face(insightface, array, index=index)))
        except NoFaceDetectedError as error:
            logger.warning("%s; no keypoints drawn for it", error)
    return torch.stack(drawn) if drawn else None
