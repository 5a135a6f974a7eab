"""The server harness itself: the server stops however its block ends; the UI -> API converter."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from instantid.testing.comfy_install import OWN_FOLDERS, make_comfy_root
from instantid.testing.comfy_server import ServerError, comfy_server
from instantid.testing.comfyui import comfyui_root
from instantid.testing.workflows import WorkflowError, to_api

INFO: dict[str, Any] = {
    "LoadImage": {"input": {"required": {"image": (["a.png", "b.png"], {"image_upload": True})}}},
    "KSampler": {
        "input": {
            "required": {
                "model": ("MODEL",),
                "seed": ("INT", {"default": 0}),
                "steps": ("INT", {"default": 20}),
                "sampler_name": (["euler"],),
            }
        }
    },
    "Loader": {"input": {"required": {"name": (["m.safetensors"],)}}},
}


def test_the_server_is_stopped_when_the_block_raises(tmp_path: Path) -> None:
    root = make_comfy_root(comfyui_root(), tmp_path / "ComfyUI")
    assert all((root / name).is_dir() for name in OWN_FOLDERS)
    assert not (root / "extra_model_paths.yaml").exists()
    with pytest.raises(RuntimeError, match="a failing test"), comfy_server(root) as server:
        pid = server.process.pid
        assert "KSampler" in server.object_info()
        raise RuntimeError("a failing test")
    assert server.process.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # the whole process group is gone
    with pytest.raises(ServerError):
        server.object_info()


def test_ui_workflow_to_api_skips_the_seed_control_and_upload_values_and_muted_nodes() -> None:
    workflow = {
        "nodes": [
            {"id": 1, "type": "Loader", "widgets_values": ["m.safetensors"], "outputs": []},
            {"id": 2, "type": "KSampler", "inputs": [{"name": "model", "link": 7}], "widgets_values": [5, "fixed", 3, "euler"]},
            {"id": 3, "type": "LoadImage", "widgets_values": ["b.png", "image"]},
            {"id": 4, "type": "LoadImage", "mode": 4, "widgets_values": ["a.png", "image"]},
            {"id": 5, "type": "Note", "widgets_values": ["text"]},
        ],
        "links": [[7, 1, 0, 2, 0, "MODEL"]],
    }  # fmt: skip
    assert to_api(workflow, INFO) == {
        "1": {"class_type": "Loader", "inputs": {"name": "m.safetensors"}},
        "2": {
            "class_type": "KSampler",
            "inputs": {"seed": 5, "steps": 3, "sampler_name": "euler", "model": ["1", 0]},
        },
        "3": {"class_type": "LoadImage", "inputs": {"image": "b.png"}},
    }


def test_ui_workflow_with_widget_values_that_do_not_fit_is_refused() -> None:
    workflow = {"nodes": [{"id": 9, "type": "Loader", "widgets_values": ["m.safetensors", 1.0]}], "links": []}
    with pytest.raises(WorkflowError, match=r"Loader #9: widget values"):
        to_api(workflow, INFO)
    with pytest.raises(WorkflowError, match=r"no node type 'Unknown'"):
        to_api({"nodes": [{"id": 1, "type": "Unknown"}], "links": []}, INFO)
