"""The InstantID cache on a real ComfyUI server, over HTTP only: ``GET /instantid/cache`` after prompts, a
prompt-only edit hitting the patched-model layer, ``POST /instantid/cache/clear`` and ComfyUI's ``/free``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from instantid.testing.comfy_fixture import TestInstall, use_test_files
from instantid.testing.comfy_server import ComfyServer
from instantid.testing.workflows import load_workflow, set_inputs, to_api

EXAMPLES = Path(__file__).resolve().parent / "workflows"


def _graph(server: ComfyServer, install: TestInstall) -> dict[str, Any]:
    graph = use_test_files(
        to_api(load_workflow(EXAMPLES / "instantid_one_face.json"), server.object_info()), install
    )
    return set_inputs(graph, "KSampler", steps=1)


def _entries(stats: dict[str, Any]) -> int:
    return sum(layer["entries"] for layer in stats["layers"].values())


def test_cache_route_after_prompts_clear_and_free(
    comfy_server: ComfyServer, comfy_install: TestInstall
) -> None:
    graph = _graph(comfy_server, comfy_install)
    first = comfy_server.run(set_inputs(graph, "CLIPTextEncode", text="cache test, first prompt"))
    assert first.ok, first.error
    before = comfy_server.get_json("/instantid/cache")
    edited = comfy_server.run(set_inputs(graph, "CLIPTextEncode", text="cache test, an edited prompt"))
    assert edited.ok, edited.error
    stats = comfy_server.get_json("/instantid/cache")
    assert stats["enabled"] is True and set(stats["layers"]) == {"faces", "tokens", "kv", "models"}
    for layer in ("faces", "tokens", "models"):
        assert stats["layers"][layer]["hits"] > before["layers"][layer]["hits"], (layer, stats)
    assert stats["layers"]["kv"]["misses"] == before["layers"]["kv"]["misses"], "the edit recomputed the K/V"
    assert stats["bytes"] > 0 and _entries(stats) > 0 and 0 < stats["hit_rate"] <= 1
    assert stats["time_saved_s"] > 0
    assert "InstantID cache this run: hits faces 1/1, tokens 1/1, models 1/1" in comfy_server.log_text()

    cleared = comfy_server.request("POST", "/instantid/cache/clear")
    assert b'"entries": 0' in cleared
    after_clear = comfy_server.get_json("/instantid/cache")
    assert _entries(after_clear) == 0 and after_clear["bytes"] == 0
    assert after_clear["hits"] == stats["hits"], "clearing keeps the counters"

    again = comfy_server.run(set_inputs(graph, "CLIPTextEncode", text="cache test, after clear"))
    assert again.ok, again.error
    assert _entries(comfy_server.get_json("/instantid/cache")) > 0
    comfy_server.request("POST", "/free", {"unload_models": True})
    deadline = time.monotonic() + 30
    while _entries(comfy_server.get_json("/instantid/cache")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _entries(comfy_server.get_json("/instantid/cache")) == 0, (
        "ComfyUI's /free did not clear the caches"
    )
