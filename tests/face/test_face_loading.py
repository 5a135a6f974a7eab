"""Loading the antelopev2 folder: missing files are named, nothing is downloaded, providers are mapped."""

from __future__ import annotations

import logging
import shutil
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any, NoReturn

import onnx
import onnxruntime
import pytest

from instantid.face import (
    FaceModelsMissingError,
    antelopev2_dir,
    load_face_analysis,
    onnx_provider,
    session_providers,
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


def _sessions_providers(app: Any) -> set[tuple[str, ...]]:
    return {tuple(model.session.get_providers()) for model in app.models.values()}


@pytest.mark.skipif(
    "CUDAExecutionProvider" in onnxruntime.get_available_providers(), reason="this onnxruntime has CUDA"
)
def test_cuda_on_an_onnxruntime_without_it_runs_on_the_cpu_with_one_warning(
    antelope_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A saved workflow's "CUDA" on a CPU-only onnxruntime: ComfyUI_InstantID's behaviour (run on the CPU),
    with one warning that says what is missing and how to get it, and nothing from onnxruntime itself."""
    with warnings.catch_warnings(record=True) as raised, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        app = load_face_analysis(antelope_root, provider="CUDA")
    assert _sessions_providers(app) == {("CPUExecutionProvider",)}
    (record,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    message = record.getMessage()
    assert record.name == "instantid.face"
    assert message.startswith(
        "face analysis provider 'CUDA' (CUDAExecutionProvider) is not in this onnxruntime"
    )
    assert "running the face analysis on the CPU" in message
    assert "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu" in message
    assert f"onnxruntime {metadata.version('onnxruntime')}" in message  # what is installed
    assert not [w for w in raised if "provider" in str(w.message).lower()]


@pytest.mark.parametrize(
    ("provider", "hint"),
    [
        ("CoreML", "on macOS, where CoreML exists"),
        ("ROCM", "onnxruntime-rocm"),
        ("DmlExecutionProvider", "directml"),
    ],
)
def test_each_missing_provider_names_its_package(
    antelope_root: Path, caplog: pytest.LogCaptureFixture, provider: str, hint: str
) -> None:
    if onnx_provider(provider) in onnxruntime.get_available_providers():
        pytest.skip(f"this onnxruntime has {provider}")
    with caplog.at_level(logging.WARNING):
        app = load_face_analysis(antelope_root, provider=provider)
    assert _sessions_providers(app) == {("CPUExecutionProvider",)}
    (record,) = caplog.records
    assert hint in record.getMessage()


def test_cpu_and_available_providers_warn_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert session_providers("CPU") == ["CPUExecutionProvider"]
        for name in onnxruntime.get_available_providers():
            if name != "CPUExecutionProvider":
                assert session_providers(name) == [name, "CPUExecutionProvider"]
    assert not caplog.records


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
