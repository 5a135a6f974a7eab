"""Combining embeddings across images, and the errors on NaN or all-zero embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from instantid.face import FaceResult, analyze_face, face_embeddings, load_face_analysis
from instantid.testing.face_models import build_antelopev2_like, paste_face_tag


def result(embedding: np.ndarray) -> FaceResult:
    return FaceResult(
        embedding=embedding,
        kps=np.zeros((5, 2), np.float32),
        bbox=np.zeros(4, np.float32),
        det_score=0.9,
        det_size=640,
    )


embedding_batches = arrays(
    np.float32,
    st.tuples(st.integers(2, 5), st.just(512)),
    elements=st.floats(0.125, 30, width=32) | st.floats(-30, -0.125, width=32),
)


@given(embedding_batches)
def test_average_is_the_mean(embeds: np.ndarray) -> None:
    out = face_embeddings([result(e) for e in embeds], "average")
    assert out.shape == (1, 512) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy()[0], embeds.astype(np.float64).mean(axis=0), rtol=1e-5, atol=1e-4)


@given(embedding_batches)
def test_norm_average_normalises_each_feature_across_images(embeds: np.ndarray) -> None:
    out = face_embeddings([result(e) for e in embeds], "norm average")
    e = embeds.astype(np.float64)
    expected = (e / np.sqrt((e**2).sum(axis=0, keepdims=True))).mean(axis=0)
    np.testing.assert_allclose(out.numpy()[0], expected, rtol=1e-4, atol=1e-6)


@given(embedding_batches)
def test_concat_keeps_every_embedding(embeds: np.ndarray) -> None:
    results = [result(e) for e in embeds]
    out = face_embeddings(results, "concat")
    np.testing.assert_array_equal(out.numpy(), embeds)
    out.zero_()  # a new tensor: the results are untouched
    assert np.any(results[0].embedding)


@pytest.mark.parametrize("mode", ["average", "norm average", "concat"])
def test_one_embedding_passes_unchanged(mode: str) -> None:
    embedding = np.linspace(-3, 5, 512, dtype=np.float32)
    out = face_embeddings([result(embedding)], mode)  # type: ignore[arg-type]
    np.testing.assert_array_equal(out.numpy(), embedding[None])


@pytest.mark.parametrize(
    ("embedding", "message"),
    [
        (np.full(512, np.nan, np.float32), "face embedding 1 contains NaN"),
        (np.zeros(512, np.float32), "face embedding 1 is all zero"),
        (np.ones(128, np.float32), r"expected shape \(512,\), got \(128,\)"),
    ],
)
def test_bad_embeddings_are_refused(embedding: np.ndarray, message: str) -> None:
    good = np.ones(512, np.float32)
    with pytest.raises(ValueError, match=message):
        face_embeddings([result(good), result(embedding)])


def test_unknown_mode_and_empty_list_are_refused() -> None:
    with pytest.raises(
        ValueError, match="combine must be one of 'average', 'norm average', 'concat', got 'sum'"
    ):
        face_embeddings([result(np.ones(512, np.float32))], "sum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no face results"):
        face_embeddings([])


@pytest.mark.parametrize(("kind", "message"), [("zeros", "is all zero"), ("nan", "contains NaN")])
def test_broken_recognizer_is_reported(
    kind: str, message: str, tmp_path: Path, group_photo: np.ndarray
) -> None:
    app = load_face_analysis(build_antelopev2_like(tmp_path, recognizer=kind))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=f"face embedding 0 {message}"):
        analyze_face(app, paste_face_tag(group_photo, (640, 384), 80))
