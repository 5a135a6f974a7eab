"""Fixtures: an antelopev2-layout folder of small ONNX models (instantid.testing.face_models) and the photos insightface ships."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from instantid.face import load_face_analysis
from instantid.testing.face_images import load_photo
from instantid.testing.face_models import build_antelopev2_like


@pytest.fixture(scope="session")
def antelope_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_antelopev2_like(tmp_path_factory.mktemp("insightface"))


@pytest.fixture(scope="session")
def face_app(antelope_root: Path) -> Any:
    return load_face_analysis(antelope_root, provider="CPU")


@pytest.fixture(scope="session")
def group_photo() -> np.ndarray:
    """t1.jpg: 1280x886, several people."""
    return load_photo("t1.jpg")


@pytest.fixture(scope="session")
def portrait() -> np.ndarray:
    """Tom_Hanks_54745.png: a 112x112 aligned face."""
    return load_photo("Tom_Hanks_54745.png")
