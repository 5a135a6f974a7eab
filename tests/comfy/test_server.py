"""The pack as users run it: a real ComfyUI server (``main.py --cpu``) with this repository in ``custom_nodes``.

Driven only over HTTP (``instantid.testing.comfy_server``): ``GET /object_info``, ``POST /prompt``
with API-format graphs converted from the test workflows in ``tests/comfy/workflows/`` (``instantid.testing.workflows``),
``/history`` for the outcome and ``/view`` for the image. SD1.5 architecture, random weights, one
sampling step. Bad inputs must fail in the InstantID node with a clear message, and the server must
run the next good prompt.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest

from instantid.testing.comfy_fixture import TestInstall, use_test_files
from instantid.testing.comfy_install import PACK_FOLDER
from instantid.testing.comfy_server import ComfyServer, PromptRun
from instantid.testing.workflows import load_workflow, node_ids, set_inputs, to_api

EXAMPLES = Path(__file__).resolve().parent / "workflows"
SEVEN = {
    "InstantIDModelLoader": ["instantid_file"],
    "InstantIDFaceAnalysis": ["provider"],
    "FaceKeypointsPreprocessor": ["faceanalysis", "image"],
    "ApplyInstantID": [
        "instantid", "insightface", "control_net", "image", "model", "positive", "negative",
        "weight", "start_at", "end_at", "image_kps", "mask",
    ],
    "ApplyInstantIDAdvanced": [
        "instantid", "insightface", "control_net", "image", "model", "positive", "negative",
        "ip_weight", "cn_strength", "start_at", "end_at", "noise", "combine_embeds", "image_kps", "mask",
    ],
    "InstantIDAttentionPatch": ["instantid", "insightface", "image", "model", "weight", "start_at", "end_at", "noise", "mask"],
    "ApplyInstantIDControlNet": [
        "face_embeds", "control_net", "image_kps", "positive", "negative", "strength", "start_at", "end_at", "mask",
    ],
}  # fmt: skip
"""ComfyUI_InstantID's seven nodes and their inputs in declaration order (required, then optional)."""


@pytest.fixture(scope="module")
def object_info(comfy_server: ComfyServer) -> dict[str, Any]:
    return comfy_server.object_info()


@pytest.fixture(scope="module")
def example(object_info: dict[str, Any], comfy_install: TestInstall) -> Any:
    """``example(name)``: the API graph of ``tests/comfy/workflows/<name>.json`` on the test files, with one sampling step."""

    @functools.cache
    def convert(name: str) -> dict[str, Any]:
        graph = use_test_files(to_api(load_workflow(EXAMPLES / f"{name}.json"), object_info), comfy_install)
        return set_inputs(graph, "KSampler", steps=1)

    return lambda name: convert(name)


def assert_ran(server: ComfyServer, run: PromptRun) -> bytes:
    """The run succeeded and saved a PNG, which ``/view`` serves; returns its bytes."""
    assert run.ok, f"prompt failed: {run.error}\n{server.log_tail()}"
    (image,) = run.images()
    png = server.view(image)
    assert png.startswith(b"\x89PNG"), png[:16]
    return png


def assert_node_error(run: PromptRun, node_type: str, *keywords: str) -> str:
    """The run failed in a node of ``node_type`` whose message holds every keyword (case-insensitive)."""
    assert not run.ok, "the prompt ran although its input is bad"
    error = run.error
    assert error is not None, run.messages
    message = str(error["exception_message"])
    assert error["node_type"] == node_type, f"failed in {error['node_type']}: {message}"
    missing = [k for k in keywords if k.lower() not in message.lower()]
    assert not missing, f"{node_type}'s message lacks {missing}: {message}"
    return message


def test_object_info_shows_the_seven_nodes_with_the_original_inputs(
    comfy_server: ComfyServer, object_info: dict[str, Any]
) -> None:
    imported = [
        line for line in comfy_server.log_text().splitlines() if line.endswith(f"custom_nodes/{PACK_FOLDER}")
    ]
    assert imported and "IMPORT FAILED" not in imported[0], imported  # the copy in custom_nodes was loaded
    for name, inputs in SEVEN.items():
        spec = object_info[name]
        declared = [*spec["input"]["required"], *spec["input"].get("optional", {})]
        assert declared == inputs, name
        assert spec["category"] == "InstantID"
    provider = object_info["InstantIDFaceAnalysis"]["input"]["required"]["provider"]
    choices = provider[1]["options"] if provider[0] == "COMBO" else provider[0]  # the V3 form / the V1 form
    assert choices == ["CPU", "CUDA", "ROCM", "CoreML"]
    assert object_info["ApplyInstantID"]["output"] == ["MODEL", "CONDITIONING", "CONDITIONING"]
    assert object_info["InstantIDAttentionPatch"]["output"] == ["MODEL", "FACE_EMBEDS"]


def test_one_face_then_a_prompt_only_edit_reuses_the_loaded_models(
    comfy_server: ComfyServer, example: Any
) -> None:
    graph = example("instantid_one_face")
    first = comfy_server.run(graph)
    assert_ran(comfy_server, first)
    assert first.seconds is not None and first.node_seconds, "no timings from the websocket"
    (apply_id,) = node_ids(graph, "ApplyInstantID")
    assert apply_id in first.node_seconds

    edited = set_inputs(graph, "CLIPTextEncode", text="a portrait photo, evening light")
    second = comfy_server.run(edited)
    assert_ran(comfy_server, second)
    loaders = [
        i
        for t in ("CheckpointLoaderSimple", "InstantIDModelLoader", "ControlNetLoader")
        for i in node_ids(graph, t)
    ]
    assert set(loaders) <= set(second.cached), second.cached
    assert apply_id in second.node_seconds  # the identity follows the new conditioning


@pytest.mark.parametrize(
    "name", ["instantid_lora_rescalecfg", "instantid_two_faces_masks", "instantid_patch_attention_controlnet"]
)
def test_example_workflow_runs(comfy_server: ComfyServer, example: Any, name: str) -> None:
    assert_ran(comfy_server, comfy_server.run(example(name)))


def test_provider_cuda_without_cuda_falls_back_to_the_cpu(comfy_server: ComfyServer, example: Any) -> None:
    graph = set_inputs(example("instantid_one_face"), "InstantIDFaceAnalysis", provider="CUDA")
    assert_ran(comfy_server, comfy_server.run(set_inputs(graph, "KSampler", seed=11)))


def _bad_inputs(install: TestInstall) -> dict[str, tuple[str, dict[str, Any], tuple[str, ...]]]:
    """case: (node type the error must come from, inputs to change by node type, keywords of the message)."""
    models, images = install.models, install.images
    return {
        "image without a face": (
            "ApplyInstantID",
            {"LoadImage": {"image": images.no_face}},
            ("no face", "image"),
        ),
        "SDXL adapter on an SD1.5 model": (
            "ApplyInstantID",
            {"InstantIDModelLoader": {"instantid_file": models.adapter_sdxl}},
            ("2048", "768"),
        ),
        "SDXL-layout ControlNet with an SD1.5 adapter and model": (
            "ApplyInstantID",
            {"ControlNetLoader": {"control_net_name": models.controlnet_sdxl}},
            ("controlnet", "2048", "768"),
        ),
        "a ControlNet file chosen as the adapter": (
            "InstantIDModelLoader",
            {"InstantIDModelLoader": {"instantid_file": models.controlnet_as_adapter}},
            ("controlnet",),
        ),
    }


BAD_INPUTS = (
    "image without a face",
    "SDXL adapter on an SD1.5 model",
    "SDXL-layout ControlNet with an SD1.5 adapter and model",
    "a ControlNet file chosen as the adapter",
)


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_a_bad_input_fails_in_the_instantid_node_with_a_clear_message(
    comfy_server: ComfyServer, comfy_install: TestInstall, example: Any, case: str
) -> None:
    node_type, changes, keywords = _bad_inputs(comfy_install)[case]
    graph = example("instantid_one_face")
    for class_type, inputs in changes.items():
        graph = set_inputs(graph, class_type, **inputs)
    assert_node_error(comfy_server.run(graph), node_type, *keywords)


def test_an_empty_mask_fails_in_the_instantid_node(comfy_server: ComfyServer, example: Any) -> None:
    """A mask cropped outside itself (stock SolidMask 64x64, CropMask at x=100: shape [1, 64, 0])."""
    graph = example("instantid_one_face")
    graph["900"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 64}}
    graph["901"] = {
        "class_type": "CropMask",
        "inputs": {"mask": ["900", 0], "x": 100, "y": 0, "width": 32, "height": 64},
    }
    graph = set_inputs(graph, "ApplyInstantID", mask=["901", 0])
    assert_node_error(comfy_server.run(graph), "ApplyInstantID", "mask")


def test_the_server_runs_a_good_prompt_after_the_bad_ones(comfy_server: ComfyServer, example: Any) -> None:
    assert_ran(comfy_server, comfy_server.run(set_inputs(example("instantid_one_face"), "KSampler", seed=7)))
    assert comfy_server.process.poll() is None
