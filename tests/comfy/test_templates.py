"""The templates in ``example_workflows/`` (what ComfyUI's Templates browser lists for this pack).

Each one: SDXL settings as the original pack's example (1016 px, 30 steps), a preview image beside it, every
model file it names in the README's model table (file and folder) and in its ``models`` metadata with the
table's link; and it runs on a real ComfyUI server (``comfy_server``) with its own file names, which the test
points at the small random-weight test models (SD1.5-architecture: a full-size SDXL set is GiBs), with one step
at 64 px (steps and size overridden so the run is quick). Where the server has ComfyUI's
``/workflow_templates`` route (2025 and later), it lists them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from instantid.testing.comfy_fixture import TestInstall
from instantid.testing.comfy_server import ComfyServer, ServerError
from instantid.testing.workflows import load_workflow, node_ids, set_inputs, to_api

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = sorted((REPO / "example_workflows").glob("*.json"))
LOADERS = {"CheckpointLoaderSimple": "checkpoints", "ControlNetLoader": "controlnet", "InstantIDModelLoader": "instantid"}
"""The loader nodes of the templates and the models folder each reads."""


def model_table() -> dict[tuple[str, str], str]:
    """``{(folder, file): link}`` from the README's model table (between its ``models:table`` markers)."""
    readme = (REPO / "README.md").read_text()
    table = readme.split("<!-- models:table:start -->")[1].split("<!-- models:table:end -->")[0]
    rows = {}
    for line in table.strip().splitlines()[2:]:
        file_cell, folder_cell, source_cell, _licence = [c.strip() for c in line.strip("|").split("|")]
        folder = re.search(r"`([^`]+)/`", folder_cell)
        link = re.search(r"\]\((https://[^)]+)\)", source_cell)
        assert folder and link, f"a model table row without a folder or a link: {line}"
        for name in re.findall(r"`([^`]+)`", file_cell):
            rows[(folder.group(1), name)] = link.group(1)
    return rows


def loader_files(workflow: dict[str, Any]) -> list[tuple[str, str]]:
    return [(LOADERS[n["type"]], n["widgets_values"][0]) for n in workflow["nodes"] if n["type"] in LOADERS]


def test_there_are_templates_with_previews() -> None:
    assert len(TEMPLATES) >= 2
    for path in TEMPLATES:
        assert path.with_suffix(".png").read_bytes().startswith(b"\x89PNG"), f"{path.name} has no preview"


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.stem)
def test_template_models_are_the_published_ones(path: Path) -> None:
    workflow = load_workflow(path)
    table = model_table()
    files = loader_files(workflow)
    assert {folder for folder, _ in files} == set(LOADERS.values())
    for folder, name in files:
        assert (folder, name) in table, f"{path.name}: {folder}/{name} is not in the README's model table"
    metadata = {(m["directory"], m["name"]): m["url"] for m in workflow["models"]}
    assert set(metadata) == set(files), f"{path.name}: `models` metadata {sorted(metadata)} vs loaders {files}"
    for key, url in metadata.items():
        assert url == table[key], f"{path.name}: {key} links {url}, the README {table[key]}"
    for node in workflow["nodes"]:
        if node["type"] in LOADERS:
            assert node["properties"]["models"] == [
                m for m in workflow["models"] if (m["directory"], m["name"]) == (LOADERS[node["type"]], node["widgets_values"][0])
            ]
    (latent,) = [n for n in workflow["nodes"] if n["type"] == "EmptyLatentImage"]
    (sampler,) = [n for n in workflow["nodes"] if n["type"] == "KSampler"]
    assert latent["widgets_values"][:2] == [1016, 1016] and sampler["widgets_values"][2] == 30


@pytest.fixture(scope="module")
def published_names(comfy_install: TestInstall) -> TestInstall:
    """The template's file names in the test install, linked to its small random-weight models."""
    models = comfy_install.models.root
    test_files = {
        "checkpoints": models / "checkpoints" / comfy_install.models.checkpoint,
        "controlnet": models / "controlnet" / comfy_install.models.controlnet,
        "instantid": models / "instantid" / comfy_install.models.adapter,
    }
    for folder, name in {f for path in TEMPLATES for f in loader_files(load_workflow(path))}:
        link = models / folder / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(test_files[folder])
    return comfy_install


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.stem)
def test_template_runs_on_the_server(path: Path, comfy_server: ComfyServer, published_names: TestInstall) -> None:
    graph = to_api(load_workflow(path), comfy_server.object_info())
    for node_id in node_ids(graph, "LoadImage"):
        graph[node_id]["inputs"]["image"] = published_names.images.face_a
    graph = set_inputs(graph, "KSampler", steps=1)
    graph = set_inputs(graph, "EmptyLatentImage", width=64, height=64)
    run = comfy_server.run(graph)
    assert run.ok, f"{path.name} failed: {run.error}\n{comfy_server.log_tail()}"
    assert run.images(), f"{path.name} saved no image"


def test_the_server_lists_the_templates(comfy_server: ComfyServer) -> None:
    try:
        listed = comfy_server.get_json("/workflow_templates")
    except ServerError:
        pytest.skip("this ComfyUI has no /workflow_templates route (it lists custom node templates since 2025)")
    ours = [names for pack, names in listed.items() if "instantid" in pack]
    assert ours and set(ours[0]) == {p.stem for p in TEMPLATES}, json.dumps(listed)[:2000]
