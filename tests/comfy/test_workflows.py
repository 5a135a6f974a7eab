"""Saved workflows load onto this pack unchanged: its templates and test workflows, and the original pack's.

The repository is loaded the way ComfyUI loads a clone in ``custom_nodes/`` (its own
``nodes.load_custom_node`` on the repository folder); then every node of each saved workflow whose
type is an InstantID node must resolve to this pack, its ``widgets_values`` must map onto its
widget inputs in ``INPUT_TYPES`` order (types, ranges, combo choices), and its links must meet
inputs and outputs of the types the workflow recorded.

The workflows are the repository's ``example_workflows/*.json`` (the templates ComfyUI lists) and
``tests/comfy/workflows/*.json`` (small test workflows) and, when ``$INSTANTID_STOCK_WORKFLOWS``
names a folder, every ``*.json`` in it: ComfyUI_InstantID's published examples (``examples/`` of
github.com/cubiq/ComfyUI_InstantID), the compatibility check. Without it that case reports a skip.
(``tests/comfy/test_server.py`` and ``tests/comfy/test_templates.py`` run them on a real server.)
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
from pathlib import Path
from typing import Any

import pytest

from cow_model.comfy import ENV_VAR
from instantid.testing import comfyui

REPO_ROOT = Path(__file__).resolve().parents[2]
OWN_WORKFLOWS = (REPO_ROOT / "example_workflows", Path(__file__).resolve().parent / "workflows")
"""This pack's workflows: the templates, and the small test workflows."""
STOCK_WORKFLOWS_ENV = "INSTANTID_STOCK_WORKFLOWS"
"""A folder of ComfyUI_InstantID's saved workflows to check as well (``InstantID_basic.json``, ...)."""


def _workflow_files() -> list[Any]:
    files: list[Any] = sorted(path for folder in OWN_WORKFLOWS for path in folder.glob("*.json"))
    stock = os.environ.get(STOCK_WORKFLOWS_ENV)
    if stock:
        found = sorted(Path(stock).expanduser().glob("*.json"))
        assert found, f"${STOCK_WORKFLOWS_ENV}={stock} holds no *.json workflow"
        files += found
    else:
        files.append(
            pytest.param(
                None,
                marks=pytest.mark.skip(reason=f"set {STOCK_WORKFLOWS_ENV} to a folder of ComfyUI_InstantID workflows"),
                id="stock-workflows",
            )
        )
    return files


WORKFLOW_FILES = _workflow_files()
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
SEVEN = (
    "InstantIDModelLoader",
    "InstantIDFaceAnalysis",
    "FaceKeypointsPreprocessor",
    "ApplyInstantID",
    "ApplyInstantIDAdvanced",
    "InstantIDAttentionPatch",
    "ApplyInstantIDControlNet",
)
OTHER_PACKS = ("IPAdapterModelLoader", "IPAdapterAdvanced")
"""Node types of ComfyUI_IPAdapter_plus in the IP-Adapter workflow: neither stock nor ours."""


@pytest.fixture(scope="module")
def pack(comfy: comfyui.ComfyUI, tmp_path_factory: pytest.TempPathFactory) -> dict[str, type]:
    """The node classes ComfyUI registered after loading this repository as a custom node."""
    custom_nodes = tmp_path_factory.mktemp("custom_nodes")
    clone = custom_nodes / "comfyui-instantid-cow"
    clone.symlink_to(REPO_ROOT, target_is_directory=True)
    loaded = comfy.nodes.load_custom_node(str(clone))
    if inspect.isawaitable(loaded):  # ComfyUI since 2025 loads custom nodes asynchronously
        loaded = asyncio.run(loaded)
    assert loaded is True, "ComfyUI could not load the repository as a custom node (see the logged traceback)"
    return {name: comfy.nodes.NODE_CLASS_MAPPINGS[name] for name in SEVEN}


@pytest.fixture(scope="module")
def instantid_models(comfy: comfyui.ComfyUI, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models/instantid folder holding the adapter the workflows name, registered with ComfyUI."""
    folder = tmp_path_factory.mktemp("instantid")
    (folder / "ip-adapter.bin").write_bytes(b"")  # the name the original pack's workflows use
    for path in (path for folder in OWN_WORKFLOWS for path in folder.glob("*.json")):
        for node in json.loads(path.read_text())["nodes"]:
            if node["type"] == "InstantIDModelLoader":
                (folder / node["widgets_values"][0]).write_bytes(b"")
    comfy.folder_paths.add_model_folder_path("instantid", str(folder))
    return folder


def _workflow(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def _inputs(node_class: type) -> dict[str, Any]:
    """The inputs as ComfyUI exposes them, in V1's shape: a V3 node's ``("COMBO", {"options": [...]})``
    becomes ``([...], {...})`` without V3's ``multiselect`` flag, so both forms compare with one set of checks."""
    spec = node_class.INPUT_TYPES()  # type: ignore[attr-defined]

    def v1_shape(entry: Any) -> Any:
        if entry[0] != "COMBO":
            return entry
        options = {k: v for k, v in entry[1].items() if k not in ("options", "multiselect")}
        return (entry[1]["options"], options) if options else (entry[1]["options"],)

    return {name: v1_shape(e) for name, e in {**spec.get("required", {}), **spec.get("optional", {})}.items()}


def _is_widget(spec: tuple[Any, ...]) -> bool:
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES


def _check_widget(node: str, name: str, spec: tuple[Any, ...], value: Any) -> None:
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    if isinstance(kind, list):
        assert value in kind, f"{node}.{name}: {value!r} is not among the choices {kind}"
    elif kind == "FLOAT":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{node}.{name}: {value!r}"
        assert options["min"] <= value <= options["max"], f"{node}.{name}: {value} outside {options}"
    elif kind == "INT":
        assert isinstance(value, int), f"{node}.{name}: {value!r} is not an integer"
    elif kind == "STRING":
        assert isinstance(value, str), f"{node}.{name}: {value!r} is not a string"


def test_the_repository_loads_as_a_custom_node(comfy: comfyui.ComfyUI, pack: dict[str, type]) -> None:
    from instantid.comfy import nodes

    for name in SEVEN:  # the V1 class, or the V3 node made from it (instantid.comfy.v3) where ComfyUI has V3
        assert getattr(pack[name], "V1", pack[name]) is nodes.NODE_CLASS_MAPPINGS[name]
        assert comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS[name] == nodes.NODE_DISPLAY_NAME_MAPPINGS[name]
        node_class = pack[name]
        assert node_class.CATEGORY == "InstantID"  # type: ignore[attr-defined]
        assert callable(getattr(node_class, node_class.FUNCTION))  # type: ignore[attr-defined]
    assert comfy.folder_paths.get_folder_paths("instantid"), "models/instantid is not registered"
    if os.environ.get(ENV_VAR, "").strip().lower() in ("", "0", "false", "no", "off"):
        # the switch is off: loading the pack leaves ComfyUI's own clone() in place
        assert not hasattr(comfy.ModelPatcher.clone, "__cow_stock_clone__")


@pytest.mark.parametrize("workflow_file", WORKFLOW_FILES, ids=lambda p: getattr(p, "name", str(p)))
def test_saved_workflow_nodes_resolve_and_their_widgets_fit(
    comfy: comfyui.ComfyUI, pack: dict[str, type], instantid_models: Path, workflow_file: Path
) -> None:
    workflow = _workflow(workflow_file)
    nodes_by_id = {node["id"]: node for node in workflow["nodes"]}
    ours = [node for node in workflow["nodes"] if node["type"] in pack]
    assert {"InstantIDModelLoader", "InstantIDFaceAnalysis"} <= {n["type"] for n in ours}
    stock = {**comfy.nodes.NODE_CLASS_MAPPINGS, **comfy.nodes_model_advanced.NODE_CLASS_MAPPINGS}
    for node in workflow["nodes"]:
        assert node["type"] in stock or node["type"] in OTHER_PACKS, node["type"]

    for node in ours:
        node_class = pack[node["type"]]
        inputs = _inputs(node_class)
        widgets = [(name, spec) for name, spec in inputs.items() if _is_widget(spec)]
        values = node.get("widgets_values") or []
        assert len(values) == len(widgets), f"{node['type']}: {values} vs widgets {[w for w, _ in widgets]}"
        for (name, spec), value in zip(widgets, values, strict=True):
            _check_widget(node["type"], name, spec, value)
        for link_input in node.get("inputs", []):
            assert link_input["name"] in inputs, f"{node['type']} has no input {link_input['name']!r}"
            assert inputs[link_input["name"]][0] == link_input["type"]
        returns = node_class.RETURN_TYPES  # type: ignore[attr-defined]
        assert [output["type"] for output in node.get("outputs", [])] == list(returns)

    for _, source, slot, target, target_slot, kind in workflow["links"]:
        if nodes_by_id[source]["type"] in pack:
            assert pack[nodes_by_id[source]["type"]].RETURN_TYPES[slot] == kind  # type: ignore[attr-defined]
        if nodes_by_id[target]["type"] in pack:
            name = nodes_by_id[target]["inputs"][target_slot]["name"]
            assert _inputs(pack[nodes_by_id[target]["type"]])[name][0] == kind


def test_the_model_file_choice_lists_the_instantid_folder(pack: dict[str, type], instantid_models: Path) -> None:
    """The loader's combo is the live list of files in the instantid model folders, as in the original."""
    choices = _inputs(pack["InstantIDModelLoader"])["instantid_file"][0]
    assert "ip-adapter.bin" in choices
    (instantid_models / "another.safetensors").write_bytes(b"")
    (instantid_models / "notes.txt").write_text("not a model")
    choices = _inputs(pack["InstantIDModelLoader"])["instantid_file"][0]
    assert "another.safetensors" in choices and "notes.txt" not in choices


def test_interface_matches_comfyui_instantid(pack: dict[str, type]) -> None:
    """Input order, defaults and ranges of the widgets users have saved (as ComfyUI_InstantID declares them)."""

    def widgets(name: str) -> list[tuple[str, Any]]:
        """(input, options or choices) of each widget; the tooltips this pack adds are left out."""
        options = {key: {k: v for k, v in (spec[1:] or [{}])[0].items() if k != "tooltip"} for key, spec in _inputs(pack[name]).items()}
        return [(key, options[key] or spec[0]) for key, spec in _inputs(pack[name]).items() if _is_widget(spec)]

    def float_spec(default: float, low: float, high: float, step: float) -> dict[str, float]:
        return {"default": default, "min": low, "max": high, "step": step}

    start, end = float_spec(0.0, 0.0, 1.0, 0.001), float_spec(1.0, 0.0, 1.0, 0.001)
    noise = float_spec(0.0, 0.0, 1.0, 0.1)
    assert widgets("InstantIDFaceAnalysis") == [("provider", ["CPU", "CUDA", "ROCM", "CoreML"])]
    assert widgets("ApplyInstantID") == [("weight", float_spec(0.8, 0.0, 5.0, 0.01)), ("start_at", start), ("end_at", end)]
    assert widgets("ApplyInstantIDAdvanced") == [
        ("ip_weight", float_spec(0.8, 0.0, 3.0, 0.01)),
        ("cn_strength", float_spec(0.8, 0.0, 10.0, 0.01)),
        ("start_at", start),
        ("end_at", end),
        ("noise", noise),
        ("combine_embeds", {"default": "average"}),
    ]
    assert _inputs(pack["ApplyInstantIDAdvanced"])["combine_embeds"][0] == ["average", "norm average", "concat"]
    assert widgets("InstantIDAttentionPatch") == [
        ("weight", float_spec(1.0, -1.0, 3.0, 0.01)),
        ("start_at", start),
        ("end_at", end),
        ("noise", noise),
    ]
    assert widgets("ApplyInstantIDControlNet") == [("strength", float_spec(1.0, 0.0, 10.0, 0.01)), ("start_at", start), ("end_at", end)]
    links = {name: [k for k, spec in _inputs(pack[name]).items() if not _is_widget(spec)] for name in SEVEN}
    assert links["ApplyInstantID"] == [
        "instantid", "insightface", "control_net", "image", "model", "positive", "negative", "image_kps", "mask"
    ]
    assert links["ApplyInstantIDControlNet"] == ["face_embeds", "control_net", "image_kps", "positive", "negative", "mask"]
    assert links["InstantIDAttentionPatch"] == ["instantid", "insightface", "image", "model", "mask"]
    assert links["FaceKeypointsPreprocessor"] == ["faceanalysis", "image"]
    # outputs as registered; the function name is the V1 class's (a V3 node runs ComfyUI's own EXECUTE_NORMALIZED)
    returns = {
        name: (tuple(pack[name].RETURN_TYPES), getattr(pack[name], "V1", pack[name]).FUNCTION)  # type: ignore[attr-defined]
        for name in SEVEN
    }
    assert returns == {
        "InstantIDModelLoader": (("INSTANTID",), "load_model"),
        "InstantIDFaceAnalysis": (("FACEANALYSIS",), "load_insight_face"),
        "FaceKeypointsPreprocessor": (("IMAGE",), "preprocess_image"),
        "ApplyInstantID": (("MODEL", "CONDITIONING", "CONDITIONING"), "apply_instantid"),
        "ApplyInstantIDAdvanced": (("MODEL", "CONDITIONING", "CONDITIONING"), "apply_instantid"),
        "InstantIDAttentionPatch": (("MODEL", "FACE_EMBEDS"), "patch_attention"),
        "ApplyInstantIDControlNet": (("CONDITIONING", "CONDITIONING"), "apply_controlnet"),
    }
