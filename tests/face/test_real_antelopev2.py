"""The published antelopev2 models, when INSTANTID_INSIGHTFACE_ROOT points at an insightface root
(the folder holding models/antelopev2, e.g. ComfyUI's models/insightface) or at antelopev2 itself."""

from __future__ import annotations

import os

import numpy as np
import pytest

from instantid.face import NoFaceDetectedError, analyze_face, face_embeddings, load_face_analysis

ROOT = os.environ.get("INSTANTID_INSIGHTFACE_ROOT")
pytestmark = pytest.mark.skipif(not ROOT, reason="INSTANTID_INSIGHTFACE_ROOT is not set")


def test_real_models_find_the_faces(group_photo: np.ndarray, portrait: np.ndarray) -> None:
    app = load_face_analysis(ROOT)  # type: ignore[arg-type]
    faces = app.get(np.ascontiguousarray(group_photo[..., ::-1]))
    assert len(faces) >= 5  # t1.jpg shows six people
    largest = analyze_face(app, group_photo)
    areas = [(f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]) for f in faces]
    np.testing.assert_allclose(largest.bbox, faces[int(np.argmax(areas))].bbox, atol=1e-3)
    x1, y1, x2, y2 = largest.bbox
    assert np.all((largest.kps[:, 0] > x1) & (largest.kps[:, 0] < x2))
    assert np.all((largest.kps[:, 1] > y1) & (largest.kps[:, 1] < y2))
    # The same person twice is closer than two people.
    # The 112x112 aligned crop, framed by a grey border so the face does not fill the whole image.
    framed = np.pad(portrait, ((112, 112), (112, 112), (0, 0)), constant_values=127)
    tom = analyze_face(app, framed)
    tom_again = analyze_face(app, np.ascontiguousarray(framed[:, ::-1]))  # mirrored
    cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
    assert cos(tom.embedding, tom_again.embedding) > cos(tom.embedding, largest.embedding)
    assert face_embeddings([tom, tom_again]).shape == (1, 512)


def test_real_models_find_no_face_in_a_blank_image() -> None:
    app = load_face_analysis(ROOT)  # type: ignore[arg-type]
    with pytest.raises(NoFaceDetectedError, match="No face detected"):
        analyze_face(app, np.full((256, 256, 3), 127, np.uint8))
