"""Loading the antelopev2 folder: missing files are named, nothing is downloaded, providers are mapped."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, NoReturn

import onnx
import onnxruntime
import pytest

from instantid.face import (
    PROVIDERS,
    FaceModelsMissingError,
    antelopev2_dir,
    load_face_analysis,
    onnx_provider,
)
from instantid.testing.face_models import (
    DETECTOR_FILE,
    RECOGNIZER_FILE,
    build_antelopev2_like,
    build_recognizer,
)


@pytest.fixture(autouse=True)
def no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tripwires on insightface's download functions: any call fails the test."""
    import insightface.app.face_analysis
    import insightface.model_zoo.model_zoo
    import insightface.utils.storage

    def refuse(*args: Any, **kwargs: Any) -> NoReturn:
        raise AssertionError(f"insightface tried to download: {args} {kwargs}")

    monkeypatch.setattr(insightface.utils.storage, "download_file", refuse)
    monkeypatch.setattr(insightface.app.face_analysis, "ensure_available", refuse)
    monkeypatch.setattr(insightface.model_zoo.model_zoo, "download_onnx", refuse)


def test_missing_folder_names_it_and_the_files(tmp_path: Path) -> None:
    with pytest.raises(FaceModelsMissingError) as info:
        load_face_analysis(tmp_path)
    message = str(info.value)
    assert str(tmp_path / "models" / "antelopev2") in message
    assert DETECTOR_FILE in message and RECOGNIZER_FILE in message
    assert "nothing is downloaded" in message


def test_one_missing_file_is_named(antelope_root: Path, tmp_path: Path) -> None:
    folder = tmp_path / "models" / "antelopev2"
    folder.mkdir(parents=True)
    shutil.copy(antelope_root / "models" / "antelopev2" / DETECTOR_FILE, folder)
    with pytest.raises(FaceModelsMissingError, match=f"missing {RECOGNIZER_FILE}"):
        load_face_analysis(tmp_path)


def test_zip_extracted_one_level_too_deep_is_pointed_out(antelope_root: Path, tmp_path: Path) -> None:
    shutil.copytree(
        antelope_root / "models" / "antelopev2", tmp_path / "models" / "antelopev2" / "antelopev2"
    )
    with pytest.raises(FaceModelsMissingError, match="move them up one level"):
        load_face_analysis(tmp_path)


def test_root_may_be_the_antelopev2_folder_itself(antelope_root: Path) -> None:
    folder = antelope_root / "models" / "antelopev2"
    assert antelopev2_dir(folder) == folder
    assert antelopev2_dir(antelope_root) == folder
    app = load_face_analysis(folder)
    assert set(app.models) == {"detection", "recognition"}


def test_detection_size_is_applied(antelope_root: Path) -> None:
    app = load_face_analysis(antelope_root, det_size=512)
    assert app.det_model.input_size == (512, 512)


def test_folder_without_a_detector_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "models" / "antelopev2"
    folder.mkdir(parents=True)
    # Both files are recognizers: insightface routes neither as a detector.
    onnx.save(build_recognizer(), str(folder / DETECTOR_FILE))
    onnx.save(build_recognizer(), str(folder / RECOGNIZER_FILE))
    with pytest.raises(RuntimeError, match=f"no SCRFD face detector .* expected {DETECTOR_FILE}"):
        load_face_analysis(tmp_path)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("CPU", "CPUExecutionProvider"),
        ("cpu", "CPUExecutionProvider"),
        ("CUDA", "CUDAExecutionProvider"),
        ("ROCM", "ROCMExecutionProvider"),
        ("CoreML", "CoreMLExecutionProvider"),
        ("DmlExecutionProvider", "DmlExecutionProvider"),
    ],
)
def test_provider_names(name: str, expected: str) -> None:
    assert onnx_provider(name) == expected


def test_unknown_provider_is_refused(antelope_root: Path) -> None:
    with pytest.raises(ValueError, match="unknown face analysis provider 'GPU'; expected one of CPU, CUDA"):
        load_face_analysis(antelope_root, provider="GPU")


def test_unavailable_provider_is_refused(antelope_root: Path) -> None:
    available = set(onnxruntime.get_available_providers())
    missing = next(name for name, ort in PROVIDERS.items() if ort not in available)
    with pytest.raises(ValueError, match=f"{PROVIDERS[missing]}\\) is not available .* available: "):
        load_face_analysis(antelope_root, provider=missing)


@pytest.mark.skipif(
    "CUDAExecutionProvider" not in onnxruntime.get_available_providers(), reason="onnxruntime without CUDA"
)
def test_cuda_provider_runs_the_models(tmp_path: Path) -> None:
    app = load_face_analysis(build_antelopev2_like(tmp_path), provider="CUDA")
    assert app.det_model.session.get_providers()[0] == "CUDAExecutionProvider"


def test_truncated_model_is_reported_with_its_folder(antelope_root: Path, tmp_path: Path) -> None:
    folder = tmp_path / "models" / "antelopev2"
    shutil.copytree(antelope_root / "models" / "antelopev2", folder)
    whole = (folder / RECOGNIZER_FILE).read_bytes()
    (folder / RECOGNIZER_FILE).write_bytes(whole[: len(whole) // 2])
    with pytest.raises(
        RuntimeError, match=f"could not load the insightface models in {folder}: .*{RECOGNIZER_FILE}"
    ):
        load_face_analysis(tmp_path)
