"""ComfyUI IMAGE batches through ``instantid.face``: face embeddings and keypoint images.

An IMAGE is a float tensor ``[B, H, W, 3]`` in 0..1, RGB. ``insightface`` may be this pack's own
FACEANALYSIS or any object with insightface's ``FaceAnalysis`` interface (other packs pass theirs).
Like ComfyUI_InstantID, images without a face are skipped; only a batch without any face fails.
Each image's face analysis goes through ``instantid.cache``'s ``faces`` layer (keyed by its pixels),
so the keypoints and the embedding of one image cost one analysis, and a re-run none.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import Tensor

from instantid.cache import caches
from instantid.comfy.errors import InstantIDNodeError
from instantid.face import (
    CombineMode,
    FaceResult,
    NoFaceDetectedError,
    analyze_faces,
    face_embeddings,
    image_label,
)
from instantid.keypoints import draw_kps

logger = logging.getLogger(__name__)


def image_arrays(image: Tensor, source: str = "image") -> list[np.ndarray]:
    """A ComfyUI IMAGE ``[B, H, W, 3]`` (or one ``[H, W, 3]``) as ``HxWx3`` uint8 RGB arrays.

    Raises ``InstantIDNodeError`` naming the node input ``source`` for a tensor of another shape.
    """
    batch = image.unsqueeze(0) if image.dim() == 3 else image
    if batch.dim() != 4 or batch.shape[-1] != 3 or 0 in batch.shape:
        raise InstantIDNodeError(
            f"input `{source}` has shape {tuple(image.shape)}; expected a non-empty IMAGE of shape [B, H, W, 3]"
        )
    image = batch
    pixels = image.detach().float().mul(255).clamp(0, 255).to(torch.uint8).cpu().numpy()
    return list(pixels)


def embeddings(
    insightface: Any, image: Tensor, combine: CombineMode = "average", source: str = "image"
) -> Tensor:
    """The face embedding(s) of the faces found in ``image``, combined across the batch (``[1, 512]``;
    ``[N, 512]`` for ``"concat"``). Raises ``NoFaceDetectedError`` ("No face detected in input `image`
    ...", naming the node input ``source``) when no image holds a face."""
    faces = analyze_faces(
        insightface,
        image_arrays(image, source),
        skip_missing=True,
        source=source,
        analyze=caches().analyze_face,
    )
    return face_embeddings(faces, combine)


def _keypoint_image(array: np.ndarray, face: FaceResult) -> Tensor:
    drawn = np.asarray(draw_kps(array, face.kps), dtype=np.float32) / 255.0
    return torch.from_numpy(drawn)


def keypoint_images(insightface: Any, image: Tensor, source: str = "image") -> Tensor | None:
    """The 5-point keypoint image of the largest face of each image that has one, as an IMAGE
    ``[N, H, W, 3]``, or ``None`` when no image has a face. Each image without a face is logged as a
    warning naming the node input ``source`` and the image ("No face detected in input `image_kps`,
    image 2 of 3 ...")."""
    arrays = image_arrays(image, source)
    drawn = []
    for index, array in enumerate(arrays):
        label = image_label(index, len(arrays), source)
        try:
            face = caches().analyze_face(insightface, array, index=index, label=label)
            drawn.append(_keypoint_image(array, face))
        except NoFaceDetectedError as error:
            logger.warning("%s; no keypoints drawn for it", error)
    return torch.stack(drawn) if drawn else None
