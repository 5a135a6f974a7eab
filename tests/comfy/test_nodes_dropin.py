"""Drop-in behaviour of the seven nodes: the original's interface with descriptions and tooltips added, the
ControlNet's width checked against the adapter's and the model's before anything runs, messages that name
the node input and image, and the face analysis provider fallback.

Direct calls to the node classes on the ComfyUI of ``instantid.testing.comfyui`` (tiny real models).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from instantid.comfy.conditioning import controlnet_context_dim
from instantid.comfy.errors import InstantIDNodeError
from instantid.face import NoFaceDetectedError
from instantid.testing import comfyui
from instantid.testing.face_models import build_antelopev2_like
from tests.comfy.instantid_helpers import (
    face_image,
    faceless_image,
    pack_nodes,
    shared_adapter,
    shared_patcher,
)

ORIGINAL_INTERFACE: dict[str, dict[str, Any]] = {
    "InstantIDModelLoader": {
        "required": [["instantid_file", ["<files>"]]],
        "RETURN_TYPES": ["INSTANTID"],
        "RETURN_NAMES": ["INSTANTID"],
    },
    "InstantIDFaceAnalysis": {
        "required": [["provider", [["CPU", "CUDA", "ROCM", "CoreML"]]]],
        "RETURN_TYPES": ["FACEANALYSIS"],
        "RETURN_NAMES": ["FACEANALYSIS"],
    },
    "ApplyInstantID": {
        "required": [
            ["instantid", ["INSTANTID"]],
            ["insightface", ["FACEANALYSIS"]],
            ["control_net", ["CONTROL_NET"]],
            ["image", ["IMAGE"]],
            ["model", ["MODEL"]],
            ["positive", ["CONDITIONING"]],
            ["negative", ["CONDITIONING"]],
            ["weight", ["FLOAT", {"default": 0.8, "min": 0.0, "max": 5.0, "step": 0.01}]],
            ["start_at", ["FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}]],
            ["end_at", ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001}]],
        ],
        "optional": [["image_kps", ["IMAGE"]], ["mask", ["MASK"]]],
        "RETURN_TYPES": ["MODEL", "CONDITIONING", "CONDITIONING"],
        "RETURN_NAMES": ["MODEL", "positive", "negative"],
    },
    "ApplyInstantIDAdvanced": {
        "required": [
            ["instantid", ["INSTANTID"]],
            ["insightface", ["FACEANALYSIS"]],
            ["control_net", ["CONTROL_NET"]],
            ["image", ["IMAGE"]],
            ["model", ["MODEL"]],
            ["positive", ["CONDITIONING"]],
            ["negative", ["CONDITIONING"]],
            ["ip_weight", ["FLOAT", {"default": 0.8, "min": 0.0, "max": 3.0, "step": 0.01}]],
            ["cn_strength", ["FLOAT", {"default": 0.8, "min": 0.0, "max": 10.0, "step": 0.01}]],
            ["start_at", ["FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}]],
            ["end_at", ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001}]],
            ["noise", ["FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.1}]],
            ["combine_embeds", [["average", "norm average", "concat"], {"default": "average"}]],
        ],
        "optional": [["image_kps", ["IMAGE"]], ["mask", ["MASK"]]],
        "RETURN_TYPES": ["MODEL", "CONDITIONING", "CONDITIONING"],
        "RETURN_NAMES": ["MODEL", "positive", "negative"],
    },
    "FaceKeypointsPreprocessor": {
        "required": [["faceanalysis", ["FACEANALYSIS"]], ["image", ["IMAGE"]]],
        "RETURN_TYPES": ["IMAGE"],
        "RETURN_NAMES": ["IMAGE"],
    },
    "InstantIDAttentionPatch": {
        "required": [
            ["instantid", ["INSTANTID"]],
            ["insightface", ["FACEANALYSIS"]],
            ["image", ["IMAGE"]],
            ["model", ["MODEL"]],
            ["weight", ["FLOAT", {"default": 1.0, "min": -1.0, "max": 3.0, "step": 0.01}]],
            ["start_at", ["FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}]],
            ["end_at", ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001}]],
            ["noise", ["FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.1}]],
        ],
        "optional": [["mask", ["MASK"]]],
        "RETURN_TYPES": ["MODEL", "FACE_EMBEDS"],
        "RETURN_NAMES": ["MODEL", "FACE_EMBEDS"],
    },
    "ApplyInstantIDControlNet": {
        "required": [
            ["face_embeds", ["FACE_EMBEDS"]],
            ["control_net", ["CONTROL_NET"]],
            ["image_kps", ["IMAGE"]],
            ["positive", ["CONDITIONING"]],
            ["negative", ["CONDITIONING"]],
            ["strength", ["FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}]],
            ["start_at", ["FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}]],
            ["end_at", ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001}]],
        ],
        "optional": [["mask", ["MASK"]]],
        "RETURN_TYPES": ["CONDITIONING", "CONDITIONING"],
        "RETURN_NAMES": ["positive", "negative"],
    },
}
"""ComfyUI_InstantID's inputs (name, type, options but tooltips, order) and outputs; "<files>" is the
loader's live file list."""

SD15_CONTROLNET_ON_SDXL_MESSAGE = (
    "the ControlNet does not fit: `control_net` reads 2048-d (SDXL) context, `instantid` makes 768-d (SD1.5) "
    "face tokens, `model` reads 768-d (SD1.5) text tokens; the ControlNet, the InstantID adapter and the model "
    "must all be for the same base model (SD1.5 768, SDXL 2048); load the IdentityNet ControlNet made for SD1.5"
)


def _interface(node_class: type) -> dict[str, Any]:
    spec = node_class.INPUT_TYPES()  # type: ignore[attr-defined]
    out: dict[str, Any] = {}
    for section, inputs in spec.items():
        out[section] = []
        for name, (kind, *rest) in inputs.items():
            options = {k: v for k, v in (rest[0] if rest else {}).items() if k != "tooltip"}
            kind = "<files>" if name == "instantid_file" else kind
            out[section].append([name, [kind, options] if options else [kind]])
    out["RETURN_TYPES"] = list(node_class.RETURN_TYPES)  # type: ignore[attr-defined]
    out["RETURN_NAMES"] = list(getattr(node_class, "RETURN_NAMES", node_class.RETURN_TYPES))  # type: ignore[attr-defined]
    return out


def test_the_interface_is_the_originals_with_a_description_and_a_tooltip_on_every_input(
    comfy: comfyui.ComfyUI,
) -> None:
    nodes = pack_nodes(comfy)
    assert set(nodes.NODE_CLASS_MAPPINGS) == set(ORIGINAL_INTERFACE)
    for name, node_class in nodes.NODE_CLASS_MAPPINGS.items():
        assert _interface(node_class) == ORIGINAL_INTERFACE[name], name
        assert isinstance(node_class.DESCRIPTION, str) and len(node_class.DESCRIPTION) > 40, name
        for section in node_class.INPUT_TYPES().values():
            for input_name, spec in section.items():
                assert len(spec[1]["tooltip"]) > 20, f"{name}.{input_name}"


def _apply(
    comfy: comfyui.ComfyUI, face_app: Any, control_net: Any, arch: comfyui.Arch = "sd15", **overrides: Any
) -> Any:
    inputs = {
        "instantid": shared_adapter(comfy, arch),
        "insightface": face_app,
        "control_net": control_net,
        "image": face_image(40, 60),
        "model": shared_patcher(comfy, arch),
        "positive": comfyui.conditioning(arch, 1),
        "negative": comfyui.conditioning(arch, 2),
        "weight": 0.8,
        "start_at": 0.0,
        "end_at": 1.0,
    } | overrides
    node = inputs.pop("node", pack_nodes(comfy).ApplyInstantID)
    return comfyui.run_node(node, **inputs)


def test_controlnet_context_width_is_read_from_the_controlnet(tiny_controlnet: Callable[..., Any]) -> None:
    assert controlnet_context_dim(tiny_controlnet("sd15")) == 768
    assert controlnet_context_dim(tiny_controlnet("sdxl")) == 2048
    assert controlnet_context_dim(object()) is None  # a kind without a UNet-style control model: not checked


def test_a_controlnet_of_the_other_architecture_is_refused_before_the_face_analysis(
    comfy: comfyui.ComfyUI, face_app: Any, tiny_controlnet: Callable[..., Any]
) -> None:
    # A faceless image: the width check comes first, so its message is the one raised.
    with pytest.raises(InstantIDNodeError) as info:
        _apply(comfy, face_app, tiny_controlnet("sdxl"), image=faceless_image())
    assert str(info.value) == SD15_CONTROLNET_ON_SDXL_MESSAGE
    advanced = {
        "node": pack_nodes(comfy).ApplyInstantIDAdvanced,
        "ip_weight": 0.8,
        "cn_strength": 0.8,
        "noise": 0.0,
    }
    with pytest.raises(InstantIDNodeError, match=r"^the ControlNet does not fit: `control_net` reads 2048-d"):
        _apply(comfy, face_app, tiny_controlnet("sdxl"), **advanced)


def test_an_sd15_controlnet_on_sdxl(
    comfy: comfyui.ComfyUI, face_app: Any, tiny_controlnet: Callable[..., Any]
) -> None:
    with pytest.raises(InstantIDNodeError) as info:
        _apply(comfy, face_app, tiny_controlnet("sd15"), arch="sdxl")
    assert str(info.value) == (
        "the ControlNet does not fit: `control_net` reads 768-d (SD1.5) context, `instantid` makes 2048-d (SDXL) "
        "face tokens, `model` reads 2048-d (SDXL) text tokens; the ControlNet, the InstantID adapter and the model "
        "must all be for the same base model (SD1.5 768, SDXL 2048); load the IdentityNet ControlNet made for SDXL"
    )


def test_the_controlnet_node_checks_the_face_tokens_width(
    comfy: comfyui.ComfyUI, tiny_controlnet: Callable[..., Any]
) -> None:
    tokens = torch.zeros(1, 16, 768)
    args = {
        "face_embeds": {"cond": tokens, "uncond": tokens},
        "image_kps": face_image(40, 60),
        "positive": comfyui.conditioning("sdxl", 1),
        "negative": comfyui.conditioning("sdxl", 2),
        "strength": 0.5,
        "start_at": 0.0,
        "end_at": 1.0,
    }
    node = pack_nodes(comfy).ApplyInstantIDControlNet
    with pytest.raises(InstantIDNodeError) as info:
        comfyui.run_node(node, control_net=tiny_controlnet("sdxl"), **args)
    assert str(info.value) == (
        "the ControlNet does not fit: `control_net` reads 2048-d (SDXL) context, `face_embeds` holds 768-d (SD1.5) "
        "face tokens; the ControlNet, the InstantID adapter and the model must all be for the same base model "
        "(SD1.5 768, SDXL 2048); load the IdentityNet ControlNet made for SD1.5"
    )
    positive, _ = comfyui.run_node(node, control_net=tiny_controlnet("sd15"), **args)
    assert positive[0][1]["cross_attn_controlnet"].shape == (1, 16, 768)


def test_no_face_messages_name_the_input_and_the_image(
    comfy: comfyui.ComfyUI,
    face_app: Any,
    tiny_controlnet: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    control_net = tiny_controlnet("sd15")
    with pytest.raises(NoFaceDetectedError) as info:
        _apply(comfy, face_app, control_net, image=faceless_image())
    assert str(info.value) == "No face detected in input `image` (320x320) at detection sizes 640 down to 192"
    with pytest.raises(NoFaceDetectedError) as info:
        _apply(comfy, face_app, control_net, image=torch.cat([faceless_image(), faceless_image()]))
    assert (
        str(info.value)
        == "No face detected in any of the 2 images of input `image` (detection sizes 640 down to 192)"
    )

    kps = faceless_image()
    with caplog.at_level(logging.WARNING):
        _, positive, _ = _apply(
            comfy,
            face_app,
            control_net,
            image=torch.cat([faceless_image(), face_image(40, 60)]),
            image_kps=kps,
        )
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "No face detected in input `image`, image 1 of 2 (320x320) at detection sizes 640 down to 192; image skipped",
        "No face detected in input `image_kps` (320x320) at detection sizes 640 down to 192; no keypoints drawn for it",
        "No face detected in input `image_kps`: it goes to the ControlNet unchanged",
    ]
    # As in ComfyUI_InstantID, a keypoint image without a detectable face is used as it is.
    assert torch.equal(positive[0][1]["control"].cond_hint_original, kps.movedim(-1, 1))


def test_a_malformed_image_names_the_input(
    comfy: comfyui.ComfyUI, face_app: Any, tiny_controlnet: Callable[..., Any]
) -> None:
    with pytest.raises(
        InstantIDNodeError, match=r"^input `image_kps` has shape \(1, 32, 32\); expected a non-empty IMAGE"
    ):
        _apply(comfy, face_app, tiny_controlnet("sd15"), image_kps=torch.zeros(1, 32, 32))


def test_face_analysis_node_with_cuda_on_a_cpu_onnxruntime(
    comfy: comfyui.ComfyUI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    nodes = pack_nodes(comfy)
    monkeypatch.setattr(nodes, "INSIGHTFACE_DIR", str(build_antelopev2_like(tmp_path)))
    with caplog.at_level(logging.WARNING):
        (app,) = comfyui.run_node(nodes.InstantIDFaceAnalysis, provider="CUDA")
    assert app.det_model.session.get_providers() == ["CPUExecutionProvider"]
    (record,) = caplog.records
    assert (
        "not in this onnxruntime" in record.getMessage()
        and "pip install onnxruntime-gpu" in record.getMessage()
    )
