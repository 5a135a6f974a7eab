"""The real-cost antelopev2 stand-ins: valid ONNX with antelopev2's interfaces (built narrow here; full size is
built by ``real_cost_root`` for the bench only)."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest

from instantid.testing import face_models
from instantid.testing.face_models import (
    STRIDES,
    build_detector,
    build_real_cost_detector,
    build_real_cost_recognizer,
    build_recognizer,
)

ort = pytest.importorskip("onnxruntime")


def _session(model: onnx.ModelProto) -> Any:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _dims(value: onnx.ValueInfoProto) -> list[object]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_detector_interface_and_outputs() -> None:
    model, macs = build_real_cost_detector(width=0.125)
    onnx.checker.check_model(model, full_check=True)
    assert _dims(model.graph.input[0]) == [1, 3, "height", "width"]
    assert [o.name for o in model.graph.output] == [o.name for o in build_detector().graph.output]
    side = 192
    image = np.random.default_rng(0).standard_normal((1, 3, side, side)).astype(np.float32)
    outputs = _session(model).run(None, {"input.1": image})
    widths = [1] * 3 + [4] * 3 + [10] * 3
    rows = [2 * (side // s) ** 2 for s in STRIDES] * 3
    assert [o.shape for o in outputs] == list(zip(rows, widths, strict=True))
    small = _session(build_detector()).run(None, {"input.1": image})
    for real, tag in zip(
        outputs, small, strict=True
    ):  # the tag detector's outputs, perturbed by at most REAL_COST_MIX
        assert np.abs(real - tag).max() <= 1.1e-4
    assert macs > 0


def test_recognizer_interface_and_outputs() -> None:
    model, _ = build_real_cost_recognizer(width=1 / 16)
    onnx.checker.check_model(model, full_check=True)
    assert _dims(model.graph.input[0]) == ["batch", 3, 112, 112]
    assert _dims(model.graph.output[0]) == ["batch", 512]
    assert not {n.op_type for n in model.graph.node[:8]} & {"Sub", "Mul"}  # insightface's normalisation probe
    crops = np.random.default_rng(1).standard_normal((2, 3, 112, 112)).astype(np.float32)
    (embedding,) = _session(model).run(None, {"input.1": crops})
    (small,) = _session(build_recognizer()).run(None, {"input.1": crops})
    assert embedding.shape == (2, 512)
    assert np.abs(embedding - small).max() <= 1.1e-4


def test_full_size_compute_matches_antelopev2() -> None:
    """Counted, not built: SCRFD-10G ~10 GMACs at 640x480 (13.3 at 640x640), iResNet-100 ~12.1 GMACs (24.2 GFLOPs)."""
    for builder, low, high in (
        (face_models.scrfd_10g_heads, 12e9, 14.5e9),
        (face_models.iresnet_100_embedding, 11.5e9, 12.5e9),
    ):
        net = _CountingNet()
        builder(net, "input.1")
        assert low <= net.macs <= high, (builder.__name__, net.macs)


class _CountingNet(face_models._Net):
    """``_Net`` without weights: counts multiply-accumulates only."""

    def __init__(self) -> None:
        super().__init__("count_", 0, 1.0)
        self.rng = _NoRandom()  # type: ignore[assignment]

    def tensor(self, array: np.ndarray, what: str) -> str:
        return self.name(what)


class _NoRandom:
    def standard_normal(self, shape: tuple[int, ...], dtype: object = None) -> np.ndarray:
        return np.zeros((1,), dtype=np.float32)
