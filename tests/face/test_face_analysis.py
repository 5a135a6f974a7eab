"""Face analysis on the real insightface + onnxruntime path, with small models (instantid.testing.face_models) that
detect green "face tags" pasted on the photos insightface ships."""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from insightface.model_zoo.arcface_onnx import ArcFaceONNX
from insightface.model_zoo.scrfd import SCRFD
from insightface.utils import face_align
from onnx import numpy_helper

from instantid.face import (
    DETECTION_SIZES,
    FaceResult,
    NoFaceDetectedError,
    analyze_face,
    analyze_faces,
    load_face_analysis,
)
from instantid.testing.face_models import (
    DETECTOR_FILE,
    FACE_PER_TAG,
    RECOGNIZER_FILE,
    build_detector,
    largest_detectable_tag,
    paste_face_tag,
)

# t1.jpg is 1280 wide: at detection size D it is scaled by D / 1280, so at 640 a stride-32 anchor falls
# every 64 image pixels. Tags are centred on anchors.
FACE_CENTRE = (640, 384)


def recognizer_oracle(root: Path, rgb: np.ndarray, kps: np.ndarray) -> np.ndarray:
    """The small recognizer's embedding recomputed in numpy from the crop aligned on ``kps``."""
    model = onnx.load(str(root / "models" / "antelopev2" / RECOGNIZER_FILE))
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    crop = face_align.norm_crop(np.ascontiguousarray(rgb[..., ::-1]), landmark=kps, image_size=112)
    x = (crop[..., ::-1].astype(np.float32) - 127.5) / 127.5  # back to RGB, ArcFace normalisation
    pooled = x.reshape(8, 14, 8, 14, 3).mean(axis=(1, 3)).transpose(2, 0, 1).reshape(-1)
    return pooled @ weights["proj_weight"] + weights["proj_bias"]


def test_loads_the_real_insightface_models_on_cpu(face_app: Any) -> None:
    assert isinstance(face_app.det_model, SCRFD)
    assert isinstance(face_app.models["recognition"], ArcFaceONNX)
    assert set(face_app.models) == {"detection", "recognition"}
    assert face_app.det_model.session.get_providers() == ["CPUExecutionProvider"]
    assert face_app.det_model.input_size == (640, 640)


def test_one_detection_gives_box_keypoints_and_embedding(
    face_app: Any, antelope_root: Path, group_photo: np.ndarray
) -> None:
    tag = 80
    image = paste_face_tag(group_photo, FACE_CENTRE, tag)
    result = analyze_face(face_app, image)

    assert isinstance(result, FaceResult)
    assert result.det_size == 640
    side = FACE_PER_TAG * tag
    x, y = FACE_CENTRE
    np.testing.assert_allclose(
        result.bbox, [x - side / 2, y - side / 2, x + side / 2, y + side / 2], atol=1.0
    )
    assert result.kps.shape == (5, 2) and result.kps.dtype == np.float32
    x1, y1, x2, y2 = result.bbox
    assert np.all(
        (result.kps[:, 0] > x1) & (result.kps[:, 0] < x2) & (result.kps[:, 1] > y1) & (result.kps[:, 1] < y2)
    )
    assert result.kps[0, 0] < result.kps[2, 0] < result.kps[1, 0]  # left eye, nose, right eye
    assert result.embedding.shape == (512,) and result.embedding.dtype == np.float32
    # The embedding is the recognizer's on the crop aligned on these very keypoints.
    np.testing.assert_allclose(
        result.embedding, recognizer_oracle(antelope_root, image, result.kps), rtol=1e-4, atol=1e-4
    )
    assert 0.5 < result.det_score <= 1.0


def test_takes_the_largest_face(face_app: Any, group_photo: np.ndarray) -> None:
    image = paste_face_tag(group_photo, (256, 256), 40)  # box 120 px
    image = paste_face_tag(image, FACE_CENTRE, 80)  # box 240 px
    image = paste_face_tag(image, (1024, 640), 40)
    assert len(face_app.get(np.ascontiguousarray(image[..., ::-1]))) == 3
    result = analyze_face(face_app, image)
    centre = (result.bbox[:2] + result.bbox[2:]) / 2
    np.testing.assert_allclose(centre, FACE_CENTRE, atol=1.0)
    assert result.bbox[2] - result.bbox[0] == pytest.approx(240, abs=1.0)


def test_large_face_found_at_a_smaller_detection_size(
    face_app: Any, group_photo: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    # A 240 px tag on the 1280 px wide photo is 120 detector pixels at 640, too big for the detector;
    # at 384 it is 72, still too big; at 320 it is 60.
    limit = largest_detectable_tag()
    assert 240 * 384 / 1280 > limit >= 240 * 320 / 1280
    image = paste_face_tag(group_photo, FACE_CENTRE, 240)
    with caplog.at_level(logging.INFO, logger="instantid.face"):
        result = analyze_face(face_app, image)
    assert result.det_size == 320
    assert "found at detection size 320" in caplog.text
    np.testing.assert_allclose(result.bbox[2] - result.bbox[0], 720, atol=2.0)
    # The detector is left at the size it had.
    assert face_app.det_model.input_size == (640, 640)
    assert analyze_face(face_app, paste_face_tag(group_photo, FACE_CENTRE, 80)).det_size == 640


def test_detection_sizes_are_640_down_to_192() -> None:
    assert DETECTION_SIZES == (640, 576, 512, 448, 384, 320, 256, 192)


@pytest.mark.parametrize("photo", ["group_photo", "portrait"])
def test_no_face(face_app: Any, photo: str, request: pytest.FixtureRequest) -> None:
    image = request.getfixturevalue(photo)
    with pytest.raises(NoFaceDetectedError, match="No face detected in image 0") as info:
        analyze_face(face_app, image)
    assert "640 down to 192" in str(info.value)
    assert face_app.det_model.input_size == (640, 640)


def test_embedding_depends_on_the_face(face_app: Any, group_photo: np.ndarray) -> None:
    first = analyze_face(face_app, paste_face_tag(group_photo, FACE_CENTRE, 80))
    moved = analyze_face(face_app, paste_face_tag(group_photo, (384, 384), 80))
    same = analyze_face(face_app, paste_face_tag(group_photo, FACE_CENTRE, 80))
    np.testing.assert_array_equal(first.embedding, same.embedding)
    assert np.linalg.norm(first.embedding - moved.embedding) > 0.1 * np.linalg.norm(first.embedding)


def test_batch_keeps_order_and_skips_only_when_asked(
    face_app: Any, group_photo: np.ndarray, portrait: np.ndarray
) -> None:
    a = paste_face_tag(group_photo, FACE_CENTRE, 80)
    b = paste_face_tag(group_photo, (384, 384), 80)
    results = analyze_faces(face_app, [a, portrait, b], skip_missing=True)
    assert [r.bbox[0] for r in results] == pytest.approx([520, 264], abs=1.0)
    with pytest.raises(NoFaceDetectedError, match="No face detected in image 1"):
        analyze_faces(face_app, [a, portrait, b])
    with pytest.raises(
        NoFaceDetectedError, match=r"^No face detected in image 0 \(112x112\) at detection sizes"
    ):
        analyze_faces(face_app, [portrait], skip_missing=True)
    stacked = analyze_faces(face_app, np.stack([a, b]))
    np.testing.assert_array_equal(stacked[1].embedding, results[1].embedding)


def test_messages_name_the_input_and_the_image(
    face_app: Any, group_photo: np.ndarray, portrait: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    """The ComfyUI nodes pass the input's name: a user can tell which input and which image of a batch."""
    a = paste_face_tag(group_photo, FACE_CENTRE, 80)
    with pytest.raises(NoFaceDetectedError) as info:
        analyze_faces(face_app, [a, portrait, a], source="image")
    assert str(info.value) == (
        "No face detected in input `image`, image 2 of 3 (112x112) at detection sizes 640 down to 192"
    )
    with caplog.at_level(logging.WARNING):
        assert len(analyze_faces(face_app, [a, portrait], source="image_kps", skip_missing=True)) == 1
    assert [r.getMessage() for r in caplog.records] == [
        "No face detected in input `image_kps`, image 2 of 2 (112x112) at detection sizes 640 down to 192; "
        "image skipped"
    ]
    with pytest.raises(NoFaceDetectedError) as info:
        analyze_faces(face_app, [portrait], source="image", skip_missing=True)
    assert str(info.value) == "No face detected in input `image` (112x112) at detection sizes 640 down to 192"
    with pytest.raises(NoFaceDetectedError) as info:
        analyze_faces(face_app, [portrait, portrait], source="image", skip_missing=True)
    assert str(info.value) == (
        "No face detected in any of the 2 images of input `image` (detection sizes 640 down to 192)"
    )
    with pytest.raises(ValueError, match=r"^input `image`, image 2 of 2: expected dtype uint8"):
        analyze_faces(face_app, [a, portrait.astype(np.float32)], source="image")


def test_insightface_deprecation_warnings_are_silenced_at_the_call_only(
    face_app: Any, group_photo: np.ndarray
) -> None:
    """insightface 2.1 raises a FutureWarning (scikit-image's deprecated ``estimate``) on every detection."""
    with warnings.catch_warnings(record=True) as raised:
        warnings.simplefilter("always")
        filters = list(warnings.filters)
        analyze_face(face_app, paste_face_tag(group_photo, FACE_CENTRE, 80))
        assert warnings.filters == filters  # nothing changed globally
        warnings.warn("after the call", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in raised] == ["after the call"]


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((0, 64, 3), np.uint8), "image 0 is empty"),
        (np.zeros((64, 64), np.uint8), r"expected an HxWx3 RGB image, got shape \(64, 64\)"),
        (np.zeros((64, 64, 1), np.uint8), "expected an HxWx3 RGB image"),
        (np.zeros((64, 64, 4), np.uint8), r"got shape \(64, 64, 4\) \(convert grayscale or RGBA"),
        (np.zeros((64, 64, 3), np.float32), "expected dtype uint8 .* got float32"),
        (np.zeros((64, 64, 3), np.uint16), "expected dtype uint8"),
    ],
)
def test_bad_images_are_refused(face_app: Any, image: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        analyze_face(face_app, image)


def test_not_an_array_and_empty_batch_are_refused(face_app: Any) -> None:
    with pytest.raises(TypeError, match="expected an HxWx3 uint8 RGB numpy array, got list"):
        analyze_face(face_app, [[0, 0, 0]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no images given"):
        analyze_faces(face_app, [])


def test_detector_without_keypoints_is_refused(tmp_path: Path, antelope_root: Path) -> None:
    folder = tmp_path / "models" / "antelopev2"
    shutil.copytree(antelope_root / "models" / "antelopev2", folder)
    onnx.save(build_detector(keypoints=False), str(folder / DETECTOR_FILE))
    with pytest.raises(RuntimeError, match=r"gives no keypoints .* expected scrfd_10g_bnkps\.onnx"):
        load_face_analysis(tmp_path)


def test_face_analysis_without_recognizer_is_refused(antelope_root: Path, group_photo: np.ndarray) -> None:
    from insightface.app import FaceAnalysis

    app = FaceAnalysis(
        name=str(antelope_root / "models" / "antelopev2"),
        allowed_modules=["detection"],
        providers=["CPUExecutionProvider"],
    )
    app.prepare(ctx_id=0, det_size=(640, 640))
    with pytest.raises(ValueError, match="returned no embedding"):
        analyze_face(app, paste_face_tag(group_photo, FACE_CENTRE, 80))


def test_retry_changes_the_size_where_the_attribute_alone_does_not(
    face_app: Any, group_photo: np.ndarray
) -> None:
    """The stock pack retries by assigning ``det_model.input_size``; insightface 2.x detects at
    ``det_model.input_sizes`` instead, so that assignment alone never finds a large face there."""
    if not hasattr(face_app.det_model, "input_sizes"):
        pytest.skip("insightface < 2: input_size is the detection size")
    image = paste_face_tag(group_photo, FACE_CENTRE, 240)
    bgr = np.ascontiguousarray(image[..., ::-1])
    try:
        face_app.det_model.input_size = (320, 320)
        assert face_app.get(bgr) == []
    finally:
        face_app.det_model.input_size = (640, 640)
    assert analyze_face(face_app, image).det_size == 320
